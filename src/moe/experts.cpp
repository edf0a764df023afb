#include "moe/experts.h"

#include <torch/torch.h>

#include "core/profile.h"
#include "moe/dispatcher.h"
#include "nn/fused_kernels.h"

#include <stdexcept>

#ifdef MIXDIFF_HAVE_BLAS
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*);
#endif

namespace mixdiff {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// Row-major C [m, n] = alpha op(A) op(B) + beta C on raw fp32 pointers (op = transpose when
/// ta / tb; lda, ldb, ldc are the stored row lengths). Straight to the BLAS LibTorch uses when
/// it is linked (MIXDIFF_HAVE_BLAS): an expert's three GEMMs then cost no tensor views, no
/// dispatch and no checks, which at decode sizes (a few rows per expert) was ~10% of the
/// generation time (README, "Benchmarks"). Otherwise through at::mm_out on wrapped pointers.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#ifdef MIXDIFF_HAVE_BLAS
  // Column-major view: C^T = op(B)^T op(A)^T.
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k),
            LA = static_cast<int>(lda), LB = static_cast<int>(ldb), LC = static_cast<int>(ldc);
  sgemm_(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &alpha, B, &LB, A, &LA, &beta, C, &LC);
#else
  auto wrap = [](const float* p, int64_t r, int64_t c, int64_t ld) {
    return at::from_blob(const_cast<float*>(p), {r, c}, {ld, 1}, at::kFloat);
  };
  auto a = ta ? wrap(A, k, m, lda).t() : wrap(A, m, k, lda);
  auto b = tb ? wrap(B, n, k, ldb).t() : wrap(B, k, n, ldb);
  auto c = wrap(C, m, n, ldc);
  if (beta == 0) {
    at::mm_out(c, a, b);
    if (alpha != 1) c.mul_(alpha);
  } else {
    c.mul_(beta).addmm_(a, b, 1.0, alpha);
  }
#endif
}

/// Rows per expert up to which the skinny kernel beats the BLAS GEMM (decode sizes; measured on
/// the 2-core machine, README "Benchmarks").
constexpr int64_t kSkinnyRows = 16;

/// Row-major C [m, n] = A [m, k] B^T, B [n, k]: the forward's form.
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* A, const float* B, float* C) {
  if (m <= kSkinnyRows) {
    kernels::gemm_nt_skinny(A, m, B, n, k, C, n);
  } else {
    gemm(false, true, m, n, k, 1, A, k, B, k, 0, C, n);
  }
}

bool raw_fp32(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }

/// Calls fn(e, offset, rows) for every expert with rows, in expert order. (Running the experts
/// on two threads with single-threaded GEMMs was measured slower than OpenBLAS's own threading
/// inside each GEMM on the 2-core machine; README, "Benchmarks".)
template <class Fn>
void for_each_expert(const std::vector<int64_t>& counts, const Fn& fn) {
  int64_t off = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] > 0) fn(static_cast<int64_t>(e), off, counts[e]);
    off += counts[e];
  }
}

// Forward keeps a = x Wg^T, b = x Wu^T, s = silu(a) and h = s * b, so that backward needs no
// GEMM recomputation and only three elementwise passes (the loop version took ten):
//   y = h Wd^T;  dh = dy Wd;  db = dh * s;  da = silu_backward(dh * b, a)
//   dWd_e = dy_e^T h_e;  dWg_e = da_e^T x_e;  dWu_e = db_e^T x_e;  dx_e = da_e Wg_e + db_e Wu_e
struct GroupedSwiGLU : public torch::autograd::Function<GroupedSwiGLU> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& xs, const at::Tensor& wg,
                            const at::Tensor& wu, const at::Tensor& wd,
                            std::vector<int64_t> counts) {
    const int64_t A = xs.size(0), F = wg.size(1), D = wg.size(2);
    auto x_AD = xs.contiguous();
    auto a_AF = at::empty({A, F}, x_AD.options());
    auto b_AF = at::empty({A, F}, x_AD.options());
    auto y_AD = at::empty({A, D}, x_AD.options());
    // Raw pointers only for host fp32 tensors; anything else (CUDA, bf16) takes the at::mm_out
    // path, which runs on the tensors' own device.
    const bool raw = raw_fp32(x_AD) && raw_fp32(wg) && raw_fp32(wu) && raw_fp32(wd) &&
                     wg.is_contiguous() && wu.is_contiguous() && wd.is_contiguous();
    if (raw) {
      const float *X = x_AD.data_ptr<float>(), *WG = wg.data_ptr<float>(),
                  *WU = wu.data_ptr<float>();
      float *Pa = a_AF.data_ptr<float>(), *Pb = b_AF.data_ptr<float>();
      for_each_expert(counts, [&](int64_t e, int64_t off, int64_t n) {
        gemm_nt(n, F, D, X + off * D, WG + e * F * D, Pa + off * F);
        gemm_nt(n, F, D, X + off * D, WU + e * F * D, Pb + off * F);
      });
    } else {
      for_each_expert(counts, [&](int64_t e, int64_t off, int64_t n) {
        auto xe_RD = x_AD.narrow(0, off, n);
        auto av_RF = a_AF.narrow(0, off, n), bv_RF = b_AF.narrow(0, off, n);
        at::mm_out(av_RF, xe_RD, wg.select(0, e).t());
        at::mm_out(bv_RF, xe_RD, wu.select(0, e).t());
      });
    }
    auto s_AF = at::silu(a_AF);
    auto h_AF = s_AF * b_AF;
    if (raw) {
      const float *H = h_AF.data_ptr<float>(), *WD = wd.data_ptr<float>();
      float* Y = y_AD.data_ptr<float>();
      for_each_expert(counts, [&](int64_t e, int64_t off, int64_t n) {
        gemm_nt(n, D, F, H + off * F, WD + e * D * F, Y + off * D);
      });
    } else {
      for_each_expert(counts, [&](int64_t e, int64_t off, int64_t n) {
        auto yv_RD = y_AD.narrow(0, off, n);
        at::mm_out(yv_RD, h_AF.narrow(0, off, n), wd.select(0, e).t());
      });
    }
    ctx->save_for_backward({x_AD, wg, wu, wd, a_AF, b_AF, s_AF, h_AF});
    ctx->saved_data["counts"] = c10::IValue(counts);
    return y_AD;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x_AD = saved[0];
    const auto& wg_EFD = saved[1];
    const auto& wu_EFD = saved[2];
    const auto& wd_EDF = saved[3];
    const auto& a_AF = saved[4];
    const auto& b_AF = saved[5];
    const auto& s_AF = saved[6];
    const auto& h_AF = saved[7];
    const auto counts = ctx->saved_data["counts"].toIntVector();
    auto dy_AD = grads[0].contiguous();
    const int64_t A = x_AD.size(0), F = wg_EFD.size(1);

    const int64_t D = wg_EFD.size(2);
    const bool raw = raw_fp32(dy_AD) && raw_fp32(x_AD) && raw_fp32(wg_EFD) && raw_fp32(wu_EFD) &&
                     raw_fp32(wd_EDF) && wg_EFD.is_contiguous() && wu_EFD.is_contiguous() &&
                     wd_EDF.is_contiguous();
    auto dh_AF = at::empty({A, F}, x_AD.options());
    if (raw) {
      const float *DY = dy_AD.data_ptr<float>(), *WD = wd_EDF.data_ptr<float>();
      float* DH = dh_AF.data_ptr<float>();
      for_each_expert(counts, [&](int64_t e, int64_t off, int64_t n) {
        gemm(false, false, n, F, D, 1, DY + off * D, D, WD + e * D * F, F, 0, DH + off * F, F);
      });
    } else {
      for_each_expert(counts, [&](int64_t e, int64_t off, int64_t n) {
        auto dhv_RF = dh_AF.narrow(0, off, n);
        at::mm_out(dhv_RF, dy_AD.narrow(0, off, n), wd_EDF.select(0, e));
      });
    }
    auto db_AF = dh_AF * s_AF;
    auto da_AF = at::silu_backward(dh_AF.mul_(b_AF), a_AF);

    // Every expert with rows overwrites its whole gradient slice; only idle experts need zeros
    // (zero-filling all three [E, F, D] tensors cost ~3 ms per layer at E = 64).
    auto dwg_EFD = at::empty_like(wg_EFD), dwu_EFD = at::empty_like(wu_EFD),
         dwd_EDF = at::empty_like(wd_EDF);
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] > 0) continue;
      const auto ei = static_cast<int64_t>(e);
      dwg_EFD.select(0, ei).zero_();
      dwu_EFD.select(0, ei).zero_();
      dwd_EDF.select(0, ei).zero_();
    }
    auto dx_AD = at::empty_like(x_AD);
    if (raw) {
      const float *X = x_AD.data_ptr<float>(), *DY = dy_AD.data_ptr<float>(),
                  *H = h_AF.data_ptr<float>(), *DA = da_AF.data_ptr<float>(),
                  *DB = db_AF.data_ptr<float>(), *WG = wg_EFD.data_ptr<float>(),
                  *WU = wu_EFD.data_ptr<float>();
      float *DWG = dwg_EFD.data_ptr<float>(), *DWU = dwu_EFD.data_ptr<float>(),
            *DWD = dwd_EDF.data_ptr<float>(), *DX = dx_AD.data_ptr<float>();
      for_each_expert(counts, [&](int64_t e, int64_t off, int64_t n) {
        const float *xe = X + off * D, *dae = DA + off * F, *dbe = DB + off * F;
        gemm(true, false, D, F, n, 1, DY + off * D, D, H + off * F, F, 0, DWD + e * D * F, F);
        gemm(true, false, F, D, n, 1, dae, F, xe, D, 0, DWG + e * F * D, D);
        gemm(true, false, F, D, n, 1, dbe, F, xe, D, 0, DWU + e * F * D, D);
        gemm(false, false, n, D, F, 1, dae, F, WG + e * F * D, D, 0, DX + off * D, D);
        gemm(false, false, n, D, F, 1, dbe, F, WU + e * F * D, D, 1, DX + off * D, D);
      });
      return {dx_AD, dwg_EFD, dwu_EFD, dwd_EDF, at::Tensor()};
    }
    for_each_expert(counts, [&](int64_t ei, int64_t off, int64_t n) {
      auto xe_RD = x_AD.narrow(0, off, n);
      auto dae_RF = da_AF.narrow(0, off, n), dbe_RF = db_AF.narrow(0, off, n);
      auto dwd_e = dwd_EDF.select(0, ei), dwg_e = dwg_EFD.select(0, ei),
           dwu_e = dwu_EFD.select(0, ei);
      at::mm_out(dwd_e, dy_AD.narrow(0, off, n).t(), h_AF.narrow(0, off, n));
      at::mm_out(dwg_e, dae_RF.t(), xe_RD);
      at::mm_out(dwu_e, dbe_RF.t(), xe_RD);
      auto dxe_RD = dx_AD.narrow(0, off, n);
      at::mm_out(dxe_RD, dae_RF, wg_EFD.select(0, ei));
      dxe_RD.addmm_(dbe_RF, wu_EFD.select(0, ei));
    });
    return {dx_AD, dwg_EFD, dwu_EFD, dwd_EDF, at::Tensor()};
  }
};

}  // namespace

DispatcherRegistry& dispatchers_registry() {
  static DispatcherRegistry r("dispatchers",
                              "how routed rows reach their experts and come back (model.moe.dispatch)");
  return r;
}

std::shared_ptr<Dispatcher> make_dispatcher(const std::string& name) {
  return dispatchers_registry().create(name, "dispatch", ConfigNode::from_string("{}", "dispatch"));
}

std::vector<int64_t> host_counts(const at::Tensor& ids, int64_t n) {
  auto c = torch::bincount(ids, {}, n).to(torch::kCPU).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + n);
}

at::Tensor grouped_swiglu(const at::Tensor& xs, const std::vector<int64_t>& counts,
                          const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd) {
  // The GEMMs run in the activations' dtype (bf16 x with fp32 master weights under autocast:
  // the weights are cast, as autocast casts a linear's weight). The cast sits outside the custom
  // function, so autograd converts the weight gradients back to the weights' dtype. A no-op
  // (the same tensors) when the dtypes already agree.
  const auto dt = xs.scalar_type();
  return GroupedSwiGLU::apply(xs, wg.to(dt), wu.to(dt), wd.to(dt), counts);
}

ExpertPool::ExpertPool(int64_t n_expert, int64_t d_model, int64_t d_expert, bool track_usage)
    : n_expert_(n_expert), d_model_(d_model), d_expert_(d_expert), global_n_expert_(n_expert) {
  TORCH_CHECK(n_expert > 0 && d_model > 0 && d_expert > 0, "[ExpertPool] sizes must be positive");
  w_gate_ = register_parameter("w_gate", torch::empty({n_expert, d_expert, d_model}));
  w_up_ = register_parameter("w_up", torch::empty({n_expert, d_expert, d_model}));
  w_down_ = register_parameter("w_down", torch::empty({n_expert, d_model, d_expert}));
  if (track_usage) {
    usage_.emplace();
    usage_->prev_M = register_buffer("usage_prev", torch::zeros({n_expert}));
    usage_->ready = register_buffer("usage_ready", torch::zeros({1}));
    usage_->sum_M = torch::zeros({n_expert});
  }
}

void ExpertPool::shard(int64_t first, int64_t count) {
  TORCH_CHECK(!sharded(), "[ExpertPool] already sharded");
  TORCH_CHECK(!usage_, "[ExpertPool] a pool shared by several layers cannot be sharded");
  TORCH_CHECK(first >= 0 && count > 0 && first + count <= n_expert_, "[ExpertPool] experts [",
              first, ", ", first + count, ") outside the pool's ", n_expert_);
  torch::NoGradGuard ng;
  for (at::Tensor* w : {&w_gate_, &w_up_, &w_down_}) {
    w->set_data(w->narrow(0, first, count).clone());
  }
  first_expert_ = first;
  n_expert_ = count;
}

at::Tensor ExpertPool::forward(const at::Tensor& x, const at::Tensor& token_A,
                               const at::Tensor& expert_A, const at::Tensor& gate_A,
                               const Dispatcher& dispatcher) const {
  return dispatcher.run(*this, x, token_A, expert_A, gate_A);
}

}  // namespace mixdiff
