#include "train/trainer.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <unordered_set>
#include <sys/resource.h>
#include <unistd.h>

#include "core/compat.h"
#include "core/errors.h"
#include "core/fs.h"
#include "core/fault.h"
#include "core/profile.h"
#include "dist/expert_parallel.h"
#include "dist/zero.h"
#include "eval/likelihood.h"
#include "moe/moe_layer.h"
#include "moe/observers.h"
#include "report/report.h"
#include "train/checkpoint.h"
#include "train/metrics_logger.h"
#include "core/safetensors.h"

namespace mixdiff {

namespace fs = std::filesystem;

DataSourceRegistry& data_sources_registry() {
  static DataSourceRegistry r("data_sources", "training data sources (data.kind)");
  return r;
}

OptimizerRegistry& optimizers_registry() {
  static OptimizerRegistry r("optimizers", "optimizers (optim.kind)");
  return r;
}

LrScheduleRegistry& lr_schedules_registry() {
  static LrScheduleRegistry r("lr_schedules", "learning-rate schedules (lr_schedule.kind)");
  return r;
}

std::unique_ptr<DataSource> build_data_source(const ConfigNode& data_cfg) {
  return data_sources_registry().create(data_cfg.get<std::string>("kind"),
                                        data_cfg.path() + ".kind", data_cfg);
}

namespace {

uint64_t mix_seed(uint64_t seed, uint64_t step, uint64_t micro) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ULL ^ (step + 1) * 0xbf58476d1ce4e5b9ULL ^
               (micro + 1) * 0x94d049bb133111ebULL;
  x ^= x >> 31;
  x *= 0xd6e8feb86659fd93ULL;
  return x ^ (x >> 32);
}

}  // namespace

TrainOptions TrainOptions::from(const ConfigNode& recipe) {
  TrainOptions o;
  ConfigNode t = recipe.at("train");
  o.steps = t.get<int64_t>("steps");
  o.batch_size = t.get<int64_t>("batch_size");
  o.grad_accum = t.get<int64_t>("grad_accum", 1);
  o.grad_clip = t.get<double>("grad_clip", 1.0);
  o.log_every = t.get<int64_t>("log_every", 10);
  o.ckpt_every = t.get<int64_t>("ckpt_every", 0);
  o.keep_checkpoints = t.get<int64_t>("keep_checkpoints", 2);
  o.on_nonfinite = t.get<std::string>("on_nonfinite", "stop");
  o.max_skips = t.get<int64_t>("max_skips", 10);
  if (o.on_nonfinite != "stop" && o.on_nonfinite != "skip") {
    t.fail("on_nonfinite", str("expected stop or skip, got '", o.on_nonfinite, "'"));
  }
  if (o.max_skips <= 0) t.fail("max_skips", "expected a positive integer");
  if (o.steps <= 0) t.fail("steps", str("expected a positive integer, got ", o.steps));
  if (o.batch_size <= 0) t.fail("batch_size", str("expected a positive integer, got ", o.batch_size));
  if (o.grad_accum <= 0) t.fail("grad_accum", str("expected a positive integer, got ", o.grad_accum));
  if (o.grad_clip < 0) t.fail("grad_clip", "expected >= 0 (0 disables clipping)");
  if (o.log_every <= 0) t.fail("log_every", "expected a positive integer");
  if (o.ckpt_every < 0) t.fail("ckpt_every", "expected >= 0 (0: only at the end)");
  if (o.keep_checkpoints < 0) t.fail("keep_checkpoints", "expected >= 0 (0 keeps all)");
  using AcMode = ActivationCheckpointing::Mode;
  o.activation_checkpointing.mode = t.get_choice<AcMode>(
      "activation_checkpointing",
      {{"none", AcMode::kNone}, {"blocks", AcMode::kBlocks}, {"moe", AcMode::kMoe},
       {"every_k", AcMode::kEveryK}},
      AcMode::kNone);
  o.activation_checkpointing.every = t.get<int64_t>("activation_checkpointing_every", 2);
  if (o.activation_checkpointing.every < 1) {
    t.fail("activation_checkpointing_every", "expected a positive integer (k of every_k)");
  }
  ConfigNode d = recipe.section("diffusion");
  o.random_length_prob = d.get<double>("random_length_prob", 0.0);
  o.objective = create_named(objectives_registry(), d, "objective", "masked", d);
  if (!(o.random_length_prob >= 0 && o.random_length_prob <= 1)) {
    d.fail("random_length_prob", "expected a probability in [0, 1]");
  }
  ConfigNode e = recipe.section("eval");
  o.eval_every = e.get<int64_t>("every", 0);
  o.eval_sequences = e.get<int64_t>("sequences", 128);
  o.eval_batch_size = e.get<int64_t>("batch_size", 32);
  o.eval_seed = e.get<int64_t>("seed", 1234);
  o.eval_draws = e.get<int64_t>("draws", 1);
  if (o.eval_draws < 1) e.fail("draws", "expected a positive integer (mask draws per window)");
  o.eval_final_draws = e.get<int64_t>("final_draws", o.eval_draws);
  if (o.eval_final_draws < 1) {
    e.fail("final_draws", "expected a positive integer (mask draws per window, last evaluation)");
  }
  o.eval_exact = e.get_choice<bool>("masking", {{"bernoulli", false}, {"exact", true}}, false);
  if (o.eval_exact && o.objective->validation_block() > 0) {
    e.fail("masking", "'exact' is the masked-diffusion bound's l-form; the block objective's "
                      "validation bound draws one t per block (use bernoulli)");
  }
  if (o.eval_every < 0) e.fail("every", "expected >= 0 (0: only at the end)");
  if (o.eval_sequences <= 0) e.fail("sequences", "expected a positive integer");
  if (o.eval_batch_size <= 0) e.fail("batch_size", "expected a positive integer");
  ConfigNode dist = recipe.section("dist");
  const double bucket_mb = dist.get<double>("bucket_mb", 25.0);
  if (!(bucket_mb > 0)) dist.fail("bucket_mb", "expected a positive size in MiB");
  o.bucket_bytes = static_cast<int64_t>(bucket_mb * (1 << 20));
  o.dist_timeout_s = dist.get<double>("timeout_s", 300.0);
  if (!(o.dist_timeout_s > 0)) dist.fail("timeout_s", "expected a positive number of seconds");
  o.expert_parallel = dist.get<int64_t>("expert_parallel", 1);
  if (o.expert_parallel < 1) {
    dist.fail("expert_parallel", "expected a positive integer (1: every rank holds every expert)");
  }
  const std::string balance = dist.get<std::string>("ep_balance", "none");
  if (balance == "least_loaded" && o.expert_parallel == 1) {
    dist.fail("ep_balance", "least_loaded balances expert-parallel ranks: it needs "
                            "dist.expert_parallel > 1");
  }
  if (balance == "least_loaded") {
    ConfigNode l = dist.section("llep");
    LlepOptions lo;
    lo.threshold = l.get<double>("threshold", lo.threshold);
    lo.capacity = l.get<double>("capacity", lo.capacity);
    lo.min_chunk = l.get<int64_t>("min_chunk", lo.min_chunk);
    if (!(lo.threshold >= 1)) l.fail("threshold", "expected a ratio >= 1 (max rank load / mean)");
    if (!(lo.capacity >= 1)) l.fail("capacity", "expected a factor >= 1 of the mean rank load");
    if (lo.min_chunk < 1) l.fail("min_chunk", "expected a positive number of rows");
    o.llep = lo;
  } else if (balance != "none") {
    dist.fail("ep_balance", str("expected none or least_loaded, got '", balance, "'"));
  }
  o.shard_optimizer = dist.get<bool>("shard_optimizer", false);
  return o;
}

// Read here, with the recipe checks, because every recipe with an `upcycle:` section is validated
// when it is read; `mixdiff upcycle` (src/app/upcycle.cpp) uses it.
UpcycleOptions UpcycleOptions::from(const ConfigNode& c) {
  UpcycleOptions o;
  o.selection = c.get<std::string>("selection", "uniform");
  if (o.selection != "uniform" && o.selection != "utility") {
    c.fail("selection", "expected uniform or utility, got '" + o.selection + "'");
  }
  o.metric = c.get<std::string>("metric", "weight_norm");
  if (o.metric != "weight_norm" && o.metric != "gradient_squared" &&
      o.metric != "weight_grad_product" && o.metric != "approx_fisher") {
    c.fail("metric", "expected weight_norm, gradient_squared, weight_grad_product or "
                     "approx_fisher, got '" + o.metric + "'");
  }
  o.max_duplicates = c.get<int64_t>("max_duplicates", 3);
  if (o.max_duplicates < 1) c.fail("max_duplicates", "expected at least 1");
  o.utility_batches = c.get<int64_t>("utility_batches", 4);
  if (o.utility_batches < 1) c.fail("utility_batches", "expected at least 1");
  o.copies = c.get<std::string>("copies", "dormant");
  if (o.copies != "dormant" && o.copies != "paper") {
    c.fail("copies", "expected dormant or paper, got '" + o.copies + "'");
  }
  o.dormant_margin = c.get<double>("dormant_margin", 10.0);
  if (!(o.dormant_margin > 0)) c.fail("dormant_margin", "expected a positive margin");
  o.optimizer = c.get<std::string>("optimizer", "copy");
  if (o.optimizer != "copy" && o.optimizer != "reset") {
    c.fail("optimizer", "expected copy or reset, got '" + o.optimizer + "'");
  }
  o.reset_step = c.get<bool>("reset_step", false);
  o.seed = c.get<int64_t>("seed", 0);
  return o;
}

DiffusionBatch to_device(const DiffusionBatch& b, const at::Device& device) {
  DiffusionBatch o = b;
  for (at::Tensor* t : {&o.x0_BL, &o.xt_BL, &o.masked_BL, &o.t_B, &o.t_BL, &o.p_B, &o.index_M,
                        &o.target_M, &o.weight_M, &o.row_M, &o.response_len_B}) {
    if (t->defined()) *t = t->to(device);
  }
  return o;
}

at::Device parse_device(const ConfigNode& runtime) {
  const std::string d = runtime.get<std::string>("device", "cpu");
  at::Device dev(at::kCPU);
  try {
    dev = at::Device(d);
  } catch (const std::exception&) {
    runtime.fail("device", str("expected cpu, cuda or cuda:N, got '", d, "'"));
  }
  if (!dev.is_cpu() && !dev.is_cuda()) runtime.fail("device", str("expected cpu or cuda, got '", d, "'"));
  if (dev.is_cuda() && !dev.has_index()) dev = at::Device(at::kCUDA, 0);  // compares equal to tensors' cuda:0
  if (dev.is_cuda() && !compat::cuda_available()) {
    runtime.fail("device", str("is ", d, " but this build (LibTorch ", compat::torch_version(),
                               ") sees no CUDA device; build with tools/build_cuda.sh on a GPU "
                               "machine"));
  }
  return dev;
}

at::ScalarType parse_dtype(const ConfigNode& runtime, const at::Device& device) {
  const std::string t = runtime.get<std::string>("dtype", "fp32");
  if (t == "fp32") return at::kFloat;
  if (t == "bf16") {
    if (!device.is_cuda()) runtime.fail("dtype", "bf16 autocast needs runtime.device: cuda (CPU runs are fp32)");
    return at::kBFloat16;
  }
  runtime.fail("dtype", str("expected fp32 or bf16, got '", t, "'"));
  return at::kFloat;
}

TrainerParts build_trainer_parts(const ConfigNode& recipe, std::unique_ptr<DataSource> data) {
  TrainerParts p;
  p.name = recipe.get<std::string>("name");
  if (p.name.empty() || p.name.find('/') != std::string::npos) {
    recipe.fail("name", "expected a non-empty run name without '/'");
  }
  p.seed = recipe.get<int64_t>("seed", 0);
  const int64_t threads = recipe.section("runtime").get<int64_t>("threads", 1);
  if (threads <= 0) recipe.at("runtime").fail("threads", "expected a positive integer");
  torch::set_num_threads(static_cast<int>(threads));

  p.data = data ? std::move(data) : build_data_source(recipe.at("data"));
  ConfigNode model_cfg = recipe.at("model");
  if (!model_cfg.has("vocab_size")) {
    model_cfg.set<int64_t>("vocab_size", p.data->vocab_size());
  } else if (model_cfg.get<int64_t>("vocab_size") != p.data->vocab_size()) {
    model_cfg.fail("vocab_size", str("is ", model_cfg.get<int64_t>("vocab_size"),
                                     " but the data's tokenizer has ", p.data->vocab_size(),
                                     " tokens (leave it out to take it from the data)"));
  }
  torch::manual_seed(static_cast<uint64_t>(p.seed));
  p.model = build_model(model_cfg);
  if (p.data->seq_len() > p.model->max_seq_len()) {
    recipe.at("data").fail("seq_len", str(p.data->seq_len(), " exceeds model.max_seq_len ",
                                          p.model->max_seq_len()));
  }

  ConfigNode diffusion = recipe.section("diffusion");
  ConfigNode sched = diffusion.at("schedule");
  p.schedule = schedules_registry().create(sched.get<std::string>("kind"), sched.path() + ".kind",
                                           sched);
  ConfigNode losses = recipe.at("losses");
  if (!losses.is_sequence() || losses.size() == 0) {
    recipe.fail("losses", "expected a non-empty list of {kind: ..., weight: ...}");
  }
  // A `losses` entry names a diffusion loss (registry `losses`) or a routing loss (registry
  // `routing_losses`); routing losses go to every MoE layer, which computes and attaches them in
  // its forward, after each checks that it can train the layer's router.
  std::vector<WeightedRoutingLoss> routing;
  for (size_t i = 0; i < losses.size(); ++i) {
    ConfigNode l = losses[i];
    WeightedLoss w;
    w.name = l.get<std::string>("kind");
    w.weight = l.get<double>("weight", 1.0);
    w.routing = routing_losses_registry().contains(w.name);
    if (!w.routing) {
      if (!losses_registry().contains(w.name)) {
        std::string known;
        for (const auto& n : losses_registry().names()) known += (known.empty() ? "" : ", ") + n;
        for (const auto& n : routing_losses_registry().names()) known += ", " + n;
        l.fail("kind", str("unknown loss '", w.name, "' (known: ", known, ")"));
      }
      w.term = losses_registry().create(w.name, l.path() + ".kind", l);
      p.losses.push_back(std::move(w));
      continue;
    }
    auto term = routing_losses_registry().create(w.name, l.path() + ".kind", l);
    if (p.model->moe_layers().empty()) {
      l.fail("kind", str("'", w.name, "' is a routing loss, but the model (",
                         model_cfg.get<std::string>("kind"), ") has no MoE layers"));
    }
    for (MoeLayer* layer : p.model->moe_layers()) {
      const std::string why = term->refuses(layer->router());
      if (!why.empty()) l.fail("kind", why);
    }
    routing.push_back({w.name, w.weight, term});
    p.losses.push_back(std::move(w));
  }
  if (std::none_of(p.losses.begin(), p.losses.end(), [](const WeightedLoss& w) { return !w.routing; })) {
    recipe.fail("losses", "expected a diffusion loss (masked_diffusion_elbo or masked_ce) besides "
                          "the routing losses");
  }
  for (MoeLayer* l : p.model->moe_layers()) l->set_aux_losses(routing);

  p.options = TrainOptions::from(recipe);
  if (const std::string why = p.options.objective->refuses(*p.model); !why.empty()) {
    recipe.at("diffusion").fail("objective", why);
  }
  if (p.options.objective->validation_block() > 0 && p.data->val_response(1).defined()) {
    recipe.at("diffusion").fail("objective", "prompt/response (SFT) data trains with the masked "
                                             "objective; block diffusion SFT is not implemented");
  }
  if (const std::string why = p.model->set_activation_checkpointing(p.options.activation_checkpointing);
      !why.empty()) {
    recipe.at("train").fail(why.rfind("every_k", 0) == 0 ? "activation_checkpointing_every"
                                                         : "activation_checkpointing",
                            why);
  }
  if (recipe.has("upcycle")) UpcycleOptions::from(recipe.at("upcycle"));
  if (recipe.has("init")) {
    ConfigNode init = recipe.at("init");
    p.init_checkpoint = init.get<std::string>("checkpoint");
    p.init_routers = init.get<std::string>("routers", "keep");
    if (p.init_routers != "keep" && p.init_routers != "fresh") {
      init.fail("routers", "expected keep or fresh, got '" + p.init_routers + "'");
    }
    // A missing checkpoint fails before training; an empty name means none (a sweep's switch).
    if (!p.init_checkpoint.empty()) resolve_checkpoint(p.init_checkpoint);
  }
  // runtime.device / runtime.dtype: parameters live on the device (fp32 master weights); the
  // forward runs under autocast to dtype on CUDA; noise and data are drawn on the CPU and moved,
  // so that a run's masks do not depend on the device.
  ConfigNode rt = recipe.section("runtime");
  p.device = parse_device(rt);
  p.dtype = parse_dtype(rt, p.device);
  p.model->to(p.device);
  ConfigNode optim = recipe.at("optim");
  p.optimizer = optimizers_registry().create(optim.get<std::string>("kind"), optim.path() + ".kind",
                                             optim, *p.model);
  p.base_lr = optim.get<double>("lr");
  ConfigNode lrs = recipe.section("lr_schedule");
  p.lr_schedule = lr_schedules_registry().create(lrs.get<std::string>("kind", "warmup_cosine"),
                                                 lrs.path() + ".kind", lrs, p.options.steps);
  return p;
}

Trainer::Trainer(TrainerParts parts, std::string run_dir, std::string recipe_yaml)
    : parts_(std::move(parts)),
      dp_(parts_.dp),
      run_dir_(std::move(run_dir)),
      recipe_yaml_(std::move(recipe_yaml)) {
  domains_ = parts_.data->domains();
  telemetry_ = observe_layers<RoutingTelemetry>(parts_.model->moe_layers(),
                                                static_cast<int64_t>(domains_.size()));
}

Trainer::~Trainer() { unobserve_layers(parts_.model->moe_layers(), telemetry_); }

void Trainer::setup_parallel() {
  if (parallel_ready_) return;
  parallel_ready_ = true;
  auto& model = *parts_.model;
  const int64_t N = parts_.options.expert_parallel;
  if (!dp_ || !dp_->active()) {
    if (N > 1) ParallelLayout(1, static_cast<int>(N), 0);  // throws: N does not divide 1
    return;
  }
  // Every rank starts from rank 0's weights and routing state; routing statistics that must
  // agree across ranks (global-batch counts, aux-free bias counts) are summed over them.
  dp_->broadcast_state(model);
  for (MoeLayer* l : model.moe_layers()) {
    l->set_reducer(reducer());
    l->set_gatherer(gatherer());
    l->set_rank_scope({dp_->rank(), dp_->world(), reducer(), gatherer()});
  }
  if (N > 1) setup_expert_parallel();
  if (parts_.options.shard_optimizer) setup_sharded_optimizer();
}

void Trainer::setup_sharded_optimizer() {
  auto& model = *parts_.model;
  for (const auto& g : parts_.optimizer->param_groups()) {
    const auto* o = dynamic_cast<const torch::optim::AdamWOptions*>(&g.options());
    if (!o || o->amsgrad()) {
      throw ConfigError("dist.shard_optimizer: shards AdamW's moments; this run's optimizer "
                        "(optim.kind) is not AdamW without amsgrad");
    }
  }
  // The optimizer's parameters, in the model's order (the same on every rank).
  std::unordered_set<const void*> optimized;
  for (const auto& g : parts_.optimizer->param_groups()) {
    for (const auto& p : g.params()) optimized.insert(p.unsafeGetTensorImpl());
  }
  for (const auto& p : model.parameters()) {
    if (p.requires_grad() && !optimized.count(p.unsafeGetTensorImpl())) {
      throw ConfigError("dist.shard_optimizer: a trained parameter is outside the optimizer's "
                        "groups; expected every parameter that requires a gradient to be optimized");
    }
  }
  std::unordered_set<const void*> sharded;
  for (const auto& p : expert_params_) sharded.insert(p.unsafeGetTensorImpl());
  std::vector<at::Tensor> rest, experts;
  for (const auto& p : model.parameters()) {
    if (!optimized.count(p.unsafeGetTensorImpl())) continue;
    (sharded.count(p.unsafeGetTensorImpl()) ? experts : rest).push_back(p);
  }
  const double W = static_cast<double>(dp_->world());
  const int64_t bucket = parts_.options.bucket_bytes;
  zero_ = std::make_unique<ShardedAdamW>(*dp_->group(), rest, *parts_.optimizer, bucket, 1.0 / W);
  zero_->absorb();
  // A replica group of one (dist.expert_parallel = world) has nothing to shard the expert shards
  // over: they keep their moments in the optimizer and the unsharded expert path.
  if (ep_ && !experts.empty() && ep_->replica_group().size() > 1) {
    zero_experts_ = std::make_unique<ShardedAdamW>(ep_->replica_group(), experts,
                                                   *parts_.optimizer, bucket, 1.0 / W);
    zero_experts_->absorb();
  }
  const int64_t owned = moment_elements();
  int64_t total = 0;
  for (const auto& p : rest) total += p.numel();
  for (const auto& p : experts) total += p.numel();
  char mib[96];
  std::snprintf(mib, sizeof mib, "%.2f MiB instead of %.2f", 8.0 * owned / 1048576.0,
                8.0 * total / 1048576.0);
  log(str("sharded optimizer state (ZeRO-1): this rank keeps the AdamW moments of ", owned,
          " of ", total, " parameter elements it holds (", mib, ")"));
}

void Trainer::setup_expert_parallel() {
  auto& model = *parts_.model;
  const int64_t N = parts_.options.expert_parallel;
  const ParallelLayout layout(dp_->world(), static_cast<int>(N), dp_->rank());
  if (model.moe_layers().empty()) {
    throw ConfigError(str("dist.expert_parallel: ", N, " needs MoE layers to shard; model '",
                          model.describe(), "' has none (expected 1 for a dense model)"));
  }
  for (const auto& l : parts_.losses) {
    // ERC's activation matrix pairs every router row with every expert's gate weights, which
    // expert parallelism splits over the ranks.
    if (l.routing && l.name == "erc") {
      throw ConfigError(str("dist.expert_parallel: ", N, " shards the experts, but the routing "
                            "loss 'erc' reads every expert's gate weights in each layer (expected "
                            "dist.expert_parallel: 1 with erc, or losses without erc)"));
    }
  }
  ep_ = std::make_unique<ExpertParallel>(*dp_, layout, parts_.options.llep, parts_.device);
  expert_params_ = ep_->shard(model.moe_layers());
  // A resumed run's moments are whole (checkpoints are layout-independent): keep this rank's rows.
  std::unordered_set<const void*> sharded;
  torch::NoGradGuard ng;
  for (const auto& p : expert_params_) {
    sharded.insert(p.unsafeGetTensorImpl());
    compat::AdamMoments m = compat::adamw_moments(*parts_.optimizer, p);
    if (!m.exp_avg.defined() || m.exp_avg.size(0) == p.size(0)) continue;
    const int64_t first = p.size(0) * layout.ep_rank();
    m.exp_avg = m.exp_avg.narrow(0, first, p.size(0));
    m.exp_avg_sq = m.exp_avg_sq.narrow(0, first, p.size(0));
    compat::set_adamw_moments(*parts_.optimizer, p, m);  // copies the slices
  }
  for (const auto& p : model.parameters()) {
    if (!sharded.count(p.unsafeGetTensorImpl())) replicated_params_.push_back(p);
  }
  const auto moe = model.moe_layers();
  log(str("expert parallel: ", layout.data_parallel(), " data-parallel replicas x ", N,
          " expert-parallel ranks; each rank holds ", moe.front()->pool().n_expert(), " of ",
          moe.front()->pool().global_n_expert(), " routed experts per MoE layer",
          parts_.options.llep ? str("; least-loaded dispatch (threshold ",
                                    format_double(parts_.options.llep->threshold), ", capacity ",
                                    format_double(parts_.options.llep->capacity), ", min chunk ",
                                    parts_.options.llep->min_chunk, ")")
                              : ""));
}

nlohmann::json Trainer::take_parallel_stats(int64_t steps, double seconds) {
  if (!ep_) return {};
  const ExchangeStats s = ep_->take_stats();
  const auto per_rank = gatherer()(torch::tensor(
      {s.seconds, static_cast<double>(s.bytes), static_cast<double>(s.rows),
       static_cast<double>(s.weight_rows)}, torch::kFloat64).view({1, 4}));
  const auto mean = per_rank.mean(0), max = std::get<0>(per_rank.max(0));
  const double n = static_cast<double>(std::max<int64_t>(steps, 1));
  return {{"a2a_s_per_step", mean[0].item<double>() / n},
          {"a2a_s_per_step_max", max[0].item<double>() / n},
          {"a2a_share", seconds > 0 ? mean[0].item<double>() / seconds : 0.0},
          {"a2a_mb_per_step", mean[1].item<double>() / n / 1e6},
          {"rows_per_step_max", max[2].item<double>() / n},
          {"rows_per_step_mean", mean[2].item<double>() / n},
          {"borrowed_experts_per_step", mean[3].item<double>() / n}};
}

int64_t Trainer::moment_elements() const {
  if (zero_) {
    int64_t n = zero_->owned_numel();
    if (zero_experts_) return n + zero_experts_->owned_numel();
    for (const auto& p : expert_params_) n += p.numel();
    return n;
  }
  int64_t n = 0;
  for (const auto& p : parts_.model->parameters()) n += p.numel();
  return n;
}

std::vector<double> Trainer::peak_rss_per_rank() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  const double mb = static_cast<double>(u.ru_maxrss) / 1024.0;
  if (!dp_ || !dp_->active()) return {mb};
  auto all = gatherer()(torch::tensor({mb}, torch::kFloat64)).contiguous();
  return std::vector<double>(all.data_ptr<double>(), all.data_ptr<double>() + all.numel());
}

void Trainer::swap_expert_tensors(bool whole) {
  torch::NoGradGuard ng;
  auto& opt = *parts_.optimizer;
  if (!whole) {
    for (size_t i = 0; i < expert_params_.size(); ++i) {
      at::Tensor& p = expert_params_[i];
      p.set_data(expert_shards_[i]);
      compat::set_adamw_moments(opt, p, {moment_steps_[i], moment_shards_[2 * i],
                                         moment_shards_[2 * i + 1]});
    }
    expert_shards_.clear();
    moment_shards_.clear();
    moment_steps_.clear();
    return;
  }
  // Every parameter has AdamW state after the first step (gradients are defined on every rank
  // after the reduction) or none before it; the gathers below are collective, so check it per
  // parameter, deciding from the group's sums (the same on every rank).
  std::vector<double> has;
  for (const auto& p : expert_params_) {
    has.push_back(compat::adamw_moments(opt, p).exp_avg.defined() ? 1.0 : 0.0);
  }
  const auto all = ep_->sum_over_expert_group(has);
  for (double v : all) {
    if (v != 0 && v != static_cast<double>(ep_->layout().expert_parallel)) {
      throw std::logic_error("expert parallelism: ranks disagree on which experts have optimizer state");
    }
  }
  for (auto& p : expert_params_) {
    expert_shards_.push_back(p.data());
    const compat::AdamMoments m = compat::adamw_moments(opt, p);
    moment_steps_.push_back(m.step);
    moment_shards_.push_back(m.exp_avg.defined() ? m.exp_avg.clone() : at::Tensor());
    moment_shards_.push_back(m.exp_avg_sq.defined() ? m.exp_avg_sq.clone() : at::Tensor());
    p.set_data(ep_->gather(expert_shards_.back()));
    if (m.exp_avg.defined()) {
      compat::set_adamw_moments(opt, p, {m.step, ep_->gather(m.exp_avg), ep_->gather(m.exp_avg_sq)});
    }
  }
}

void Trainer::log(const std::string& line) {
  if (!is_main()) return;
  std::cout << line << std::endl;
  if (run_dir_.empty()) return;
  std::ofstream f(run_dir_ + "/train.log", std::ios::app);
  f << line << "\n";
}

void Trainer::append_metrics(const nlohmann::json& m) {
  if (!is_main()) return;
  std::ofstream f(run_dir_ + "/metrics.jsonl", std::ios::app);
  f << m.dump() << "\n";
  f.flush();
  if (!f) throw InputError(str(run_dir_, "/metrics.jsonl: write failed"));
}

void Trainer::restore(const std::string& ckpt_dir) {
  nlohmann::json s = verify_checkpoint(ckpt_dir);
  load_model_weights(*parts_.model, ckpt_dir + "/model.safetensors");
  if (!fs::exists(ckpt_dir + "/optimizer.pt")) {
    throw CheckpointError(str(ckpt_dir, ": no optimizer.pt; cannot resume training from it"));
  }
  load_optimizer_state(*parts_.optimizer, ckpt_dir + "/optimizer.pt");
  try {
    state_.step = s.at("step").get<int64_t>();
    state_.tokens = s.at("tokens").get<int64_t>();
    state_.data_cursor = s.at("data_cursor").get<int64_t>();
    state_.elapsed_s = s.value("elapsed_s", 0.0);
    state_.last_val_nelbo = s.value("last_val_nelbo", -1.0);
    state_.provenance = s.value("provenance", nlohmann::json());
    if (s.at("seed").get<int64_t>() != parts_.seed) {
      throw CheckpointError(str(ckpt_dir, ": checkpoint was trained with seed ",
                                s.at("seed").get<int64_t>(), ", the recipe says ", parts_.seed));
    }
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(str(ckpt_dir, "/trainer_state.json: ", e.what()));
  }
  // Keep metrics.jsonl equal to what an uninterrupted run writes: drop lines past the checkpoint.
  const std::string mp = run_dir_ + "/metrics.jsonl";
  if (is_main() && fs::exists(mp)) {
    std::ifstream in(mp);
    std::string line, kept;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_discarded() && j.value("step", int64_t(0)) <= state_.step) kept += line + "\n";
    }
    write_file_atomic(mp, kept);
  }
}

void Trainer::initialize_from_checkpoint() {
  if (parts_.init_checkpoint.empty()) return;
  const std::string ckpt = resolve_checkpoint(parts_.init_checkpoint);
  verify_checkpoint(ckpt);
  std::map<std::string, std::string> meta;
  TensorMap src = load_safetensors(ckpt + "/model.safetensors", &meta);
  int64_t copied = 0;
  nlohmann::json fresh = nlohmann::json::array(), dropped = nlohmann::json::array();
  torch::NoGradGuard ng;
  for (auto& kv : model_state(*parts_.model)) {
    const std::string& name = kv.first;
    const bool router = name.find(".router.") != std::string::npos;
    auto it = src.find(name);
    const bool fits = it != src.end() && it->second.sizes() == kv.second.sizes();
    if (fits && !(router && parts_.init_routers == "fresh")) {
      kv.second.copy_(it->second);
      ++copied;
    } else if (router) {
      fresh.push_back(name);
    } else {
      throw CheckpointError(str(ckpt, ": init: the model's tensor '", name, "' ",
                                it == src.end() ? "is missing there" : "has another shape there"));
    }
    if (it != src.end()) src.erase(it);
  }
  for (const auto& kv : src) {
    if (kv.first.find(".router.") == std::string::npos) {
      throw CheckpointError(str(ckpt, ": init: its tensor '", kv.first,
                                "' has no place in this model (recipe and checkpoint differ)"));
    }
    dropped.push_back(kv.first);
  }
  state_.provenance = {{"method", "init"},
                       {"source_checkpoint", fs::absolute(ckpt).string()},
                       {"source_model", meta["model"]},
                       {"source_model_fnv1a64", fnv1a64_file(ckpt + "/model.safetensors")},
                       {"routers", parts_.init_routers},
                       {"copied_tensors", copied},
                       {"fresh_router_tensors", fresh},
                       {"dropped_router_tensors", dropped}};
  log(str("init: ", copied, " tensors from ", ckpt, " (", fresh.size(), " router tensors fresh, ",
          dropped.size(), " dropped)"));
}

StepResult Trainer::run_step(int64_t step, StepTimes* times) {
  auto& model = *parts_.model;
  const auto& o = parts_.options;
  StepResult res;
  // Phase timing for benchmarks: the device is synchronised at each boundary.
  auto mark = std::chrono::steady_clock::now();
  auto lap = [&](double StepTimes::*phase) {
    if (!times) return;
    compat::synchronize(parts_.device);
    const auto now = std::chrono::steady_clock::now();
    times->*phase += std::chrono::duration<double>(now - mark).count();
    mark = now;
  };
  // Data parallelism: rank r of W takes sequences [r B, (r + 1) B) of each global micro-batch of
  // W B sequences, and the rows of the global batch's noise (t, random length, mask uniforms are
  // drawn for the whole global batch from the step's generator), so W ranks reproduce one
  // process with batch W B.
  const int64_t W = world(), r = dp_ ? dp_->rank() : 0, B = o.batch_size;
  double loss_sum = 0;
  const auto moe = model.moe_layers();
  for (MoeLayer* l : moe) l->set_aux_scale(1.0 / static_cast<double>(o.grad_accum));
  for (int64_t m = 0; m < o.grad_accum; ++m) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(
        mix_seed(static_cast<uint64_t>(parts_.seed), static_cast<uint64_t>(step),
                 static_cast<uint64_t>(m)));
    profile::Scope data_scope("data_and_noise");
    auto x0 = parts_.data->train_batch(state_.data_cursor + r * B, B);
    // The tokens' domains, for the routing telemetry (expert specialisation by domain).
    at::Tensor domains = moe.empty() || domains_.empty()
                             ? at::Tensor()
                             : parts_.data->train_domains(state_.data_cursor + r * B, B);
    // Prompt/response data (SFT): only the responses may be masked.
    const at::Tensor response = parts_.data->train_response(state_.data_cursor + r * B, B);
    state_.data_cursor += W * B;
    // LLaDA's random-length truncation is for pre-training windows (it would cut responses).
    if (o.random_length_prob > 0 && torch::rand({1}, gen).item<double>() < o.random_length_prob &&
        !response.defined()) {
      const int64_t len = torch::randint(1, x0.size(1) + 1, {1}, gen).item<int64_t>();
      x0 = x0.narrow(1, 0, len).contiguous();
      if (domains.defined()) domains = domains.narrow(1, 0, len).contiguous();
    }
    DiffusionBatch batch =
        o.objective->noise(x0, *parts_.schedule, model.mask_id(), gen, W, r, response);
    if (!parts_.device.is_cpu()) batch = to_device(batch, parts_.device);
    ModelInput in = o.objective->input(batch, x0.to(parts_.device));
    in.step = step;
    in.micro = m;
    if (domains.defined()) in.domain_BL = domains.to(parts_.device);
    data_scope.stop();
    lap(&StepTimes::data);
    ModelOutput out = [&] {
      profile::Scope sc("forward");
      compat::AutocastGuard ac(parts_.device, parts_.dtype);
      return model.forward(in);
    }();
    if (out.logits.scalar_type() != at::kFloat) out.logits = out.logits.to(at::kFloat);
    at::Tensor total;
    for (auto& l : parts_.losses) {
      if (l.routing) continue;
      auto v = l.term->compute(out, batch) * l.weight;
      total = total.defined() ? total + v : v;
    }
    if (fault::value("nan_loss_at_step") == step + 1) total = total * std::nan("");
    lap(&StepTimes::forward);
    {
      profile::Scope sc("backward");
      (total / static_cast<double>(o.grad_accum)).backward();
    }
    loss_sum += total.item<double>();
    res.tokens += x0.numel() * W;
    lap(&StepTimes::backward);
  }
  profile::Scope opt_scope("optimizer_and_clip");
  const auto params = model.parameters();
  double norm = 0;
  if (zero_) {
    // Sharded optimizer state: each rank reduces and keeps only its pieces of the gradients;
    // every element is owned by one rank of the world, so the norm is a sum over the world.
    double local = zero_->reduce_scatter_gradients();
    if (zero_experts_) local += zero_experts_->reduce_scatter_gradients();
    auto sq = torch::tensor({local}, torch::kFloat64);
    dp_->all_reduce_sum(sq);
    double expert_sq = 0;  // unsharded expert shards (a replica group of one)
    if (ep_ && !zero_experts_) {
      ep_->reduce_expert_gradients(expert_params_, o.bucket_bytes);
      const double b = global_grad_norm(expert_params_);
      expert_sq = ep_->sum_over_expert_group(b * b);
    }
    lap(&StepTimes::backward);
    norm = std::sqrt(sq.item<double>() + expert_sq);
  } else if (ep_) {
    // Replicated tensors are averaged over the world; each expert shard is summed over the ranks
    // that hold it (its tokens from the whole expert group already arrived through the
    // all-to-all backward). The norm adds the replicated part once and every shard once.
    dp_->average_gradients(replicated_params_, o.bucket_bytes);
    ep_->reduce_expert_gradients(expert_params_, o.bucket_bytes);
    lap(&StepTimes::backward);
    const double a = global_grad_norm(replicated_params_), b = global_grad_norm(expert_params_);
    norm = std::sqrt(a * a + ep_->sum_over_expert_group(b * b));
  } else {
    if (dp_) dp_->average_gradients(params, o.bucket_bytes);
    lap(&StepTimes::backward);
    norm = global_grad_norm(params);
  }
  // A non-finite loss or gradient (on any rank) is never applied: the step's gradients are
  // dropped and the caller decides (train.on_nonfinite).
  double bad = std::isfinite(loss_sum) && std::isfinite(norm) ? 0.0 : 1.0;
  if (dp_ && dp_->active()) {
    auto t = torch::tensor({bad}, torch::kFloat64);
    dp_->all_reduce_max(t);
    bad = t.item<double>();
  }
  if (bad != 0) {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    for (MoeLayer* l : moe) l->take_aux_values();
    res.nonfinite = true;
    res.loss = std::isfinite(loss_sum) ? std::nan("") : loss_sum / static_cast<double>(o.grad_accum);
    lap(&StepTimes::optimizer);
    return res;
  }
  const double lr = parts_.base_lr * parts_.lr_schedule->factor(step);
  for (auto& g : parts_.optimizer->param_groups()) g.options().set_lr(lr);
  if (zero_) {
    const double coef = clip_coefficient(o.grad_clip, norm);
    zero_->step(coef);
    if (zero_experts_) zero_experts_->step(coef);
    // Unsharded expert shards: the optimizer steps the parameters that still have gradients
    // (the sharded ones' were dropped by the reduce-scatter).
    if (ep_ && !zero_experts_) clip_step_zero(*parts_.optimizer, expert_params_, o.grad_clip, norm);
  } else {
    clip_step_zero(*parts_.optimizer, params, o.grad_clip, norm);
  }
  res.grad_norm = o.grad_clip > 0 ? norm : std::nan("");
  opt_scope.stop();
  std::vector<double> vals{loss_sum / static_cast<double>(o.grad_accum)};
  for (MoeLayer* l : moe) {
    const auto v = l->take_aux_values();
    if (vals.size() == 1) vals.resize(1 + v.size(), 0.0);
    for (size_t i = 0; i < v.size(); ++i) {
      vals[1 + i] += v[i] / static_cast<double>(o.grad_accum * static_cast<int64_t>(moe.size()));
    }
    l->step_end(reducer());
  }
  if (dp_ && dp_->active()) {  // the logged values are means over ranks
    auto tv = torch::tensor(vals, torch::kFloat64);
    dp_->all_reduce_sum(tv);
    for (size_t i = 0; i < vals.size(); ++i) vals[i] = tv[i].item<double>() / static_cast<double>(W);
  }
  res.aux.assign(vals.begin() + 1, vals.end());
  res.loss = vals[0];
  lap(&StepTimes::optimizer);
  return res;
}

StatReducer Trainer::reducer() const {
  if (!dp_ || !dp_->active()) return {};
  auto dp = dp_;
  return [dp](at::Tensor& t) { dp->all_reduce_sum(t); };
}

StatGatherer Trainer::gatherer() const {
  if (!dp_ || !dp_->active()) return {};
  auto dp = dp_;
  return [dp](const at::Tensor& t) {
    // Every rank passes the same shape: rank r's rows land at [r n, (r + 1) n) of a zero tensor
    // that the sum over ranks then fills.
    auto sizes = t.sizes().vec();
    const int64_t n = sizes.empty() ? 1 : sizes[0];
    if (sizes.empty()) sizes.push_back(1);
    sizes[0] = n * dp->world();
    auto out = torch::zeros(sizes, t.options());
    out.narrow(0, n * dp->rank(), n).copy_(t.reshape(t.dim() == 0 ? at::IntArrayRef{1} : t.sizes()));
    dp->all_reduce_sum(out);
    return out;
  };
}

int64_t Trainer::world() const { return dp_ ? dp_->world() : 1; }

bool Trainer::is_main() const { return !dp_ || dp_->is_main(); }

nlohmann::json Trainer::take_moe_stats() {
  nlohmann::json layers = nlohmann::json::array();
  const auto moe_layers = parts_.model->moe_layers();
  for (size_t i = 0; i < moe_layers.size(); ++i) {
    MoeLayer* l = moe_layers[i];
    nlohmann::json j = telemetry_[i]->take(reducer());
    if (j.is_null()) continue;
    j["layer"] = l->block_index();
    layers.push_back(std::move(j));
  }
  if (layers.empty()) return nlohmann::json();
  nlohmann::json j{{"layers", layers}};
  if (!domains_.empty()) j["domains"] = domains_;
  return j;
}

void Trainer::evaluate(nlohmann::json* metrics) {
  if (!val_seqs_.defined()) {
    val_seqs_ = parts_.data->val_sequences(parts_.options.eval_sequences).to(parts_.device);
    val_response_ = parts_.data->val_response(parts_.options.eval_sequences);
  }
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t draws = state_.step == parts_.options.steps ? parts_.options.eval_final_draws
                                                            : parts_.options.eval_draws;
  if (val_response_.defined()) {
    // Prompt/response data: the held-out pairs' response NELBO per response token (the SFT
    // loss's expectation). Every rank evaluates every pair (the same draws: the same result).
    LoglikOptions lo;
    lo.samples = draws;
    lo.seed = static_cast<uint64_t>(parts_.options.eval_seed);
    lo.batch_size = parts_.options.eval_batch_size;
    const SftValidation v = sft_validation(*parts_.model, val_seqs_, val_response_, lo);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state_.last_val_nelbo = v.nelbo;
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "eval  step %lld | val response nelbo %.4f ± %.4f (s.e.) nats/response token | "
                  "%lld pairs, %lld response tokens x %lld samples | %.1fs",
                  static_cast<long long>(state_.step), v.nelbo, v.se,
                  static_cast<long long>(v.pairs), static_cast<long long>(v.response_tokens),
                  static_cast<long long>(draws), secs);
    log(buf);
    (*metrics)["val_nelbo"] = v.nelbo;
    (*metrics)["val_nelbo_se"] = v.se;
    (*metrics)["val_seconds"] = secs;
    (*metrics)["val_ppl_bound"] = std::exp(v.nelbo);
    return;
  }
  // Ranks share the evaluation batches and add their partial sums: the result does not depend
  // on the number of ranks.
  std::function<void(std::vector<double>&)> sum;
  if (dp_ && dp_->active()) {
    auto dp = dp_;
    sum = [dp](std::vector<double>& v) {
      auto t = torch::tensor(v, torch::kFloat64);
      dp->all_reduce_sum(t);
      std::copy(t.data_ptr<double>(), t.data_ptr<double>() + t.numel(), v.begin());
    };
  }
  NelboResult r = validation_nelbo(*parts_.model, val_seqs_, parts_.options.eval_batch_size,
                                   static_cast<uint64_t>(parts_.options.eval_seed),
                                   dp_ ? dp_->rank() : 0, static_cast<int>(world()), sum,
                                   parts_.options.objective->validation_block(),
                                   /*lockstep=*/ep_ != nullptr, draws,
                                   parts_.options.eval_exact);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  state_.last_val_nelbo = r.nelbo;
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "eval  step %lld | val nelbo %.4f ± %.4f (s.e.) nats/token | ppl <= %.2f | "
                "unigram entropy of these tokens %.4f | %lld tokens x %lld draws | %.1fs",
                static_cast<long long>(state_.step), r.nelbo, r.se, r.ppl_bound,
                r.unigram_entropy, static_cast<long long>(r.tokens),
                static_cast<long long>(r.draws), secs);
  log(buf);
  (*metrics)["val_nelbo"] = r.nelbo;
  (*metrics)["val_nelbo_se"] = r.se;
  (*metrics)["val_seconds"] = secs;
  (*metrics)["val_ppl_bound"] = r.ppl_bound;
  (*metrics)["val_unigram_entropy"] = r.unigram_entropy;
}

std::string Trainer::checkpoint() {
  // Every rank holds the same model; rank 0 writes while the others wait. The replica check
  // (a fingerprint of every parameter and buffer compared across ranks) is recorded.
  // Under expert parallelism the expert shards are gathered first: checkpoints hold whole expert
  // tensors and moments, whatever the layout (a run resumes with any dist.expert_parallel).
  // Sharded optimizer state is gathered whole first, for the same reason.
  // Only rank 0 writes, so only it keeps the replicated parameters' whole moments; the expert
  // shards' are needed whole on every rank of the expert group (swap_expert_tensors gathers them).
  if (zero_) zero_->materialize(is_main());
  if (zero_experts_) zero_experts_->materialize(true);
  if (ep_) swap_expert_tensors(true);
  bool identical = true;
  if (dp_ && dp_->active()) {
    identical = dp_->replicas_identical(*parts_.model);
    if (!identical) log(str("warning: data-parallel replicas differ at step ", state_.step));
  }
  std::string dir;
  if (is_main()) dir = write_checkpoint(identical);
  if (dp_) dp_->barrier();
  if (ep_) swap_expert_tensors(false);
  if (zero_) zero_->release();
  if (zero_experts_) zero_experts_->release();
  return dir.empty() ? resolve_checkpoint(run_dir_) : dir;
}

std::string Trainer::write_checkpoint(bool replicas_identical) {
  CheckpointContent c;
  c.model = parts_.model.get();
  c.optimizer = parts_.optimizer.get();
  c.recipe_yaml = recipe_yaml_;
  c.tokenizer_dir = parts_.data->tokenizer_dir();
  c.trainer_state = {{"tokens", state_.tokens},
                     {"data_cursor", state_.data_cursor},
                     {"seed", parts_.seed},
                     {"rng", {{"scheme", "per-step"},
                              {"detail", "noise of step s, micro-batch m drawn from an mt19937 "
                                         "generator seeded with mix(seed, s, m); data order "
                                         "from data_cursor"}}},
                     {"elapsed_s", state_.elapsed_s},
                     {"last_val_nelbo", state_.last_val_nelbo},
                     {"world_size", world()},
                     {"replicas_identical", replicas_identical}};
  if (!state_.provenance.is_null()) c.trainer_state["provenance"] = state_.provenance;
  return save_checkpoint(run_dir_, state_.step, c, parts_.options.keep_checkpoints);
}

std::vector<double> measured_experts_per_token(const std::string& metrics_path, size_t n_layers) {
  if (n_layers == 0 || !fs::exists(metrics_path)) return {};
  std::vector<double> kept(n_layers, 0.0), tokens(n_layers, 0.0);
  std::ifstream in(metrics_path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("moe") || !j["moe"].contains("layers")) continue;
    const auto& layers = j["moe"]["layers"];
    if (layers.size() != n_layers) continue;  // an interval where some layer routed nothing
    for (size_t i = 0; i < n_layers; ++i) {
      const double t = layers[i].value("tokens", 0.0);
      kept[i] += layers[i].value("experts_per_token", 0.0) * t;
      tokens[i] += t;
    }
  }
  std::vector<double> k(n_layers);
  for (size_t i = 0; i < n_layers; ++i) {
    if (tokens[i] <= 0) return {};
    k[i] = kept[i] / tokens[i];
  }
  return k;
}

void Trainer::write_run_info(const std::vector<double>& measured) {
  if (!is_main()) return;
  auto& model = *parts_.model;
  const auto& o = parts_.options;
  const int64_t L = parts_.data->seq_len();
  // Accounting for sweeps and reports: sizes, training FLOPs per token, tokens per step; the
  // planned counts at the start, the measured ones at the end of an MoE run.
  nlohmann::json info = {
      {"name", parts_.name},
      {"model", model.describe()},
      {"parameters", model.num_parameters()},
      {"active_parameters", model.num_active_parameters(measured)},
      {"train_flops_per_token", model.train_flops_per_token(L, measured)},
      {"seq_len", L},
      {"tokens_per_step", world() * o.batch_size * o.grad_accum * L},
      {"steps", o.steps},
      {"world_size", world()}};
  if (!model.moe_layers().empty()) {
    info["active_parameters_planned"] = model.num_active_parameters();
    info["train_flops_per_token_planned"] = model.train_flops_per_token(L);
    info["experts_per_token_data_dependent"] = model.experts_per_token_data_dependent();
    if (!measured.empty()) {
      info["experts_per_token"] = measured;
      double mean = 0;
      for (double k : measured) mean += k / static_cast<double>(measured.size());
      log(str("accounting: ", format_double(mean), " experts per token measured (mean over MoE "
              "layers) -> ", info["active_parameters"].get<int64_t>(),
              " active parameters, ", info["train_flops_per_token"].get<double>(),
              " training FLOPs per token (planned ", info["active_parameters_planned"].get<int64_t>(),
              ", ", info["train_flops_per_token_planned"].get<double>(), ")"));
    }
  }
  write_file_atomic(run_dir_ + "/run.json", info.dump(2) + "\n");
}

int Trainer::fit() {
  if (run_dir_.empty()) throw std::logic_error("Trainer::fit needs a run folder");
  const auto& o = parts_.options;
  auto& model = *parts_.model;
  model.train();
  if (state_.step >= o.steps) {
    log(str("run already complete at step ", state_.step, " of ", o.steps));
    return 0;
  }
  const int64_t n_params = model.num_parameters(), n_active = model.num_active_parameters();
  log(str("model: ", model.describe(), " | ", n_params, " parameters",
          n_active != n_params ? str(" (", n_active, " active per token)") : ""));
  log(str("data: ", parts_.data->describe()));
  const int64_t tokens_per_step = world() * o.batch_size * o.grad_accum * parts_.data->seq_len();
  log(str("train: ", o.steps, " steps x ", tokens_per_step, " tokens (",
          world() > 1 ? str(world(), " ranks x ") : "", "batch ", o.batch_size, " x accum ",
          o.grad_accum, " x seq ", parts_.data->seq_len(), "), from step ", state_.step));
  write_run_info({});
  setup_parallel();

  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const double elapsed_before = state_.elapsed_s;
  std::vector<std::string> aux_names;
  for (const auto& l : parts_.losses) {
    if (l.routing) aux_names.push_back(l.name);
  }
  MetricsLogger logger(aux_names, o.steps, state_.step);
  int64_t interval_steps = 0;  // steps and their wall time since the last log (EP statistics)
  double interval_s = 0;
  int64_t consecutive_skips = 0;

  while (state_.step < o.steps) {
    const int64_t step = state_.step;
    const auto step_start = clock::now();
    const StepResult r = run_step(step);
    interval_steps += 1;
    interval_s += std::chrono::duration<double>(clock::now() - step_start).count();
    logger.add(r.loss, r.tokens, !r.nonfinite, r.aux,
               (dp_ ? dp_->take_comm_seconds() : 0.0) +
                   (zero_ ? zero_->take_comm_seconds() : 0.0) +
                   (zero_experts_ ? zero_experts_->take_comm_seconds() : 0.0));
    if (r.nonfinite) {
      ++consecutive_skips;
      if (o.on_nonfinite == "stop" || consecutive_skips > o.max_skips) {
        const std::string why = o.on_nonfinite == "stop"
                                    ? std::string("train.on_nonfinite is stop")
                                    : str(consecutive_skips, " steps in a row (train.max_skips ",
                                          o.max_skips, ")");
        // Nothing of the bad step was applied: the weights are those of the last good step.
        const std::string dir = checkpoint();
        log(str("error: non-finite loss or gradient (loss ", r.loss, ") at step ", step + 1, "; ",
                why, "; stopped with a checkpoint of the last good state (step ", state_.step,
                "): ", dir));
        return 3;
      }
      log(str("warning: non-finite loss or gradient (loss ", r.loss, ") at step ", step + 1,
              "; update skipped (", consecutive_skips, " in a row, at most ", o.max_skips, ")"));
    } else {
      consecutive_skips = 0;
    }
    state_.step = step + 1;
    state_.tokens += r.tokens;
    state_.elapsed_s = elapsed_before + std::chrono::duration<double>(clock::now() - start).count();

    const bool last = state_.step == o.steps;
    nlohmann::json metrics;
    if (state_.step % o.log_every == 0 || last) {
      const double lr = parts_.base_lr * parts_.lr_schedule->factor(step);
      MetricsLogger::Record rec =
          logger.take(state_.step, state_.tokens, lr, r.grad_norm, state_.elapsed_s, world());
      log(rec.line);
      metrics = std::move(rec.metrics);
      nlohmann::json moe = take_moe_stats();
      if (!moe.is_null()) metrics["moe"] = moe;
      nlohmann::json ep = take_parallel_stats(interval_steps, interval_s);
      if (!ep.is_null()) metrics["ep"] = ep;
      interval_steps = 0;
      interval_s = 0;
      if (last) {
        const auto rss = peak_rss_per_rank();
        metrics["peak_rss_mb"] = rss;
        std::string line = "memory: peak RSS per rank (MiB):";
        for (double v : rss) {
          char b[32];
          std::snprintf(b, sizeof(b), " %.1f", v);
          line += b;
        }
        log(line);
      }
    }
    if (last || (o.eval_every > 0 && state_.step % o.eval_every == 0)) {
      if (metrics.is_null()) {
        metrics = {{"step", state_.step}, {"tokens", state_.tokens},
                   {"elapsed_s", state_.elapsed_s}};
      }
      // Evaluation's exchanges are not the training steps': set the interval's aside.
      const ExchangeStats before = ep_ ? ep_->take_stats() : ExchangeStats{};
      evaluate(&metrics);
      if (ep_) {
        ep_->take_stats();
        ep_->put_back(before);
      }
      logger.restart_clock();
    }
    if (!metrics.is_null()) append_metrics(metrics);
    // A signal may reach the ranks at different steps: they agree on the largest.
    int sig = g_stop_signal.load();
    if (dp_ && dp_->active()) {
      auto t = torch::tensor({static_cast<double>(sig)}, torch::kFloat64);
      dp_->all_reduce_max(t);
      sig = static_cast<int>(t.item<double>());
    }
    if (last || sig != 0 || (o.ckpt_every > 0 && state_.step % o.ckpt_every == 0)) {
      const std::string dir = checkpoint();
      log(str("checkpoint: ", dir));
      logger.restart_clock();
    }
    if (last && is_main()) {
      // Accounting from what the routers did: the run's mean experts per token (top-p, null
      // experts and capacity drops make it differ from the planned count).
      const auto k = measured_experts_per_token(run_dir_ + "/metrics.jsonl",
                                                model.moe_layers().size());
      if (!k.empty()) write_run_info(k);
      try {
        log(str("report: ", write_report(run_dir_)));
      } catch (const std::exception& e) {
        log(str("warning: report not written: ", e.what()));
      }
    }
    if (sig != 0 && !last) {
      log(str("stopped by signal ", sig, " at step ", state_.step, "; resume with: mixdiff train --resume ",
              run_dir_));
      return 128 + sig;
    }
  }
  return 0;
}

}  // namespace mixdiff
