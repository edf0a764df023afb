// The transformer backbone: attention masks, block-causal independence, rotary and RMSNorm
// properties, logits at selected positions, and save -> load of model.safetensors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/safetensors.h"
#include "model/model.h"
#include "nn/layers.h"
#include "support/support.h"
#include "train/checkpoint.h"

namespace mixdiff {
namespace {

std::shared_ptr<ModelBase> tiny_model(const std::string& attention, uint64_t seed = 0) {
  torch::manual_seed(seed);
  ConfigNode c = ConfigNode::from_string(
      "kind: dense_dlm\nvocab_size: 50\nd_model: 32\nn_layer: 2\nn_head: 4\nn_kv_head: 2\n"
      "qk_norm: true\nd_ff: 48\nmax_seq_len: 16\nblock_size: 4\nattention: " + attention + "\n",
      "model.yaml");
  auto m = build_model(c);
  c.check_unknown_keys();
  m->eval();
  return m;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

TEST(ComponentAttention, BlockCausalBiasByHand) {
  auto bias = block_causal_bias(6, 2);
  ASSERT_EQ(bias.sizes(), (std::vector<int64_t>{6, 6}));
  for (int64_t i = 0; i < 6; ++i) {
    for (int64_t j = 0; j < 6; ++j) {
      const bool allowed = j / 2 <= i / 2;
      EXPECT_EQ(bias[i][j].item<float>(), allowed ? 0.0f : -INFINITY) << i << "," << j;
    }
  }
}

TEST(ComponentModel, BlockCausalBlockDoesNotDependOnLaterBlocks) {
  torch::NoGradGuard ng;
  auto m = tiny_model("block_causal");
  auto x = torch::randint(0, 50, {2, 12}, torch::kLong);
  auto y = x.clone();
  y.narrow(1, 8, 4).random_(0, 50);  // change the last block only
  y[0][9] = m->mask_id();
  auto a = m->forward({x, {}}).logits, b = m->forward({y, {}}).logits;
  ASSERT_EQ(a.sizes(), (std::vector<int64_t>{2, 12, 50}));
  EXPECT_LT(max_diff(a.narrow(1, 0, 8), b.narrow(1, 0, 8)), 1e-6);
  EXPECT_GT(max_diff(a.narrow(1, 8, 4), b.narrow(1, 8, 4)), 1e-4);
  // Earlier blocks do reach later ones.
  auto z = x.clone();
  z[0][0] = (x[0][0].item<int64_t>() + 1) % 50;
  EXPECT_GT(max_diff(m->forward({z, {}}).logits.narrow(1, 4, 8), a.narrow(1, 4, 8)), 1e-5);
}

// The options that Qwen2 (q/k/v bias), OLMoE (QK-norm over the whole projection) and Qwen2-MoE
// (a shared expert behind a sigmoid gate) need; their agreement with transformers is
// E2EHuggingFace's.
TEST(ComponentModel, QkNormOverTheProjectionQkvBiasAndGatedSharedExperts) {
  torch::NoGradGuard ng;
  auto model = [](const std::string& extra, const std::string& kind = "dense_dlm") {
    torch::manual_seed(0);
    return build_model(ConfigNode::from_string(
        "kind: " + kind + "\nvocab_size: 50\nd_model: 32\nn_layer: 2\nn_head: 4\nn_kv_head: 2\n"
        "d_ff: 48\nmax_seq_len: 16\n" + extra, "model.yaml"));
  };
  auto x = torch::randint(0, 50, {2, 10}, torch::kLong);
  // Per head, q is scale-invariant per head; over the projection only as a whole.
  for (const char* mode : {"head", "projection"}) {
    auto m = model(std::string("qk_norm: ") + mode + "\n");
    auto p = m->named_parameters();
    EXPECT_EQ(p["layers.0.attn.q_norm.weight"].size(0), std::string(mode) == "head" ? 8 : 32);
    const auto a = m->forward({x, {}}).logits;
    auto w = p["layers.0.attn.wqkv"];
    w.narrow(0, 0, 8).mul_(10.0);  // head 0's q rows
    const double one_head = max_diff(m->forward({x, {}}).logits, a);
    w.narrow(0, 8, 24).mul_(10.0);  // every q row scaled alike
    const double all_heads = max_diff(m->forward({x, {}}).logits, a);
    if (std::string(mode) == "head") {
      EXPECT_LT(one_head, 1e-4);
    } else {
      EXPECT_GT(one_head, 1e-3);
      EXPECT_LT(all_heads, 1e-4);
    }
  }
  // The bias starts at zero: the same function as no bias, until it moves.
  auto plain = model(""), biased = model("qkv_bias: true\n");
  EXPECT_LT(max_diff(plain->forward({x, {}}).logits, biased->forward({x, {}}).logits), 1e-6);
  biased->named_parameters()["layers.1.attn.bqkv"].fill_(0.5);
  EXPECT_GT(max_diff(plain->forward({x, {}}).logits, biased->forward({x, {}}).logits), 1e-4);
  // A gate of w = 0 halves the shared experts' output.
  auto moe = [&](const std::string& gate) {
    return model("moe: {n_expert: 4, d_expert: 16, n_shared: 1, " + gate +
                     "router: {kind: token_choice, top_k: 2}}\n",
                 "moe_dlm");
  };
  auto gated = moe("shared_gate: true, "), ungated = moe("");
  auto gp = gated->named_parameters(), up = ungated->named_parameters();
  gp["layers.0.ffn.shared_gate"].zero_();
  gp["layers.1.ffn.shared_gate"].zero_();
  for (const auto& kv : up) {
    kv.value().copy_(gp[kv.key()]);
    if (kv.key().find("shared.w_down") != std::string::npos) kv.value().mul_(0.5);
  }
  EXPECT_LT(max_diff(gated->forward({x, {}}).logits, ungated->forward({x, {}}).logits), 1e-5);
  try {
    model("qk_norm: sideways\n");
    ADD_FAILURE() << "qk_norm: sideways was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("qk_norm"), std::string::npos) << e.what();
  }
}

// model.attention: causal (an autoregressive model, to check an imported checkpoint against its
// source): position i sees positions <= i only, as block_causal with blocks of one token does,
// and decoding token by token against the KV cache gives the full forward's logits.
TEST(ComponentModel, CausalAttentionSeesOnlyEarlierTokensAndDecodesWithTheCache) {
  torch::NoGradGuard ng;
  auto m = tiny_model("causal");
  auto x = torch::randint(0, 50, {2, 12}, torch::kLong);
  auto a = m->forward({x, {}}).logits;
  for (int64_t i : {0, 5, 11}) {
    auto y = x.clone();
    y[1][i] = (x[1][i].item<int64_t>() + 1) % 50;
    auto b = m->forward({y, {}}).logits;
    if (i > 0) {
      EXPECT_LT(max_diff(a.narrow(1, 0, i), b.narrow(1, 0, i)), 1e-6) << i;
    }
    EXPECT_GT(max_diff(a.narrow(1, i, 12 - i), b.narrow(1, i, 12 - i)), 1e-5) << i;
  }
  torch::manual_seed(0);
  ConfigNode c = ConfigNode::from_string(
      "kind: dense_dlm\nvocab_size: 50\nd_model: 32\nn_layer: 2\nn_head: 4\nn_kv_head: 2\n"
      "qk_norm: true\nd_ff: 48\nmax_seq_len: 16\nblock_size: 1\nattention: block_causal\n",
      "model.yaml");
  auto blocks_of_one = build_model(c);
  EXPECT_LT(max_diff(blocks_of_one->forward({x, {}}).logits, a), 1e-6);
  KVCache kv;
  ModelInput prefix(x.narrow(1, 0, 8).contiguous());
  prefix.cache = &kv;
  prefix.cache_append = true;
  EXPECT_LT(max_diff(m->forward(prefix).logits, a.narrow(1, 0, 8)), 1e-5);
  for (int64_t i = 8; i < 12; ++i) {
    ModelInput next(x.narrow(1, i, 1).contiguous());
    next.cache = &kv;
    next.cache_append = true;
    EXPECT_LT(max_diff(m->forward(next).logits, a.narrow(1, i, 1)), 1e-5) << i;
  }
  EXPECT_EQ(m->attention(), "causal");
}

TEST(ComponentModel, FullAttentionSeesEveryPosition) {
  torch::NoGradGuard ng;
  auto m = tiny_model("full");
  auto x = torch::randint(0, 50, {1, 12}, torch::kLong);
  auto y = x.clone();
  y[0][11] = (x[0][11].item<int64_t>() + 1) % 50;
  EXPECT_GT(max_diff(m->forward({x, {}}).logits.narrow(1, 0, 4),
                     m->forward({y, {}}).logits.narrow(1, 0, 4)),
            1e-5);
}

TEST(ComponentModel, LogitsAtSelectedPositionsEqualFullLogits) {
  torch::NoGradGuard ng;
  auto m = tiny_model("full");
  auto x = torch::randint(0, 51, {3, 10}, torch::kLong);
  auto full = m->forward({x, {}}).logits.reshape({30, 50});
  auto idx = torch::tensor({0, 7, 13, 29}, torch::kLong);
  auto sel = m->forward({x, idx}).logits;
  EXPECT_LT(max_diff(sel, full.index_select(0, idx)), 1e-5);
  EXPECT_EQ(m->mask_id(), 50);
}

TEST(ComponentModel, GradientsReachEveryParameter) {
  auto m = tiny_model("full");
  m->train();
  auto x = torch::randint(0, 51, {2, 8}, torch::kLong);
  m->forward({x, {}}).logits.pow(2).mean().backward();
  for (const auto& kv : m->named_parameters()) {
    ASSERT_TRUE(kv.value().grad().defined()) << kv.key();
    EXPECT_GT(kv.value().grad().abs().sum().item<double>(), 0) << kv.key();
  }
}

TEST(ComponentModel, SequenceLongerThanTablesIsRefused) {
  auto m = tiny_model("full");
  EXPECT_THROW(m->forward({torch::zeros({1, 17}, torch::kLong), {}}), c10::Error);
}

TEST(ComponentLayers, RmsNormAndRotaryProperties) {
  RMSNorm n(8, 1e-6);
  auto x = torch::randn({5, 8}) * 3;
  auto rms = n.forward(x).pow(2).mean(-1).sqrt();
  EXPECT_LT(max_diff(rms, torch::ones({5})), 1e-4);
  // Rotary: <R_m q, R_n k> depends only on m - n.
  auto rope = RotaryTables::make(16, 8, 10000.0);
  auto q = torch::randn({8}), k = torch::randn({8});
  auto at_pos = [&](const at::Tensor& v, int64_t p) {
    auto seq = torch::zeros({1, 1, 16, 8});
    seq[0][0][p] = v;
    return apply_rotary(seq, rope)[0][0][p];
  };
  const double d1 = at_pos(q, 5).dot(at_pos(k, 2)).item<double>();
  const double d2 = at_pos(q, 12).dot(at_pos(k, 9)).item<double>();
  EXPECT_NEAR(d1, d2, 1e-4);
  EXPECT_NEAR(at_pos(q, 0).dot(at_pos(k, 0)).item<double>(), q.dot(k).item<double>(), 1e-5);
}

// The fused fp32 RMSNorm and rotary kernels (forward and backward) against the composite form,
// which LayerNorm and apply_rotary take for fp64 inputs.
TEST(ComponentLayers, FusedNormAndRotaryMatchTheCompositeForm) {
  torch::manual_seed(3);
  RMSNorm n(16, 1e-6);
  {
    torch::NoGradGuard ng;
    n.parameters()[0].normal_(1.0, 0.3);
  }
  auto x = (torch::randn({2, 5, 3, 16}) * 2).transpose(1, 2);  // non-contiguous input
  auto xf = x.clone().requires_grad_(true);
  auto xd = x.to(torch::kFloat64).requires_grad_(true);
  auto r = torch::randn({2, 3, 5, 16});
  auto yf = n.forward(xf);
  auto yd = n.forward(xd);  // composite: fp64 x, fp32 weight
  EXPECT_LT(max_diff(yf, yd.to(torch::kFloat32)), 1e-5);
  auto w = n.parameters()[0];
  (yf * r).sum().backward();
  auto gw_fused = w.grad().clone();
  w.mutable_grad() = at::Tensor();
  (yd * r.to(torch::kFloat64)).sum().backward();
  EXPECT_LT(max_diff(xf.grad(), xd.grad().to(torch::kFloat32)), 1e-5);
  EXPECT_LT(max_diff(gw_fused, w.grad()), 1e-4);

  auto rope = RotaryTables::make(16, 8, 10000.0);
  auto q = torch::randn({2, 4, 7, 8});  // [B, H, L, hd]
  auto pos = torch::tensor({3, 0, 9, 9, 1, 15, 2}, torch::kLong);
  for (const bool with_pos : {false, true}) {
    auto qf = q.clone().requires_grad_(true);
    auto qd = q.to(torch::kFloat64).requires_grad_(true);
    auto of = with_pos ? apply_rotary(qf, rope, pos) : apply_rotary(qf, rope);
    auto od = with_pos ? apply_rotary(qd, rope, pos) : apply_rotary(qd, rope);
    EXPECT_LT(max_diff(of, od.to(torch::kFloat32)), 1e-5);
    auto rr = torch::randn_like(q);
    (of * rr).sum().backward();
    (od * rr.to(torch::kFloat64)).sum().backward();
    EXPECT_LT(max_diff(qf.grad(), qd.grad().to(torch::kFloat32)), 1e-5);
  }
}

TEST(ComponentModel, BadOptionsNameTheKey) {
  ConfigNode c = ConfigNode::from_string(
      "kind: dense_dlm\nvocab_size: 50\nd_model: 32\nn_layer: 2\nn_head: 4\nn_kv_head: 3\n"
      "max_seq_len: 16\n", "model.yaml");
  try {
    build_model(c);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.yaml:6:12: n_kv_head: expected a divisor"),
              std::string::npos) << e.what();
  }
  ConfigNode u = ConfigNode::from_string("kind: dense_dlm2\n", "m.yaml");
  try {
    build_model(u);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown models 'dense_dlm2' (known: coe_dlm, dense_dlm"),
              std::string::npos) << e.what();
  }
}

TEST(RoundtripCheckpoint, SaveLoadGivesIdenticalLogits) {
  const std::string d = test::scratch_dir("weights_rt");
  auto a = tiny_model("block_causal", 1);
  TensorMap t;
  for (const auto& kv : a->named_parameters()) t.emplace(kv.key(), kv.value());
  save_safetensors(d + "/model.safetensors", t, {{"format", "pt"}});
  auto b = tiny_model("block_causal", 2);
  auto x = torch::randint(0, 51, {2, 12}, torch::kLong);
  torch::NoGradGuard ng;
  EXPECT_FALSE(torch::equal(a->forward({x, {}}).logits, b->forward({x, {}}).logits));
  load_model_weights(*b, d + "/model.safetensors");
  EXPECT_TRUE(torch::equal(a->forward({x, {}}).logits, b->forward({x, {}}).logits));
}

TEST(RoundtripCheckpoint, SafetensorsLayoutIsStandard) {
  const std::string d = test::scratch_dir("st_layout");
  TensorMap t{{"w", torch::tensor({{0.f, 0.5f, 1.f}, {1.5f, 2.f, 2.5f}})},
              {"i", torch::tensor({1, 2, 3}, torch::kLong)}};
  save_safetensors(d + "/x.safetensors", t, {{"k", "v"}});
  const std::string raw = test::read_text(d + "/x.safetensors");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(static_cast<unsigned char>(raw[i])) << (8 * i);
  auto h = nlohmann::json::parse(raw.substr(8, n));
  EXPECT_EQ(h["w"]["dtype"], "F32");
  EXPECT_EQ(h["w"]["shape"], nlohmann::json({2, 3}));
  EXPECT_EQ(h["i"]["dtype"], "I64");
  EXPECT_EQ(h["__metadata__"]["k"], "v");
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(raw.size(), 8 + n + 6 * 4 + 3 * 8);
  std::map<std::string, std::string> meta;
  auto back = load_safetensors(d + "/x.safetensors", &meta);
  EXPECT_TRUE(torch::equal(back["w"], t["w"]));
  EXPECT_TRUE(torch::equal(back["i"], t["i"]));
  EXPECT_EQ(meta["k"], "v");
}

TEST(RoundtripCheckpoint, TruncatedOrMismatchedWeightsAreRefused) {
  const std::string d = test::scratch_dir("st_bad");
  auto a = tiny_model("full");
  TensorMap t;
  for (const auto& kv : a->named_parameters()) t.emplace(kv.key(), kv.value());
  save_safetensors(d + "/m.safetensors", t);
  const std::string raw = test::read_text(d + "/m.safetensors");
  test::write_text(d + "/trunc.safetensors", raw.substr(0, raw.size() - 10));
  EXPECT_THROW(load_model_weights(*a, d + "/trunc.safetensors"), CheckpointError);
  test::write_text(d + "/hdr.safetensors", std::string("\xff\xff\xff\xff\0\0\0\0", 8) + "{}");
  EXPECT_THROW(load_model_weights(*a, d + "/hdr.safetensors"), CheckpointError);
  t.erase("norm.weight");
  save_safetensors(d + "/missing.safetensors", t);
  try {
    load_model_weights(*a, d + "/missing.safetensors");
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("missing tensor 'norm.weight'"), std::string::npos);
  }
}

}  // namespace
}  // namespace mixdiff
