// The one place where LibTorch versions differ (1.13 from Debian, 2.x from a PyTorch install).
// Everything else in MixDiff calls these wrappers instead of version-specific APIs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/version.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#define MIXDIFF_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||          \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace mixdiff::compat {

/// softmax(q k^T * scale + bias) v for q [B, H, L, hd], k/v [B, H, S, hd]; bias is an additive
/// float mask broadcastable to [B, H, L, S] or undefined. LibTorch >= 2.0 dispatches to the fused
/// kernels of at::scaled_dot_product_attention; 1.13 has only a private math path, so the same
/// math is written out.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& bias);

/// "1.13.0" or "2.5.1": the LibTorch this binary was built against.
const char* torch_version();

/// Adam(W) state of one parameter. The optimizer keys its state by a string of the tensor's
/// address in LibTorch 1.13 and by the address itself in 2.x; these two functions hide that.
struct AdamMoments {
  int64_t step = 0;
  at::Tensor exp_avg, exp_avg_sq;  ///< undefined: the parameter has no state yet
};
}  // namespace mixdiff::compat

namespace torch::optim {
class Optimizer;
}

namespace mixdiff::compat {
AdamMoments adamw_moments(torch::optim::Optimizer& opt, const at::Tensor& param);
void set_adamw_moments(torch::optim::Optimizer& opt, const at::Tensor& param, const AdamMoments& m);

/// Collectives of one c10d process group. LibTorch 1.13 derives ProcessGroupGloo from
/// c10d::ProcessGroup, 2.x from c10d::Backend; both keep the collective signatures used here, so
/// the concrete backend is held and called directly (no 2.x dispatcher layer).
class Collectives {
 public:
  virtual ~Collectives() = default;
  /// In-place sum over all ranks.
  virtual void all_reduce_sum(std::vector<at::Tensor>& tensors) = 0;
  /// In-place element-wise max over all ranks.
  virtual void all_reduce_max(std::vector<at::Tensor>& tensors) = 0;
  /// In-place copy of `root`'s tensors to every rank.
  virtual void broadcast(std::vector<at::Tensor>& tensors, int root) = 0;
  virtual void barrier() = 0;
  /// All-to-all of rows (c10d alltoall_base): rows [sum(in_splits[:j]), +in_splits[j]) of `in`
  /// go to group rank j, and rank j's rows for this rank land at
  /// [sum(out_splits[:j]), +out_splits[j]) of `out` (both contiguous, same dtype, dim 0 = rows).
  virtual void all_to_all(at::Tensor& out, at::Tensor& in, const std::vector<int64_t>& out_splits,
                          const std::vector<int64_t>& in_splits) = 0;
  /// Sum over the group, scattered: `in` holds size() equal chunks of out.numel() elements (1-D,
  /// contiguous), and `out` receives the sum over ranks of chunk rank(). NCCL's reduce-scatter;
  /// Gloo has none in LibTorch 1.13, so there it is an all-to-all of the chunks summed here (in
  /// rank order: with two ranks bit-equal to an all-reduce's sum).
  virtual void reduce_scatter_sum(at::Tensor& out, at::Tensor& in) = 0;
  /// All-gather: `out` (size() x in.numel() elements, 1-D, contiguous) receives every rank's
  /// `in` in rank order.
  virtual void all_gather(at::Tensor& out, at::Tensor& in) = 0;
  /// This rank's index in the group and the group's size.
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// A process group of the global ranks `members` (this rank among them), made through the same
  /// store under the key prefix `name`. Every member calls it with the same arguments; the
  /// sub-group's ranks follow the order of `members`.
  virtual std::unique_ptr<Collectives> subgroup(const std::vector<int>& members,
                                                const std::string& name) = 0;
};

struct ProcessGroupSpec {
  std::string backend = "gloo";  ///< gloo (CPU tensors) or nccl (CUDA tensors, CUDA builds only)
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  int rank = 0;
  int world = 1;
  double timeout_s = 120;  ///< rendezvous and per-collective timeout
};

/// Whether CUDA autocast is on in this thread, and to which dtype (kFloat when off): a
/// recomputation in the backward (nn/checkpoint.h) runs under the forward's autocast.
at::ScalarType cuda_autocast_dtype();

/// Mixed precision for the forward pass: inside the guard, CUDA ops autocast to `dtype`
/// (bf16); routers and losses cast to fp32 themselves. No-op on the CPU and for fp32.
class AutocastGuard {
 public:
  AutocastGuard(const at::Device& device, at::ScalarType dtype);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_ = false, prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

/// Whether this build and machine can run CUDA tensors.
bool cuda_available();
/// Waits for the device's queued work (timing); no-op on the CPU.
void synchronize(const at::Device& device);

/// Rendezvous through a c10d TCPStore (served by rank 0) and build the process group. Throws
/// std::runtime_error with one line naming what failed (a peer that never arrives, a port in use,
/// a backend this build lacks).
std::unique_ptr<Collectives> make_process_group(const ProcessGroupSpec& spec);

}  // namespace mixdiff::compat
