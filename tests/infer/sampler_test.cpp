// Samplers: determinism, no [MASK] left, the linear unmasking schedule, threshold decoding.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/errors.h"
#include "infer/sampler.h"

namespace mixdiff {
namespace {

// Predicts token (position * 3) % V at every position with a confidence set by `margin`, and
// counts forwards and the masked positions it was shown.
class ScriptedModel : public ModelBase {
 public:
  explicit ScriptedModel(double margin) : margin_(margin) {}
  ModelOutput forward(const ModelInput& in) override {
    const int64_t B = in.tokens_BL.size(0), L = in.tokens_BL.size(1), V = 11;
    auto pos = torch::arange(L, torch::kLong).repeat({B});  // flattened positions
    auto idx = in.logits_index_M.defined() ? in.logits_index_M : torch::arange(B * L);
    auto target = (pos.index_select(0, idx) * 3) % V;
    // Later positions get slightly lower margins so confidence orders positions left to right.
    auto m = margin_ - 0.01 * pos.index_select(0, idx).to(torch::kFloat32);
    auto logits = torch::zeros({idx.size(0), V});
    logits.scatter_(1, target.unsqueeze(1), m.unsqueeze(1));
    ++forwards;
    masked_seen.push_back((in.tokens_BL == mask_id()).sum().item<int64_t>());
    return {logits};
  }
  int64_t vocab_size() const override { return 11; }
  int64_t max_seq_len() const override { return 64; }
  std::string describe() const override { return "scripted"; }
  int64_t forwards = 0;
  std::vector<int64_t> masked_seen;

 private:
  double margin_;
};

std::shared_ptr<SamplerBase> sampler(const std::string& yaml) {
  ConfigNode c = ConfigNode::from_string(yaml, "s.yaml");
  auto s = samplers_registry().create(c.get<std::string>("kind"), "kind", c);
  c.check_unknown_keys();
  return s;
}

TEST(ComponentSampler, GreedyIsDeterministicKeepsPromptAndLeavesNoMask) {
  ScriptedModel m(2.0);
  auto s = sampler("kind: llada\ngen_length: 16\nsteps: 16\nblock_length: 8\n");
  auto prompt = torch::tensor({{4, 5, 6}}, torch::kLong);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  auto a = s->generate(m, prompt, gen);
  auto b = s->generate(m, prompt, gen);
  EXPECT_TRUE(torch::equal(a.tokens_BL, b.tokens_BL));
  EXPECT_EQ(a.forwards, 16);
  EXPECT_FALSE((a.tokens_BL == m.mask_id()).any().item<bool>());
  EXPECT_TRUE(torch::equal(a.tokens_BL.narrow(1, 0, 3), prompt));
  for (int64_t i = 3; i < 19; ++i) EXPECT_EQ(a.tokens_BL[0][i].item<int64_t>(), (i * 3) % 11);
}

TEST(ComponentSampler, LinearScheduleCommitsEvenlyBlockByBlock) {
  ScriptedModel m(2.0);
  // 2 blocks of 8, 4 steps per block: 2 tokens committed per step, left block first.
  auto s = sampler("kind: llada\ngen_length: 16\nsteps: 8\nblock_length: 8\n");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  auto r = s->generate(m, torch::tensor({{1}}, torch::kLong), gen);
  EXPECT_EQ(r.forwards, 8);
  EXPECT_EQ(m.masked_seen, (std::vector<int64_t>{16, 14, 12, 10, 8, 6, 4, 2}));
}

TEST(ComponentSampler, ThresholdDecodingCommitsConfidentTokensTogether) {
  ScriptedModel sure(20.0);  // confidence ~1 everywhere: one forward per block
  auto s = sampler("kind: confidence_threshold\ngen_length: 16\nblock_length: 8\nthreshold: 0.9\n");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  auto r = s->generate(sure, torch::tensor({{1, 2}}, torch::kLong), gen);
  EXPECT_EQ(r.forwards, 2);
  EXPECT_FALSE((r.tokens_BL == sure.mask_id()).any().item<bool>());
  ScriptedModel unsure(0.5);  // confidence ~0.16 < threshold: one token per step
  auto r2 = s->generate(unsure, torch::tensor({{1, 2}}, torch::kLong), gen);
  EXPECT_EQ(r2.forwards, 16);
  EXPECT_TRUE(torch::equal(r.tokens_BL, r2.tokens_BL));
}

TEST(ComponentSampler, SamplingWithTemperatureIsSeededAndRandomRemaskingWorks) {
  ScriptedModel m(1.0);
  auto s = sampler("kind: llada\ngen_length: 16\nsteps: 16\nblock_length: 16\ntemperature: 1.0\n");
  auto prompt = torch::tensor({{1}, {1}}, torch::kLong);
  auto g1 = at::make_generator<at::CPUGeneratorImpl>(5);
  auto g2 = at::make_generator<at::CPUGeneratorImpl>(5);
  auto g3 = at::make_generator<at::CPUGeneratorImpl>(6);
  auto a = s->generate(m, prompt, g1).tokens_BL, b = s->generate(m, prompt, g2).tokens_BL;
  auto c = s->generate(m, prompt, g3).tokens_BL;
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_FALSE(torch::equal(a, c));
  EXPECT_FALSE(torch::equal(a[0], a[1]));  // rows draw different noise
  auto rnd = sampler("kind: llada\ngen_length: 8\nsteps: 8\nblock_length: 8\nremasking: random\n");
  auto r = rnd->generate(m, torch::tensor({{1}}, torch::kLong), g1);
  EXPECT_FALSE((r.tokens_BL == m.mask_id()).any().item<bool>());
}

TEST(ComponentSampler, InconsistentSettingsNameTheKey) {
  auto msg = [](const std::string& yaml) {
    try {
      sampler(yaml);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(msg("kind: llada\ngen_length: 16\nblock_length: 5\n").find("block_length"),
            std::string::npos);
  EXPECT_NE(msg("kind: llada\ngen_length: 16\nblock_length: 8\nsteps: 3\n").find("steps"),
            std::string::npos);
  EXPECT_NE(msg("kind: llada\nremasking: best\n").find("remasking"), std::string::npos);
  EXPECT_NE(msg("kind: llada\nthreshold: 0.9\n").find("unknown key 'threshold'"),
            std::string::npos);
}

}  // namespace
}  // namespace mixdiff
