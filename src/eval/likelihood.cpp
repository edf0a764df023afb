#include "eval/likelihood.h"
#include "core/hash.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "core/errors.h"
#include "core/signals.h"
#include "infer/sampler.h"

namespace mixdiff {
namespace {

// The request's generator seed: the options' seed and the continuation's tokens only, so that
// requests with one continuation (the choices of a partial-evaluation item) share its masks.
uint64_t request_seed(uint64_t seed, const LoglikRequest& r) {
  uint64_t h = splitmix64(seed ^ 0x5eed11c0ffeeULL);
  for (int32_t t : r.continuation) h = splitmix64(h ^ static_cast<uint32_t>(t));
  return h;
}

// One row of a forward: request `req`, its sample `sample`, the masked continuation positions.
struct Row {
  size_t req = 0;
  int64_t sample = -1;  // -1: the greedy check (the whole continuation masked)
  std::vector<int64_t> masked;  // positions in the sequence
};

}  // namespace

std::vector<LoglikResult> conditional_loglik(ModelBase& model,
                                             const std::vector<LoglikRequest>& requests,
                                             const LoglikOptions& o) {
  if (o.samples < 1) throw InputError(str("likelihood samples: expected >= 1, got ", o.samples));
  if (o.batch_size < 1) {
    throw InputError(str("likelihood batch_size: expected >= 1, got ", o.batch_size));
  }
  if (o.cfg_scale < 0) throw InputError(str("cfg_scale: expected >= 0, got ", o.cfg_scale));
  torch::NoGradGuard ng;
  const bool was_training = model.is_training();
  model.eval();
  const at::Device dev = module_device(model);
  const int64_t mask_id = model.mask_id();
  std::vector<LoglikResult> out(requests.size());
  // Per request and sample: the weighted masked cross-entropy (the sample's NLL estimate).
  std::vector<std::vector<double>> value(requests.size());
  // Rows grouped by sequence length, so that a forward needs no padding.
  std::map<int64_t, std::vector<Row>> by_length;
  for (size_t q = 0; q < requests.size(); ++q) {
    const auto& r = requests[q];
    const int64_t C = static_cast<int64_t>(r.context.size());
    const int64_t l = static_cast<int64_t>(r.continuation.size());
    if (l < 1) throw InputError(str("likelihood request ", q, ": empty continuation"));
    if (C + l > model.max_seq_len()) {
      throw InputError(str("likelihood request ", q, ": context (", C, ") + continuation (", l,
                           ") tokens exceed model.max_seq_len ", model.max_seq_len()));
    }
    out[q].tokens = l;
    // A one-token continuation has one possible mask: one sample is the exact bound.
    const int64_t N = l == 1 ? 1 : o.samples;
    value[q].assign(static_cast<size_t>(N), 0.0);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(request_seed(o.seed, r));
    const int64_t k = torch::randint(1, l + 1, {1}, gen).item<int64_t>();
    auto& rows = by_length[C + l];
    for (int64_t j = 0; j < N; ++j) {
      const int64_t n = ((static_cast<int64_t>(std::llround(static_cast<double>(k) +
                                                             static_cast<double>(j * l) /
                                                                 static_cast<double>(N))) -
                          1) %
                         l) +
                        1;
      auto perm = torch::randperm(l, gen);
      const int64_t* p = perm.data_ptr<int64_t>();
      Row row{q, j, {}};
      for (int64_t i = 0; i < n; ++i) row.masked.push_back(C + p[i]);
      std::sort(row.masked.begin(), row.masked.end());
      rows.push_back(std::move(row));
    }
    if (o.greedy) {
      Row row{q, -1, {}};
      for (int64_t i = 0; i < l; ++i) row.masked.push_back(C + i);
      rows.push_back(std::move(row));
    }
  }
  for (auto& [Lq, rows] : by_length) {
    for (size_t s = 0; s < rows.size(); s += static_cast<size_t>(o.batch_size)) {
      throw_if_interrupted();
      const size_t e = std::min(rows.size(), s + static_cast<size_t>(o.batch_size));
      const int64_t B = static_cast<int64_t>(e - s);
      auto x = torch::empty({B, Lq}, torch::kLong);
      auto ctx = torch::zeros({B, Lq}, torch::kBool);
      std::vector<int64_t> index, target, owner;
      auto xa = x.accessor<int64_t, 2>();
      auto ca = ctx.accessor<bool, 2>();
      for (int64_t b = 0; b < B; ++b) {
        const Row& row = rows[s + static_cast<size_t>(b)];
        const auto& r = requests[row.req];
        const int64_t C = static_cast<int64_t>(r.context.size());
        for (int64_t i = 0; i < C; ++i) {
          xa[b][i] = r.context[static_cast<size_t>(i)];
          ca[b][i] = true;
        }
        for (size_t i = 0; i < r.continuation.size(); ++i) {
          xa[b][C + static_cast<int64_t>(i)] = r.continuation[i];
        }
        for (int64_t pos : row.masked) {
          index.push_back(b * Lq + pos);
          target.push_back(xa[b][pos]);
          owner.push_back(b);
          xa[b][pos] = mask_id;
        }
      }
      auto idx = torch::tensor(index, torch::kLong);
      auto tgt = torch::tensor(target, torch::kLong);
      ModelInput in(x.to(dev), idx.to(dev));
      at::Tensor uncond;
      if (o.cfg_scale > 0) uncond = x.masked_fill(ctx, mask_id).to(dev);
      // The cross-entropy on the model's device; only [M] values come back.
      auto logits = guided_logits(model, in, uncond, o.cfg_scale).to(torch::kFloat64);
      const auto tgt_dev = tgt.to(logits.device());
      auto ce = torch::nn::functional::cross_entropy(
                    logits, tgt_dev,
                    torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone))
                    .cpu();
      auto hit = logits.argmax(-1).eq(tgt_dev).cpu();
      const double* cp = ce.data_ptr<double>();
      const bool* hp = hit.data_ptr<bool>();
      std::vector<double> row_ce(static_cast<size_t>(B), 0.0);
      std::vector<char> row_hit(static_cast<size_t>(B), 1);
      for (size_t m = 0; m < owner.size(); ++m) {
        row_ce[static_cast<size_t>(owner[m])] += cp[m];
        if (!hp[m]) row_hit[static_cast<size_t>(owner[m])] = 0;
      }
      for (int64_t b = 0; b < B; ++b) {
        const Row& row = rows[s + static_cast<size_t>(b)];
        if (row.sample < 0) {
          out[row.req].greedy = row_hit[static_cast<size_t>(b)] != 0;
          continue;
        }
        const double l = static_cast<double>(requests[row.req].continuation.size());
        value[row.req][static_cast<size_t>(row.sample)] =
            row_ce[static_cast<size_t>(b)] * l / static_cast<double>(row.masked.size());
      }
    }
  }
  for (size_t q = 0; q < requests.size(); ++q) {
    const auto& v = value[q];
    const double n = static_cast<double>(v.size());
    double mean = 0;
    for (double y : v) mean += y;
    mean /= n;
    double ss = 0;
    for (double y : v) ss += (y - mean) * (y - mean);
    out[q].loglik = -mean;
    out[q].se = v.size() > 1 ? std::sqrt(ss / (n - 1) / n) : 0.0;
  }
  if (was_training) model.train();
  return out;
}

SftValidation sft_validation(ModelBase& model, const at::Tensor& x_in,
                             const at::Tensor& resp_in, const LoglikOptions& o) {
  TORCH_CHECK(x_in.dim() == 2 && resp_in.sizes() == x_in.sizes(),
              "[sft_validation] expected x_NL and response_NL of one shape [N, L]");
  const at::Tensor x = x_in.to(torch::kCPU, torch::kLong).contiguous();
  const at::Tensor resp = resp_in.to(torch::kCPU, torch::kBool).contiguous();
  const int64_t N = x.size(0), L = x.size(1);
  std::vector<LoglikRequest> reqs;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t P = L - resp[i].sum().item<int64_t>();
    const int64_t* row = x[i].data_ptr<int64_t>();
    LoglikRequest r;
    r.context.assign(row, row + P);
    r.continuation.assign(row + P, row + L);
    if (r.continuation.empty()) continue;
    reqs.push_back(std::move(r));
  }
  const auto res = conditional_loglik(model, reqs, o);
  SftValidation v;
  v.pairs = static_cast<int64_t>(reqs.size());
  double var = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const double len = static_cast<double>(reqs[i].continuation.size());
    v.nelbo += -res[i].loglik / len;
    var += (res[i].se / len) * (res[i].se / len);
    v.response_tokens += static_cast<int64_t>(len);
  }
  if (v.pairs > 0) {
    v.nelbo /= static_cast<double>(v.pairs);
    v.se = std::sqrt(var) / static_cast<double>(v.pairs);
  }
  return v;
}

}  // namespace mixdiff
