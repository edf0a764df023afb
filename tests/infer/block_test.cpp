// Block diffusion and block-routed inference: BD3's training mask on a hand-written case, the
// KV-cached block forward against the full forward, cached decoding against uncached decoding,
// block routing policies whose coreset holds every expert against token-level routing, and the
// unique-expert counter on hand-made routings.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/errors.h"
#include "infer/sampler.h"
#include "model/model.h"
#include "moe/block_routing.h"
#include "moe/moe_layer.h"
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
  for (MoeLayer* l : m->moe_layers()) l->count_unique_experts(true);
  m->forward(ModelInput(x));
  for (MoeLayer* l : m->moe_layers()) {
    auto u = l->take_unique_experts();
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
