#include "dist/expert_parallel.h"

#include <torch/torch.h>

#include <chrono>
#include <numeric>

#include "core/compat.h"
#include "core/errors.h"
#include "dist/all_to_all_dispatcher.h"
#include "dist/dist.h"
#include "moe/experts.h"
#include "moe/moe_layer.h"

namespace mixdiff {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t total(const std::vector<int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), int64_t{0});
}

at::Tensor all_to_all_rows(const at::Tensor& x_RD, const std::vector<int64_t>& send,
                           const std::vector<int64_t>& recv, compat::Collectives& group,
                           ExchangeStats* stats) {
  TORCH_CHECK(static_cast<int>(send.size()) == group.size() &&
                  static_cast<int>(recv.size()) == group.size(),
              "[exchange_rows] split counts for ", send.size(), "/", recv.size(),
              " ranks in a group of ", group.size());
  TORCH_CHECK(total(send) == x_RD.size(0), "[exchange_rows] ", total(send), " rows to send, ",
              x_RD.size(0), " given");
  at::Tensor in = x_RD.contiguous();
  std::vector<int64_t> shape = in.sizes().vec();
  shape[0] = total(recv);
  at::Tensor out = at::empty(shape, in.options());
  const auto t0 = std::chrono::steady_clock::now();
  group.all_to_all(out, in, recv, send);
  if (stats) {
    stats->seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int64_t row_bytes = x_RD.size(0) > 0 ? static_cast<int64_t>(in.nbytes()) / x_RD.size(0) : 0;
    stats->bytes += (total(send) - send[static_cast<size_t>(group.rank())]) * row_bytes;
  }
  return out;
}

struct ExchangeRows : public torch::autograd::Function<ExchangeRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_RD,
                            std::vector<int64_t> send, std::vector<int64_t> recv,
                            compat::Collectives* group, ExchangeStats* stats) {
    ctx->saved_data["send"] = c10::IValue(send);
    ctx->saved_data["recv"] = c10::IValue(recv);
    // The group and the stats outlive the graph (the run holds them); IValues carry addresses.
    ctx->saved_data["group"] = c10::IValue(reinterpret_cast<int64_t>(group));
    ctx->saved_data["stats"] = c10::IValue(reinterpret_cast<int64_t>(stats));
    return all_to_all_rows(x_RD, send, recv, *group, stats);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto send = ctx->saved_data["send"].toIntVector();
    const auto recv = ctx->saved_data["recv"].toIntVector();
    auto* group = reinterpret_cast<compat::Collectives*>(ctx->saved_data["group"].toInt());
    auto* stats = reinterpret_cast<ExchangeStats*>(ctx->saved_data["stats"].toInt());
    // The rows came along send -> recv; their gradients go back recv -> send.
    return {all_to_all_rows(grads[0], recv, send, *group, stats), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

ParallelLayout::ParallelLayout(int world_, int expert_parallel_, int rank_, int64_t n_expert)
    : world(world_), expert_parallel(expert_parallel_), rank(rank_) {
  if (expert_parallel < 1 || world % expert_parallel != 0) {
    throw ConfigError(str("dist.expert_parallel: ", expert_parallel,
                          " must be a positive divisor of the world size ", world));
  }
  if (n_expert > 0 && n_expert % expert_parallel != 0) {
    throw ConfigError(str("dist.expert_parallel: ", expert_parallel,
                          " must divide the routed expert count ", n_expert));
  }
}

std::vector<int> ParallelLayout::expert_group() const {
  std::vector<int> g;
  for (int j = 0; j < expert_parallel; ++j) g.push_back(dp_rank() * expert_parallel + j);
  return g;
}

std::vector<int> ParallelLayout::replica_group() const {
  std::vector<int> g;
  for (int i = 0; i < data_parallel(); ++i) g.push_back(i * expert_parallel + ep_rank());
  return g;
}

at::Tensor exchange_rows(const at::Tensor& x_RD, const std::vector<int64_t>& send,
                         const std::vector<int64_t>& recv, compat::Collectives& group,
                         ExchangeStats* stats) {
  return ExchangeRows::apply(x_RD, send, recv, &group, stats);
}

std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send, compat::Collectives& group,
                                     const c10::Device& device) {
  const auto n = static_cast<int64_t>(group.size());
  TORCH_CHECK(static_cast<int64_t>(send.size()) == n, "[exchange_counts] ", send.size(),
              " counts for a group of ", n);
  at::Tensor in = torch::tensor(send, torch::kLong).to(device);
  at::Tensor out = torch::empty({n}, in.options());
  const std::vector<int64_t> ones(static_cast<size_t>(n), 1);
  group.all_to_all(out, in, ones, ones);
  out = out.cpu();
  return std::vector<int64_t>(out.data_ptr<int64_t>(), out.data_ptr<int64_t>() + n);
}

ExpertParallel::ExpertParallel(DataParallel& dp, const ParallelLayout& layout,
                               std::optional<LlepOptions> llep, const c10::Device& device)
    : layout_(layout), llep_(llep), device_(device) {
  ep_ = dp.subgroup(layout_.expert_group(), str("ep", layout_.dp_rank(), "/"));
  replica_ = dp.subgroup(layout_.replica_group(), str("replica", layout_.ep_rank(), "/"));
  TORCH_CHECK(ep_ && replica_, "[ExpertParallel] needs a process group (world > 1)");
}

ExpertParallel::~ExpertParallel() = default;

std::vector<at::Tensor> ExpertParallel::shard(const std::vector<MoeLayer*>& layers) {
  std::vector<at::Tensor> params;
  const int N = layout_.expert_parallel;
  for (MoeLayer* l : layers) {
    if (l->slots().pool()) {
      throw ConfigError(str("dist.expert_parallel: ", N, " cannot shard block ", l->block_index(),
                            "'s experts: they live in a pool the model shares between layers "
                            "(unipool_dlm, rexmoe_dlm, coe_dlm); expected model.kind moe_dlm"));
    }
    ExpertPool& pool = l->pool();
    const int64_t E = pool.n_expert();
    if (E % N != 0) {
      throw ConfigError(str("dist.expert_parallel: ", N, " must divide the routed expert count ",
                            E, " of block ", l->block_index()));
    }
    pool.shard(ParallelLayout::first_expert(E, N, layout_.ep_rank()), E / N);
    l->set_dispatcher(std::make_shared<AllToAllDispatcher>(*ep_, E, llep_, &stats_));
    for (auto& p : pool.parameters()) params.push_back(p);
  }
  return params;
}

void ExpertParallel::reduce_expert_gradients(const std::vector<at::Tensor>& params,
                                             int64_t bucket_bytes) {
  sum_gradients(*replica_, params, bucket_bytes, 1.0 / static_cast<double>(layout_.world));
}

at::Tensor ExpertParallel::gather(const at::Tensor& shard) {
  torch::NoGradGuard ng;
  const int64_t n = shard.size(0), N = layout_.expert_parallel;
  std::vector<int64_t> shape = shard.sizes().vec();
  shape[0] = n * N;
  // Zero-padded to the full shape and summed: every rank contributes only its own rows.
  std::vector<at::Tensor> full{torch::zeros(shape, shard.options())};
  full[0].narrow(0, n * layout_.ep_rank(), n).copy_(shard);
  ep_->all_reduce_sum(full);
  return full[0];
}

ExchangeStats ExpertParallel::take_stats() {
  ExchangeStats s = stats_;
  stats_ = ExchangeStats{};
  return s;
}

double ExpertParallel::sum_over_expert_group(double v) {
  return sum_over_expert_group(std::vector<double>{v})[0];
}

std::vector<double> ExpertParallel::sum_over_expert_group(const std::vector<double>& v) {
  std::vector<at::Tensor> t{torch::tensor(v, torch::kFloat64).to(device_)};
  ep_->all_reduce_sum(t);
  auto host = t[0].cpu().contiguous();
  return std::vector<double>(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
}

void ExpertParallel::put_back(const ExchangeStats& s) {
  stats_.seconds += s.seconds;
  stats_.bytes += s.bytes;
  stats_.rows += s.rows;
  stats_.weight_rows += s.weight_rows;
}

}  // namespace mixdiff
