// Block diffusion and block-routed inference: BD3's training mask on a hand-written case, the
// KV-cached block forward against the full forward, cached decoding against uncached decoding,
// block routing policies whose coreset holds every expert against token-level routing, and the
// unique-expert counter on hand-made routings.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/errors.h"
#include "infer/sampler.h"
#include "model/model.h"
#include "moe/block_routing.h"
#include "moe/moe_layer.h"
#include "moe/observers.h"
#include "support/support.h"
#include "train/checkpoint.h"

namespace mixdiff {
namespace {

TEST(UnitBlock, Bd3MaskMatchesTheHandWrittenCase) {
  // L = 4, blocks of 2: noisy tokens n0..n3, clean tokens c0..c3.
  //        n0 n1 n2 n3 c0 c1 c2 c3
  const int allowed[8][8] = {{1, 1, 0, 0, 0, 0, 0, 0},   // n0: its noisy block
                             {1, 1, 0, 0, 0, 0, 0, 0},   // n1
                             {0, 0, 1, 1, 1, 1, 0, 0},   // n2: its noisy block + clean block 0
                             {0, 0, 1, 1, 1, 1, 0, 0},   // n3
                             {0, 0, 0, 0, 1, 1, 0, 0},   // c0: clean, block-causal
                             {0, 0, 0, 0, 1, 1, 0, 0},   // c1
                             {0, 0, 0, 0, 1, 1, 1, 1},   // c2
                             {0, 0, 0, 0, 1, 1, 1, 1}};  // c3
  auto bias = bd3_training_bias(4, 2);
  for (int q = 0; q < 8; ++q) {
    for (int k = 0; k < 8; ++k) {
      EXPECT_EQ(bias[q][k].item<float>() == 0.0f, allowed[q][k] == 1) << q << "," << k;
    }
  }
}

std::shared_ptr<ModelBase> tiny(const std::string& extra) {
  ConfigNode c = ConfigNode::from_string(
      "{kind: dense_dlm, vocab_size: 40, d_model: 16, n_layer: 2, n_head: 2, n_kv_head: 1, "
      "max_seq_len: 32, attention: block_causal, block_size: 4" + extra + "}",
      "m.yaml");
  torch::manual_seed(0);
  auto m = build_model(c);
  m->eval();
  return m;
}

TEST(ComponentBlock, KvCachedBlockForwardEqualsTheFullForward) {
  torch::NoGradGuard ng;
  auto m = tiny("");
  auto x = torch::randint(0, 41, {2, 12});
  auto full = m->forward(ModelInput(x)).logits;  // [2, 12, V]
  KVCache kv;
  ModelInput prefill(x.narrow(1, 0, 8));
  prefill.cache = &kv;
  prefill.cache_append = true;
  m->forward(prefill);
  EXPECT_EQ(kv.length(), 8);
  ModelInput blk(x.narrow(1, 8, 4).contiguous());
  blk.cache = &kv;
  auto cached = m->forward(blk).logits;
  EXPECT_LT((cached - full.narrow(1, 8, 4)).abs().max().item<double>(), 1e-5);
  EXPECT_EQ(kv.length(), 8);  // a read-only step does not grow the cache
  // Left padding is hidden from attention: a padded row equals the unpadded one.
  auto padded = torch::cat({torch::zeros({1, 4}, torch::kLong), x.narrow(0, 0, 1).narrow(1, 0, 8)}, 1);
  ModelInput pin(padded);
  pin.valid_BL = torch::cat({torch::zeros({1, 4}, torch::kBool), torch::ones({1, 8}, torch::kBool)}, 1);
  pin.positions_L = torch::cat({torch::zeros({4}, torch::kLong), torch::arange(8, torch::kLong)});
  auto lp = m->forward(pin).logits.narrow(1, 4, 8);
  EXPECT_TRUE(torch::isfinite(lp).all().item<bool>());
}

TEST(ComponentBlock, CachedBlockDecodingEqualsUncachedDecoding) {
  auto m = tiny("");
  auto prompt = torch::randint(0, 40, {2, 6});
  std::vector<std::vector<int64_t>> outs;
  for (const char* cache : {"auto", "none"}) {
    ConfigNode c = ConfigNode::from_string(
        std::string("{kind: block_diffusion, gen_length: 12, block_length: 4, steps: 4, "
                    "threshold: 0.5, cache: ") + cache + "}",
        "s.yaml");
    auto s = samplers_registry().create("block_diffusion", "", c);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
    auto r = s->generate(*m, prompt, gen);
    EXPECT_FALSE((r.tokens_BL == m->mask_id()).any().item<bool>());
    auto flat = r.tokens_BL.reshape({-1});
    outs.emplace_back(flat.data_ptr<int64_t>(), flat.data_ptr<int64_t>() + flat.numel());
  }
  EXPECT_EQ(outs[0], outs[1]);
  // The block length must be the model's.
  ConfigNode bad = ConfigNode::from_string("{kind: block_diffusion, gen_length: 12, block_length: 6, steps: 6}", "s");
  auto s = samplers_registry().create("block_diffusion", "", bad);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  EXPECT_THROW(s->generate(*m, prompt, gen), InputError);
}

TEST(UnitBlock, PoliciesWhoseCoresetHoldsEveryExpertEqualTokenLevelRouting) {
  const int64_t E = 8;
  const char* policies[] = {"{kind: dmoe, p: 1.0, guard: 8}", "{kind: des_vote, budget: 8}",
                            "{kind: des_seq, k_prime: 8}", "{kind: admission, capacity: 8}",
                            "{kind: interval, tau: 2, budget: 8}"};
  ConfigNode mc = ConfigNode::from_string(
      "{kind: moe_dlm, vocab_size: 40, d_model: 16, n_layer: 2, n_head: 2, max_seq_len: 32, "
      "moe: {n_expert: 8, d_expert: 8, router: {kind: token_choice, top_k: 2, score: sigmoid}}}",
      "m.yaml");
  torch::manual_seed(1);
  auto m = build_model(mc);
  m->eval();
  torch::NoGradGuard ng;
  auto x = torch::randint(0, 41, {2, 16});
  auto base = m->forward(ModelInput(x)).logits;
  for (const char* p : policies) {
    SCOPED_TRACE(p);
    auto cfg = BlockRoutingConfig::from(ConfigNode::from_string(p, "p.yaml"));
    m->set_block_routing(cfg.policy, 4);
    EXPECT_LT((m->forward(ModelInput(x)).logits - base).abs().max().item<double>(), 1e-6);
  }
  // A tight coreset changes routing: at most `budget` experts per block.
  auto tight = BlockRoutingConfig::from(ConfigNode::from_string("{kind: des_vote, budget: 2}", "p"));
  m->set_block_routing(tight.policy, 4);
  const auto counters = observe_layers<UniqueExpertCounter>(m->moe_layers());
  m->forward(ModelInput(x));
  for (const auto& c : counters) {
    auto u = c->take();
    EXPECT_EQ(u.blocks, 8);                 // 2 rows x 4 blocks
    EXPECT_LE(u.sum / u.blocks, 2.0 + 1e-9);
  }
  m->set_block_routing(nullptr, 0);
  EXPECT_LT((m->forward(ModelInput(x)).logits - base).abs().max().item<double>(), 1e-6);
  (void)E;
}

TEST(UnitBlock, UniqueExpertsOnHandMadeRoutings) {
  // Two blocks: block 0 (tokens 0, 1) uses experts {1, 3}; block 1 (tokens 2, 3) uses {0, 1, 2}.
  auto block = torch::tensor({0, 0, 1, 1}, torch::kLong);
  auto tok = torch::tensor({0, 0, 1, 1, 2, 2, 3, 3}, torch::kLong);
  auto ex = torch::tensor({1, 3, 3, 1, 0, 1, 2, 1}, torch::kLong);
  auto [sum, blocks] = unique_experts_per_block(block, tok, ex, 4, {});
  EXPECT_EQ(blocks, 2);
  EXPECT_EQ(sum, 5.0);  // 2 + 3
  auto valid = torch::tensor({1, 1, 0, 0}, torch::kBool);
  auto [s2, b2] = unique_experts_per_block(block, tok.narrow(0, 0, 4), ex.narrow(0, 0, 4), 4, valid);
  EXPECT_EQ(b2, 1);
  EXPECT_EQ(s2, 2.0);
}

// ---- decoding conventions: caches, batches, interval refresh, block alignment ----

std::shared_ptr<ModelBase> model_of(const std::string& yaml, uint64_t seed = 0) {
  torch::manual_seed(seed);
  auto m = build_model(ConfigNode::from_string(yaml, "m.yaml"));
  m->eval();
  return m;
}

// init_std 0.3 spreads the logits of an untrained model, so that greedy decisions are not
// near-ties that rounding could flip.
const char* kBidir =
    "{kind: dense_dlm, vocab_size: 40, d_model: 32, n_layer: 2, n_head: 2, max_seq_len: 64, "
    "init_std: 0.3}";
const char* kBlockCausal =
    "{kind: dense_dlm, vocab_size: 40, d_model: 32, n_layer: 2, n_head: 2, max_seq_len: 64, "
    "init_std: 0.3, attention: block_causal, block_size: 8}";
const char* kMoeBlockRouted =
    "{kind: moe_dlm, vocab_size: 40, d_model: 32, n_layer: 2, n_head: 2, max_seq_len: 64, "
    "init_std: 0.3, moe: {n_expert: 8, d_expert: 16, router: {kind: token_choice, top_k: 2}, "
    "block_routing: {kind: dmoe, p: 0.3, guard: 2, block_size: 8}}}";

std::shared_ptr<SamplerBase> make_sampler(const std::string& yaml) {
  ConfigNode c = ConfigNode::from_string(yaml, "s.yaml");
  auto s = samplers_registry().create(c.get<std::string>("kind"), "kind", c);
  c.check_unknown_keys();
  return s;
}

SampleResult decode(ModelBase& m, SamplerBase& s, const at::Tensor& prompt,
                    const at::Tensor& valid = {}) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  return valid.defined() ? s.generate_padded(m, prompt, valid, gen) : s.generate(m, prompt, gen);
}

TEST(ComponentDecode, FastDllmCachesRefreshedEveryStepEqualUncachedDecoding) {
  auto m = model_of(kBidir);
  auto prompt = torch::randint(0, 40, {2, 7});
  const std::string base =
      "{kind: block_diffusion, gen_length: 20, block_length: 8, steps: 8, threshold: 0.3, ";
  auto none = decode(*m, *make_sampler(base + "cache: none}"), prompt);
  for (const char* c : {"prefix", "dual"}) {
    SCOPED_TRACE(c);
    auto every = decode(*m, *make_sampler(base + "cache: " + c + ", refresh_every: 1}"), prompt);
    EXPECT_TRUE(torch::equal(every.tokens_BL, none.tokens_BL));
    EXPECT_EQ(every.forwards, none.forwards);
    // Refreshed once per block (Fast-dLLM): the same number of forwards, most of them cheap.
    auto cached = decode(*m, *make_sampler(base + "cache: " + c + "}"), prompt);
    EXPECT_FALSE((cached.tokens_BL == m->mask_id()).any().item<bool>());
    EXPECT_TRUE(torch::equal(cached.tokens_BL.narrow(1, 0, 7), prompt));
  }
}

TEST(ComponentDecode, PrefixCacheHoldsTheFullForwardsKeysOfThePrefix) {
  // Fast-dLLM's prefix cache comes from a forward of the whole sequence (prompt, block and masked
  // suffix), not from the prefix alone: in a bidirectional model the two differ.
  torch::NoGradGuard ng;
  auto m = model_of(kBidir);
  auto x = torch::randint(0, 40, {1, 16});
  KVCache full, alone;
  ModelInput a(x);
  a.cache = &full;
  a.cache_append = true;
  m->forward(a);
  full.truncate(8);
  ModelInput b(x.narrow(1, 0, 8));
  b.cache = &alone;
  b.cache_append = true;
  m->forward(b);
  ASSERT_EQ(full.length(), 8);
  EXPECT_GT((full.layers[1].k - alone.layers[1].k).abs().max().item<double>(), 1e-4);
  // A step against the truncated cache equals a full forward's logits at those positions when
  // the cached keys are exact: here the tokens did not change since the cache was built.
  auto ref = m->forward(ModelInput(x)).logits.narrow(1, 8, 8);
  ModelInput step(x.narrow(1, 8, 8));
  step.cache = &full;
  EXPECT_LT((m->forward(step).logits - ref).abs().max().item<double>(), 1e-5);
  // Dual cache: the block's fresh keys in place of its cached ones, the suffix kept.
  KVCache dual;
  ModelInput d(x);
  d.cache = &dual;
  d.cache_append = true;
  m->forward(d);
  ModelInput blk(x.narrow(1, 4, 4));
  blk.cache = &dual;
  blk.cache_at = 4;
  EXPECT_LT((m->forward(blk).logits - m->forward(ModelInput(x)).logits.narrow(1, 4, 4))
                .abs().max().item<double>(), 1e-5);
  EXPECT_EQ(dual.length(), 16);  // read-only
}

TEST(ComponentDecode, APromptDecodesTheSameAloneAndInAPaddedBatch) {
  // Eight prompts of 3..10 tokens, left-padded to 10 in one batch, against each decoded alone:
  // the same greedy tokens for every sampler and cache mode.
  torch::manual_seed(5);
  std::vector<at::Tensor> prompts;
  const int64_t P = 10, N = 8;
  auto batch = torch::zeros({N, P}, torch::kLong);
  auto valid = torch::zeros({N, P}, torch::kBool);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t len = 3 + i;
    prompts.push_back(torch::randint(0, 40, {1, len}));
    batch[i].narrow(0, P - len, len).copy_(prompts.back()[0]);
    valid[i].narrow(0, P - len, len).fill_(true);
  }
  struct Case {
    const char* model;
    const char* sampler;
  } cases[] = {
      {kBidir, "{kind: llada, gen_length: 16, steps: 16, block_length: 8}"},
      {kBidir, "{kind: confidence_threshold, gen_length: 16, block_length: 8, threshold: 0.3}"},
      {kBidir, "{kind: block_diffusion, gen_length: 16, block_length: 8, threshold: 0.3, cache: none}"},
      {kBidir, "{kind: block_diffusion, gen_length: 16, block_length: 8, threshold: 0.3, cache: prefix}"},
      {kBidir, "{kind: block_diffusion, gen_length: 16, block_length: 8, threshold: 0.3, cache: dual}"},
      {kBlockCausal, "{kind: block_diffusion, gen_length: 16, block_length: 8, threshold: 0.3}"},
      {kBlockCausal, "{kind: block_diffusion, gen_length: 16, block_length: 8, cache: none}"},
      {kMoeBlockRouted, "{kind: llada, gen_length: 16, steps: 16, block_length: 8}"},
      {kMoeBlockRouted, "{kind: block_diffusion, gen_length: 16, block_length: 8, threshold: 0.3, cache: dual}"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.model) + " " + c.sampler);
    auto m = model_of(c.model);
    auto s = make_sampler(c.sampler);
    auto together = decode(*m, *s, batch, valid).tokens_BL;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t len = prompts[i].size(1);
      auto alone = decode(*m, *s, prompts[i]).tokens_BL;
      EXPECT_TRUE(torch::equal(alone.narrow(1, len, 16)[0], together[i].narrow(0, P, 16)))
          << "prompt " << i << ": alone " << alone.narrow(1, len, 16) << " in the batch "
          << together[i].narrow(0, P, 16);
    }
  }
}

// Forwards every call to a policy and records, per call, the denoising step, the block ids and
// each block's allowed experts.
class RecordingPolicy : public BlockRoutingPolicy {
 public:
  explicit RecordingPolicy(std::shared_ptr<BlockRoutingPolicy> inner) : inner_(std::move(inner)) {}
  struct Call {
    int64_t layer = 0, step = 0;
    at::Tensor block_T, allowed_TS;
  };
  at::Tensor allowed(const BlockRoutingInput& in) override {
    auto a = inner_->allowed(in);
    calls.push_back({in.layer, in.step, in.block_T.clone(), a.clone()});
    return a;
  }
  void reset() override { inner_->reset(); }
  std::string describe() const override { return "recording " + inner_->describe(); }
  std::vector<Call> calls;

 private:
  std::shared_ptr<BlockRoutingPolicy> inner_;
};

std::shared_ptr<RecordingPolicy> recording(const std::string& yaml) {
  return std::make_shared<RecordingPolicy>(
      BlockRoutingConfig::from(ConfigNode::from_string(yaml, "p.yaml")).policy);
}

const char* kMoe8 =
    "{kind: moe_dlm, vocab_size: 40, d_model: 32, n_layer: 2, n_head: 2, max_seq_len: 64, "
    "init_std: 0.3, moe: {n_expert: 8, d_expert: 16, router: {kind: token_choice, top_k: 2}}}";

TEST(ComponentDecode, IntervalRefreshKeepsABlocksExpertsForTauSteps) {
  auto m = model_of(kMoe8);
  auto prompt = torch::randint(0, 40, {1, 5});
  auto s = make_sampler("{kind: llada, gen_length: 16, steps: 16, block_length: 8}");
  auto rec = recording("{kind: interval, tau: 4, budget: 2}");
  m->set_block_routing(rec, 8);
  decode(*m, *s, prompt);
  // Per (layer, block): the sets of consecutive forwards may differ only at steps 0, 4, ...
  std::map<std::pair<int64_t, int64_t>, at::Tensor> last;
  std::set<int64_t> steps;
  int64_t changes = 0;
  for (const auto& c : rec->calls) {
    steps.insert(c.step);
    auto [ids, inv] = block_index(c.block_T);
    for (int64_t b = 0; b < ids.size(0); ++b) {
      const auto first = (inv == b).nonzero()[0][0].item<int64_t>();
      auto set = c.allowed_TS[first];
      const auto key = std::make_pair(c.layer, ids[b].item<int64_t>());
      auto it = last.find(key);
      if (it != last.end() && !torch::equal(it->second, set)) {
        ++changes;
        EXPECT_EQ(c.step % 4, 0) << "layer " << c.layer << " block " << key.second;
      }
      last[key] = set;
    }
  }
  // Every forward carries its step inside the block: 0..7 for 8 steps per block.
  EXPECT_EQ(steps, (std::set<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  // tau 1 with gate votes is DES-Vote on every forward: the same sets and the same tokens.
  auto a = recording("{kind: interval, tau: 1, budget: 2, vote: gate}");
  m->set_block_routing(a, 8);
  auto ta = decode(*m, *s, prompt).tokens_BL;
  auto b = recording("{kind: des_vote, budget: 2}");
  m->set_block_routing(b, 8);
  auto tb = decode(*m, *s, prompt).tokens_BL;
  EXPECT_TRUE(torch::equal(ta, tb));
  ASSERT_EQ(a->calls.size(), b->calls.size());
  for (size_t i = 0; i < a->calls.size(); ++i) {
    EXPECT_TRUE(torch::equal(a->calls[i].allowed_TS, b->calls[i].allowed_TS)) << "call " << i;
  }
  m->set_block_routing(nullptr, 0);
}

// Runs a model and records each forward's input tokens and logits.
class SpyModel : public ModelBase {
 public:
  explicit SpyModel(std::shared_ptr<ModelBase> inner)
      : inner_(register_module("inner", inner)),
        last(observe_layers<LastRouting>(inner_->moe_layers())) {}
  ModelOutput forward(const ModelInput& in) override {
    auto out = inner_->forward(in);
    inputs.push_back(in.tokens_BL.clone());
    index.push_back(in.logits_index_M.defined() ? in.logits_index_M.clone() : at::Tensor());
    logits.push_back(out.logits.clone());
    std::vector<std::pair<at::Tensor, at::Tensor>> r;
    for (const auto& l : last) r.emplace_back(l->get().token_A.clone(), l->get().expert_A.clone());
    routing.push_back(r);
    return out;
  }
  int64_t vocab_size() const override { return inner_->vocab_size(); }
  int64_t max_seq_len() const override { return inner_->max_seq_len(); }
  std::string describe() const override { return "spy"; }
  std::vector<MoeLayer*> moe_layers() override { return inner_->moe_layers(); }
  std::vector<at::Tensor> inputs, index, logits;
  std::vector<std::vector<std::pair<at::Tensor, at::Tensor>>> routing;

 private:
  std::shared_ptr<ModelBase> inner_;
  std::vector<std::shared_ptr<LastRouting>> last;  // after inner_: built from it
};

/// Sorted experts of each token: [T] lists.
std::vector<std::vector<int64_t>> experts_by_token(const std::pair<at::Tensor, at::Tensor>& r,
                                                   int64_t T) {
  std::vector<std::vector<int64_t>> e(static_cast<size_t>(T));
  for (int64_t a = 0; a < r.first.size(0); ++a) {
    e[static_cast<size_t>(r.first[a].item<int64_t>())].push_back(r.second[a].item<int64_t>());
  }
  for (auto& v : e) std::sort(v.begin(), v.end());
  return e;
}

TEST(ComponentDecode, DmoeRoutesTheSamplersBlocksAsTrainingDoes) {
  auto inner = model_of(kMoeBlockRouted);
  const auto last = observe_layers<LastRouting>(inner->moe_layers());
  // (a) Decoding blocks start at the prompt's end, and so do routing blocks: with a prompt of 5
  // tokens and blocks of 8, the tokens of each decoding block share one routing block.
  auto rec = recording("{kind: dmoe, p: 0.3, guard: 2}");
  inner->set_block_routing(rec, 8);
  auto s = make_sampler("{kind: llada, gen_length: 16, steps: 16, block_length: 8}");
  decode(*inner, *s, torch::randint(0, 40, {1, 5}));
  ASSERT_FALSE(rec->calls.empty());
  for (const auto& c : rec->calls) {
    for (int64_t j = 0; j < 2; ++j) {
      auto blk = c.block_T.narrow(0, 5 + 8 * j, 8);
      EXPECT_TRUE((blk == blk[0]).all().item<bool>()) << "decoding block " << j << ": " << blk;
    }
    EXPECT_NE(c.block_T[4].item<int64_t>(), c.block_T[5].item<int64_t>());
  }
  // (b) Where the grids coincide (a prompt of 8 = one block), the sampler's forward and the
  // training forward (train mode, as the trainer calls it) on the same tokens choose the same
  // experts for every token and give the same logits.
  auto spy = std::make_shared<SpyModel>(inner);
  inner->set_block_routing(
      BlockRoutingConfig::from(ConfigNode::from_string("{kind: dmoe, p: 0.3, guard: 2}", "p")).policy,
      8);
  decode(*spy, *s, torch::randint(0, 40, {1, 8}));
  ASSERT_GE(spy->inputs.size(), 4u);
  inner->train();
  for (size_t f : {size_t(1), spy->inputs.size() - 3}) {
    SCOPED_TRACE(f);
    ModelInput tin(spy->inputs[f], spy->index[f]);  // the trainer's input: tokens and logit rows
    auto out = inner->forward(tin).logits;
    EXPECT_LT((out - spy->logits[f]).abs().max().item<double>(), 1e-5);
    const int64_t T = spy->inputs[f].numel();
    const auto layers = inner->moe_layers();
    for (size_t l = 0; l < layers.size(); ++l) {
      auto trained = experts_by_token(
          {last[l]->get().token_A, last[l]->get().expert_A}, T);
      EXPECT_EQ(trained, experts_by_token(spy->routing[f][l], T)) << "layer " << l;
    }
  }
  inner->eval();
}

const std::string& data_dir() {
  static const std::string d = [] {
    const std::string dir = test::scratch_dir("block_data");
    test::tiny_setup(dir, dir + "/data");
    return dir;
  }();
  return d;
}

TEST(E2EBlock, BlockDiffusionTrainsDecodesAndBlockRoutedEvalReportsRatios) {
  const std::string d = test::scratch_dir("block_e2e");
  ConfigNode r = ConfigNode::from_file(data_dir() + "/recipe.yaml");
  r.apply_override("model.attention=block_causal");
  r.apply_override("model.block_size=8");
  r.apply_override("diffusion.objective=block");
  r.apply_override("diffusion.block_size=8");
  r.apply_override("train.steps=30");
  r.apply_override("generate.sampler={kind: block_diffusion, gen_length: 16, block_length: 8, steps: 8}");
  test::write_text(d + "/bd3.yaml", r.to_yaml());
  auto t = test::run_mixdiff({"train", d + "/bd3.yaml", "--out", d + "/bd3"});
  ASSERT_EQ(t.status, 0) << t.err;
  auto m = test::lines(test::read_text(d + "/bd3/metrics.jsonl"));
  auto last = nlohmann::json::parse(m.back());
  EXPECT_LT(last["val_nelbo"].get<double>(), last["val_unigram_entropy"].get<double>() + 1.0);
  auto g = test::run_mixdiff({"generate", "--ckpt", d + "/bd3", "--prompt", "The cat", "--prompt",
                              "A dog sat on the"});
  ASSERT_EQ(g.status, 0) << g.err;
  EXPECT_NE(g.out.find("sample: The cat"), std::string::npos) << g.out;
  EXPECT_NE(g.out.find("sample: A dog sat on the"), std::string::npos) << g.out;
  // A mismatched objective is refused before training.
  auto bad = test::run_mixdiff({"train", d + "/bd3.yaml", "--out", d + "/bad", "--set",
                                "model.attention=full"});
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("block-causal"), std::string::npos) << bad.err;

  // Block-routed evaluation of a tiny MoE.
  ConfigNode mr = ConfigNode::from_file(data_dir() + "/recipe.yaml");
  mr.apply_override("model.kind=moe_dlm");
  mr.apply_override("model.moe={n_expert: 8, d_expert: 16, router: {kind: token_choice, top_k: 2}}");
  mr.apply_override("train.steps=20");
  test::write_text(d + "/moe.yaml", mr.to_yaml());
  ASSERT_EQ(test::run_mixdiff({"train", d + "/moe.yaml", "--out", d + "/moe"}).status, 0);
  auto e = test::run_mixdiff({"eval", "--ckpt", d + "/moe", "--set",
                              "infer={block_routing: {kind: dmoe, p: 0.5, guard: 2, block_size: 8}, "
                              "infill: {samples: 4, context: 32, span: 4}}"});
  ASSERT_EQ(e.status, 0) << e.err;
  EXPECT_NE(e.out.find("unique experts / forward"), std::string::npos) << e.out;
  auto j = nlohmann::json::parse(test::lines(e.out).back());
  const auto& br = j["block_routing"];
  EXPECT_LE(br["block_routed"]["unique_experts_per_forward"].get<double>(),
            br["token_level"]["unique_experts_per_forward"].get<double>());
  EXPECT_TRUE(br["ratios"].contains("infill_exact_match"));
  EXPECT_GT(br["token_level"]["tokens_per_s"].get<double>(), 0.0);
}

}  // namespace
}  // namespace mixdiff
