#include "dist/zero.h"

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <unordered_map>

#include "core/compat.h"
#include "core/profile.h"
#include "train/adamw_kernel.h"

namespace mixdiff {

namespace {

/// Adds the time of a collective (waited for on the device too: NCCL's wait() only orders the
/// stream) to `acc`.
class CommTimer {
 public:
  CommTimer(double* acc, const at::Device& device)
      : acc_(acc), device_(device), t0_(std::chrono::steady_clock::now()) {}
  ~CommTimer() {
    compat::synchronize(device_);
    *acc_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  double* acc_;
  at::Device device_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace

ShardedAdamW::ShardedAdamW(compat::Collectives& group, std::vector<at::Tensor> params,
                           torch::optim::Optimizer& opt, int64_t bucket_bytes, double scale)
    : group_(group), params_(std::move(params)), opt_(opt), scale_(scale) {
  std::unordered_map<const void*, size_t> group_index;
  const auto& groups = opt_.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    for (const auto& p : groups[g].params()) group_index[p.unsafeGetTensorImpl()] = g;
  }
  const int64_t W = group_.size(), r = group_.rank();
  size_t i = 0;
  while (i < params_.size()) {
    // The buckets of sum_gradients (dist/dist.h): consecutive parameters of one dtype up to
    // bucket_bytes, at least one.
    Bucket b{i, i, segments_.size(), segments_.size(), 0, 0, owned_};
    int64_t bytes = 0;
    const auto dtype = params_[i].scalar_type();
    while (i < params_.size() && params_[i].scalar_type() == dtype &&
           (i == b.first || bytes + static_cast<int64_t>(params_[i].nbytes()) <= bucket_bytes)) {
      TORCH_CHECK(params_[i].is_contiguous(), "[ShardedAdamW] parameter ", i, " is not contiguous");
      auto it = group_index.find(params_[i].unsafeGetTensorImpl());
      TORCH_CHECK(it != group_index.end(), "[ShardedAdamW] parameter ", i,
                  " is in no parameter group of the optimizer");
      group_of_.push_back(it->second);
      bytes += static_cast<int64_t>(params_[i].nbytes());
      b.numel += params_[i].numel();
      ++i;
    }
    b.last = i;
    b.piece = (b.numel + W - 1) / W;
    // This rank's piece [r c, (r + 1) c) of the bucket, cut along its parameters.
    const int64_t lo = r * b.piece, hi = std::min(b.numel, lo + b.piece);
    int64_t start = 0;
    for (size_t k = b.first; k < b.last; ++k) {
      const int64_t n = params_[k].numel();
      const int64_t a = std::max(lo, start), e = std::min(hi, start + n);
      if (a < e) segments_.push_back({k, a - start, e - a, b.owned + (a - lo)});
      start += n;
    }
    b.seg_last = segments_.size();
    owned_ += b.piece;
    total_ += b.numel;
    buckets_.push_back(b);
  }
  steps_.assign(params_.size(), 0);
  for (const auto& p : params_) {
    TORCH_CHECK(p.scalar_type() == params_.front().scalar_type() &&
                    p.device() == params_.front().device(),
                "[ShardedAdamW] parameters of one dtype and device only");
  }
  const auto o = params_.empty() ? at::TensorOptions(at::kFloat) : params_.front().options();
  grad_ = torch::zeros({owned_}, o);
  exp_avg_ = torch::zeros({owned_}, o);
  exp_avg_sq_ = torch::zeros({owned_}, o);
}

ShardedAdamW::~ShardedAdamW() = default;

double ShardedAdamW::reduce_scatter_gradients() {
  torch::NoGradGuard ng;
  const int64_t W = group_.size();
  for (const auto& b : buckets_) {
    auto flat = torch::zeros({W * b.piece}, params_[b.first].options());
    int64_t off = 0;
    for (size_t k = b.first; k < b.last; ++k) {
      auto& p = params_[k];
      if (p.grad().defined()) flat.narrow(0, off, p.numel()).copy_(p.grad().reshape({-1}));
      p.mutable_grad() = at::Tensor();  // the full gradient is not needed any more
      off += p.numel();
    }
    auto out = grad_.narrow(0, b.owned, b.piece);
    {
      CommTimer t(&comm_s_, grad_.device());
      group_.reduce_scatter_sum(out, flat);
    }
    out.mul_(scale_);
  }
  const double n = grad_.norm().item<double>();
  return n * n;
}

void ShardedAdamW::step(double grad_scale) {
  torch::NoGradGuard ng;
  profile::Scope sc("optimizer.step");
  const auto& groups = opt_.param_groups();
  size_t s = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    steps_[i] += 1;
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(groups[group_of_[i]].options());
    const double lr = o.lr(), wd = o.weight_decay(), eps = o.eps();
    const double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
    // FusedAdamW's arithmetic (train/optimizers.cpp), on this rank's pieces of the parameter.
    const double bc1 = 1 - std::pow(b1, static_cast<double>(steps_[i]));
    const double bc2 = 1 - std::pow(b2, static_cast<double>(steps_[i]));
    const double step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2);
    auto flat_p = params_[i].view({-1});
    const bool fast = flat_p.device().is_cpu() && flat_p.scalar_type() == at::kFloat;
    for (; s < segments_.size() && segments_[s].param == i; ++s) {
      const Segment& g = segments_[s];
      if (fast) {
        const AdamWScalars k =
            adamw_scalars(lr, wd, b1, b2, eps, bc2_sqrt, step_size, grad_scale);
        adamw_update(flat_p.data_ptr<float>() + g.offset, grad_.data_ptr<float>() + g.owned,
                     exp_avg_.data_ptr<float>() + g.owned, exp_avg_sq_.data_ptr<float>() + g.owned,
                     g.numel, k);
      } else {  // LibTorch's sequence of operations (FusedAdamW's fallback)
        auto p = flat_p.narrow(0, g.offset, g.numel);
        auto gr = grad_.narrow(0, g.owned, g.numel);
        auto m = exp_avg_.narrow(0, g.owned, g.numel), v = exp_avg_sq_.narrow(0, g.owned, g.numel);
        if (grad_scale != 1.0) gr.mul_(grad_scale);
        p.mul_(1 - lr * wd);
        m.mul_(b1).add_(gr, 1 - b1);
        v.mul_(b2).addcmul_(gr, gr, 1 - b2);
        p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), -step_size);
      }
    }
  }
  // Every rank's updated pieces into every rank's parameters.
  profile::Scope gather_scope("optimizer.all_gather");
  for (const auto& b : buckets_) {
    auto piece = torch::zeros({b.piece}, params_[b.first].options());
    for (size_t k = b.seg_first; k < b.seg_last; ++k) {
      const Segment& g = segments_[k];
      piece.narrow(0, g.owned - b.owned, g.numel)
          .copy_(params_[g.param].view({-1}).narrow(0, g.offset, g.numel));
    }
    auto whole = torch::empty({group_.size() * b.piece}, piece.options());
    {
      CommTimer t(&comm_s_, grad_.device());
      group_.all_gather(whole, piece);
    }
    int64_t off = 0;
    for (size_t k = b.first; k < b.last; ++k) {
      auto& p = params_[k];
      p.view({-1}).copy_(whole.narrow(0, off, p.numel()));
      off += p.numel();
    }
  }
}

at::Tensor ShardedAdamW::gather_bucket(const Bucket& b, const at::Tensor& owned_buffer) {
  auto piece = owned_buffer.narrow(0, b.owned, b.piece).contiguous();
  auto whole = torch::empty({group_.size() * b.piece}, piece.options());
  CommTimer t(&comm_s_, grad_.device());
  group_.all_gather(whole, piece);
  return whole;
}

void ShardedAdamW::materialize(bool install) {
  torch::NoGradGuard ng;
  for (const auto& b : buckets_) {
    const auto m = gather_bucket(b, exp_avg_), v = gather_bucket(b, exp_avg_sq_);
    if (!install) continue;
    int64_t off = 0;
    for (size_t k = b.first; k < b.last; ++k) {
      const auto& p = params_[k];
      if (steps_[k] > 0) {
        compat::set_adamw_moments(opt_, p,
                                  {steps_[k], m.narrow(0, off, p.numel()).view_as(p),
                                   v.narrow(0, off, p.numel()).view_as(p)});
      }
      off += p.numel();
    }
  }
}

void ShardedAdamW::release() {
  for (const auto& p : params_) compat::set_adamw_moments(opt_, p, {});
}

void ShardedAdamW::absorb() {
  torch::NoGradGuard ng;
  exp_avg_.zero_();
  exp_avg_sq_.zero_();
  // Checked for every parameter on every rank (before anything collective can follow).
  for (const auto& p : params_) {
    const compat::AdamMoments m = compat::adamw_moments(opt_, p);
    TORCH_CHECK(!m.exp_avg.defined() || (m.exp_avg.numel() == p.numel() &&
                                         m.exp_avg_sq.numel() == p.numel()),
                "[ShardedAdamW] moments of ", m.exp_avg.numel(), " elements for a parameter of ",
                p.numel());
  }
  for (const auto& g : segments_) {
    const compat::AdamMoments m = compat::adamw_moments(opt_, params_[g.param]);
    if (!m.exp_avg.defined()) continue;
    exp_avg_.narrow(0, g.owned, g.numel).copy_(m.exp_avg.reshape({-1}).narrow(0, g.offset, g.numel));
    exp_avg_sq_.narrow(0, g.owned, g.numel)
        .copy_(m.exp_avg_sq.reshape({-1}).narrow(0, g.offset, g.numel));
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const compat::AdamMoments m = compat::adamw_moments(opt_, params_[i]);
    steps_[i] = m.exp_avg.defined() ? m.step : 0;
    compat::set_adamw_moments(opt_, params_[i], {});  // frees the whole moments
  }
}

double ShardedAdamW::take_comm_seconds() {
  const double s = comm_s_;
  comm_s_ = 0;
  return s;
}

}  // namespace mixdiff
