#include "core/compat.h"

#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <sstream>
#include <cstdlib>
#include <stdexcept>
#include <type_traits>

// Debian's LibTorch exports USE_C10D_GLOO and ships the gloo headers (libgloo-dev); a PyTorch
// wheel may lack the gloo headers, in which case this build has no Gloo process group.
#if defined(USE_C10D_GLOO) && __has_include(<gloo/algorithm.h>)
#define MIXDIFF_HAVE_GLOO 1
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#else
#define MIXDIFF_HAVE_GLOO 0
#endif
// NCCL: CUDA builds (-DMIXDIFF_USE_CUDA=ON) of a LibTorch that ships the header.
#if defined(MIXDIFF_USE_CUDA) && __has_include(<torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>)
#define MIXDIFF_HAVE_NCCL 1
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#else
#define MIXDIFF_HAVE_NCCL 0
#endif
#include <ATen/autocast_mode.h>

namespace mixdiff::compat {

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& bias) {
#if MIXDIFF_TORCH_AT_LEAST(2, 0)
  return at::scaled_dot_product_attention(q, k, v, bias.defined() ? c10::optional<at::Tensor>(bias)
                                                                  : c10::nullopt);
#else
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;  // [B, H, L, S]
  if (bias.defined()) scores = scores + bias;
  return torch::matmul(torch::softmax(scores, -1), v);
#endif
}

const char* torch_version() { return TORCH_VERSION; }

namespace {

template <class Map>
typename Map::key_type state_key(const Map&, const at::Tensor& p) {
  using K = typename Map::key_type;
  if constexpr (std::is_same_v<K, std::string>) {
    std::ostringstream os;  // LibTorch 1.13's key: the TensorImpl address as a stream prints it
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return reinterpret_cast<K>(p.unsafeGetTensorImpl());
  }
}

}  // namespace

AdamMoments adamw_moments(torch::optim::Optimizer& opt, const at::Tensor& param) {
  auto& st = opt.state();
  auto it = st.find(state_key(st, param));
  if (it == st.end()) return {};
  const auto* s = dynamic_cast<const torch::optim::AdamWParamState*>(it->second.get());
  if (!s) return {};
  return {s->step(), s->exp_avg(), s->exp_avg_sq()};
}

void set_adamw_moments(torch::optim::Optimizer& opt, const at::Tensor& param,
                       const AdamMoments& m) {
  auto& st = opt.state();
  const auto key = state_key(st, param);
  if (!m.exp_avg.defined()) {
    st.erase(key);
    return;
  }
  auto s = std::make_unique<torch::optim::AdamWParamState>();
  s->step(m.step);
  s->exp_avg(m.exp_avg.clone());
  s->exp_avg_sq(m.exp_avg_sq.clone());
  st[key] = std::move(s);
}

namespace {

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

#if MIXDIFF_HAVE_GLOO || MIXDIFF_HAVE_NCCL
template <class PG>
struct IsNccl : std::false_type {};
#if MIXDIFF_HAVE_NCCL
template <>
struct IsNccl<c10d::ProcessGroupNCCL> : std::true_type {};
#endif

/// The collectives of a concrete c10d backend (ProcessGroupGloo or ProcessGroupNCCL). `make`
/// builds the backend of a rank in a group of a size over a store; sub-groups reuse it over a
/// prefixed store.
template <class PG>
class BackendCollectives : public Collectives {
 public:
  BackendCollectives(c10::intrusive_ptr<c10d::Store> store, int rank, int size,
                     std::function<c10::intrusive_ptr<PG>(const c10::intrusive_ptr<c10d::Store>&,
                                                          int, int)> make)
      : store_(std::move(store)), rank_(rank), size_(size), make_(std::move(make)) {
    pg_ = make_(store_, rank_, size_);
  }
  void all_reduce_sum(std::vector<at::Tensor>& t) override {
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    pg_->allreduce(t, o)->wait();
  }
  void all_reduce_max(std::vector<at::Tensor>& t) override {
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::MAX;
    pg_->allreduce(t, o)->wait();
  }
  void broadcast(std::vector<at::Tensor>& t, int root) override {
    c10d::BroadcastOptions o;
    o.rootRank = root;
    pg_->broadcast(t, o)->wait();
  }
  void barrier() override { pg_->barrier()->wait(); }
  void all_to_all(at::Tensor& out, at::Tensor& in, const std::vector<int64_t>& out_splits,
                  const std::vector<int64_t>& in_splits) override {
    std::vector<int64_t> os = out_splits, is = in_splits;
    pg_->alltoall_base(out, in, os, is)->wait();
  }
  void reduce_scatter_sum(at::Tensor& out, at::Tensor& in) override {
    TORCH_CHECK(in.numel() == out.numel() * size_, "[reduce_scatter_sum] ", in.numel(),
                " elements in for ", out.numel(), " out on ", size_, " ranks");
    if constexpr (IsNccl<PG>::value) {
      pg_->_reduce_scatter_base(out, in, c10d::ReduceScatterOptions())->wait();
    } else {
      auto recv = at::empty_like(in);
      const std::vector<int64_t> splits(static_cast<size_t>(size_), out.numel());
      std::vector<int64_t> os = splits, is = splits;
      pg_->alltoall_base(recv, in, os, is)->wait();
      at::sum_out(out, recv.view({size_, out.numel()}), {0});
    }
  }
  void all_gather(at::Tensor& out, at::Tensor& in) override {
    TORCH_CHECK(out.numel() == in.numel() * size_, "[all_gather] ", out.numel(),
                " elements out for ", in.numel(), " in on ", size_, " ranks");
    if constexpr (IsNccl<PG>::value) {
      pg_->_allgather_base(out, in, c10d::AllgatherOptions())->wait();
    } else {
      std::vector<std::vector<at::Tensor>> outs(1);
      for (int j = 0; j < size_; ++j) outs[0].push_back(out.narrow(0, j * in.numel(), in.numel()));
      std::vector<at::Tensor> ins{in};
      pg_->allgather(outs, ins)->wait();
    }
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::unique_ptr<Collectives> subgroup(const std::vector<int>& members,
                                        const std::string& name) override {
    int me = -1;
    for (size_t i = 0; i < members.size(); ++i) {
      if (members[i] == rank_) me = static_cast<int>(i);
    }
    if (me < 0) {
      throw std::logic_error("subgroup '" + name + "': rank " + std::to_string(rank_) +
                             " is not a member");
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name, store_);
    return std::make_unique<BackendCollectives<PG>>(prefixed, me,
                                                    static_cast<int>(members.size()), make_);
  }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  int rank_, size_;
  std::function<c10::intrusive_ptr<PG>(const c10::intrusive_ptr<c10d::Store>&, int, int)> make_;
  c10::intrusive_ptr<PG> pg_;
};
#endif

}  // namespace

std::unique_ptr<Collectives> make_process_group(const ProcessGroupSpec& s) {
  const bool gloo = s.backend == "gloo", nccl = s.backend == "nccl";
  if ((gloo && !MIXDIFF_HAVE_GLOO) || (nccl && !MIXDIFF_HAVE_NCCL) || (!gloo && !nccl)) {
    throw std::runtime_error("process group backend '" + s.backend +
                             "' is not available in this build (it has" +
                             (MIXDIFF_HAVE_GLOO ? " gloo" : "") + (MIXDIFF_HAVE_NCCL ? " nccl" : "") +
                             ((MIXDIFF_HAVE_GLOO || MIXDIFF_HAVE_NCCL) ? ")" : " none)"));
  }
#if MIXDIFF_HAVE_GLOO || MIXDIFF_HAVE_NCCL
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(s.timeout_s * 1000));
  c10::intrusive_ptr<c10d::TCPStore> store;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(s.master_port);
    so.isServer = s.rank == 0;
    so.numWorkers = static_cast<size_t>(s.world);
    so.waitWorkers = false;
    so.timeout = timeout;
    store = c10::make_intrusive<c10d::TCPStore>(s.master_addr, so);
  } catch (const std::exception& e) {
    throw std::runtime_error("rendezvous: rank " + std::to_string(s.rank) +
                             " could not reach the store at " + s.master_addr + ":" +
                             std::to_string(s.master_port) + " within " +
                             std::to_string(static_cast<int>(s.timeout_s)) + " s (" +
                             first_line(e.what()) + ")");
  }
  try {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("mixdiff", store);
#if MIXDIFF_HAVE_NCCL
    if (nccl) {
      auto make = [timeout](const c10::intrusive_ptr<c10d::Store>& st, int rank, int size) {
        auto o = c10d::ProcessGroupNCCL::Options::create();
        o->timeout = timeout;
        return c10::make_intrusive<c10d::ProcessGroupNCCL>(st, rank, size, o);
      };
      return std::make_unique<BackendCollectives<c10d::ProcessGroupNCCL>>(prefixed, s.rank,
                                                                          s.world, make);
    }
#endif
#if MIXDIFF_HAVE_GLOO
    auto make = [timeout](const c10::intrusive_ptr<c10d::Store>& st, int rank, int size) {
      auto o = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      o->devices.push_back(ifname && *ifname
                               ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                               : c10d::ProcessGroupGloo::createDefaultDevice());
      return c10::make_intrusive<c10d::ProcessGroupGloo>(st, rank, size, o);
    };
    return std::make_unique<BackendCollectives<c10d::ProcessGroupGloo>>(prefixed, s.rank, s.world,
                                                                         make);
#endif
  } catch (const std::exception& e) {
    throw std::runtime_error("rendezvous: rank " + std::to_string(s.rank) + " of " +
                             std::to_string(s.world) + " did not meet every peer within " +
                             std::to_string(static_cast<int>(s.timeout_s)) + " s (" +
                             first_line(e.what()) + ")");
  }
#endif
  throw std::runtime_error("no process group backend in this build");
}

at::ScalarType cuda_autocast_dtype() {
#if MIXDIFF_TORCH_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(at::kCUDA) ? at::autocast::get_autocast_dtype(at::kCUDA)
                                                      : at::kFloat;
#else
  return at::autocast::is_enabled() ? at::autocast::get_autocast_gpu_dtype() : at::kFloat;
#endif
}

AutocastGuard::AutocastGuard(const at::Device& device, at::ScalarType dtype)
    : on_(device.is_cuda() && dtype != at::kFloat) {
  if (!on_) return;
#if MIXDIFF_TORCH_AT_LEAST(2, 4)
  prev_enabled_ = at::autocast::is_autocast_enabled(at::kCUDA);
  prev_dtype_ = at::autocast::get_autocast_dtype(at::kCUDA);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::set_autocast_dtype(at::kCUDA, dtype);
#else
  prev_enabled_ = at::autocast::is_enabled();
  prev_dtype_ = at::autocast::get_autocast_gpu_dtype();
  at::autocast::set_enabled(true);
  at::autocast::set_autocast_gpu_dtype(dtype);
#endif
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!on_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if MIXDIFF_TORCH_AT_LEAST(2, 4)
  at::autocast::set_autocast_enabled(at::kCUDA, prev_enabled_);
  at::autocast::set_autocast_dtype(at::kCUDA, prev_dtype_);
#else
  at::autocast::set_enabled(prev_enabled_);
  at::autocast::set_autocast_gpu_dtype(prev_dtype_);
#endif
}

bool cuda_available() { return torch::cuda::is_available(); }

void synchronize(const at::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index() < 0 ? -1 : device.index());
}

}  // namespace mixdiff::compat
