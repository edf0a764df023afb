// Masked diffusion: schedules, the forward process and the loss terms against hand-computed
// values, and the validation NELBO.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "diffusion/diffusion.h"
#include "loss/loss.h"

namespace mixdiff {
namespace {

std::shared_ptr<NoiseSchedule> schedule(const std::string& yaml) {
  ConfigNode c = ConfigNode::from_string(yaml, "s.yaml");
  return schedules_registry().create(c.get<std::string>("kind"), "kind", c);
}

std::shared_ptr<LossTerm> loss(const std::string& kind) {
  ConfigNode c = ConfigNode::from_string("kind: " + kind + "\n", "l.yaml");
  return losses_registry().create(kind, "kind", c);
}

// Cross-entropy of one row of logits written out by hand.
double ce(const std::vector<double>& z, int target) {
  double m = *std::max_element(z.begin(), z.end()), s = 0;
  for (double v : z) s += std::exp(v - m);
  return -(z[target] - m - std::log(s));
}

TEST(UnitDiffusion, LinearScheduleIsLladas) {
  auto s = schedule("kind: linear\neps: 0.001\n");
  auto t = torch::tensor({0.0f, 0.5f, 1.0f});
  auto p = s->mask_prob(t), w = s->elbo_weight(t);
  EXPECT_NEAR(p[0].item<double>(), 0.001, 1e-7);
  EXPECT_NEAR(p[1].item<double>(), 0.5005, 1e-7);
  EXPECT_NEAR(p[2].item<double>(), 1.0, 1e-7);
  EXPECT_NEAR(w[1].item<double>(), 1.0 / 0.5005, 1e-5);
  EXPECT_NEAR(w[0].item<double>(), 1000.0, 1e-2);
}

TEST(UnitDiffusion, CosineWeightIsDerivativeOverMaskProb) {
  auto s = schedule("kind: cosine\neps: 0.0\nt_min: 0.1\nt_max: 0.9\n");
  EXPECT_DOUBLE_EQ(s->t_min, 0.1);
  EXPECT_DOUBLE_EQ(s->t_max, 0.9);
  for (double t : {0.2, 0.5, 0.8}) {
    const double h = 1e-4;
    auto tt = torch::tensor({t - h, t, t + h}, torch::kFloat64);
    auto p = s->mask_prob(tt);
    const double dp = (p[2].item<double>() - p[0].item<double>()) / (2 * h);
    EXPECT_NEAR(s->elbo_weight(tt)[1].item<double>(), dp / p[1].item<double>(), 1e-5);
    EXPECT_NEAR(p[1].item<double>(), 1 - std::cos(M_PI * t / 2), 1e-9);
  }
}

TEST(UnitDiffusion, BadScheduleRangeNamesKey) {
  EXPECT_THROW(schedule("kind: linear\nt_min: 0.8\nt_max: 0.3\n"), ConfigError);
  EXPECT_THROW(schedule("kind: linear\neps: 1.5\n"), ConfigError);
}

TEST(UnitDiffusion, CorruptMasksExactlyWhereUniformBelowP) {
  auto s = schedule("kind: linear\neps: 0.001\n");
  auto x0 = torch::arange(24, torch::kLong).view({3, 8});
  auto t = torch::tensor({0.2f, 0.6f, 0.9f});
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  DiffusionBatch b = corrupt(x0, t, *s, /*mask_id=*/99, gen);
  auto gen2 = at::make_generator<at::CPUGeneratorImpl>(7);
  auto u = torch::rand({3, 8}, gen2);
  auto p = t * 0.999 + 0.001;
  auto want = u < p.unsqueeze(1);
  EXPECT_TRUE(torch::equal(b.masked_BL, want));
  EXPECT_TRUE(torch::equal(b.xt_BL, x0.masked_fill(want, 99)));
  EXPECT_TRUE(torch::equal(b.index_M, want.reshape({-1}).nonzero().squeeze(1)));
  EXPECT_TRUE(torch::equal(b.target_M, x0.reshape({-1}).index_select(0, b.index_M)));
  for (int64_t i = 0; i < b.index_M.size(0); ++i) {
    const int64_t row = b.index_M[i].item<int64_t>() / 8;
    EXPECT_NEAR(b.weight_M[i].item<double>(), 1.0 / p[row].item<double>(), 1e-5);
  }
  EXPECT_EQ(b.n_slots, 24);
}

TEST(UnitDiffusion, ElboAndMaskedCeByHand) {
  // B = 2, L = 3, V = 4; masked positions 1 (row 0, p = 0.5) and 3, 5 (row 1, p = 0.25).
  DiffusionBatch b;
  b.index_M = torch::tensor({1, 3, 5}, torch::kLong);
  b.target_M = torch::tensor({2, 0, 3}, torch::kLong);
  b.weight_M = torch::tensor({1 / 0.5f, 1 / 0.25f, 1 / 0.25f});
  b.n_slots = 6;
  std::vector<std::vector<double>> z = {{0.1, 0.2, 1.5, -1}, {2, 0, 0, 0}, {0.3, 0.3, 0.3, 0.9}};
  ModelOutput out{torch::tensor({0.1, 0.2, 1.5, -1.0, 2.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.9},
                                torch::kFloat32)
                      .view({3, 4})};
  const double c0 = ce(z[0], 2), c1 = ce(z[1], 0), c2 = ce(z[2], 3);
  EXPECT_NEAR(loss("masked_diffusion_elbo")->compute(out, b).item<double>(),
              (c0 / 0.5 + c1 / 0.25 + c2 / 0.25) / 6.0, 1e-5);
  EXPECT_NEAR(loss("masked_ce")->compute(out, b).item<double>(), (c0 + c1 + c2) / 3.0, 1e-5);
}

TEST(ComponentDiffusion, MaskFractionFollowsTheSchedule) {
  auto s = schedule("kind: linear\neps: 0.001\n");
  auto t = torch::tensor({0.1f, 0.4f, 0.7f, 1.0f});
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  DiffusionBatch b = corrupt(torch::zeros({4, 20000}, torch::kLong), t, *s, 1, gen);
  auto frac = b.masked_BL.to(torch::kFloat64).mean(1);
  auto p = s->mask_prob(t);
  for (int i = 0; i < 4; ++i) {
    const double pi = p[i].item<double>();
    EXPECT_NEAR(frac[i].item<double>(), pi, 4 * std::sqrt(pi * (1 - pi) / 20000) + 1e-9);
  }
}

TEST(ComponentDiffusion, BlockDiffusionNoiseHasOneClippedStratifiedTimePerBlock) {
  // The trainer's BD3 noise (training_noise with a block size): every position of a block shares
  // its block's t, t stays inside [t_min, t_max], the stratified draws put exactly one block of
  // the global batch in each of the W B nb strata, and the ELBO weight of a masked position is
  // its own block's.
  auto s = schedule("kind: linear\neps: 0.001\nt_min: 0.3\nt_max: 0.8\nt_sampling: stratified\n");
  const int64_t B = 3, L = 20, blk = 8, nb = 3, W = 2;
  auto x0 = torch::randint(0, 50, {B, L});
  std::vector<double> all_t;
  for (int64_t r = 0; r < W; ++r) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
    DiffusionBatch b = training_noise(x0, *s, 99, gen, W, r, blk);
    ASSERT_TRUE(b.t_BL.defined());
    for (int64_t i = 0; i < B; ++i) {
      for (int64_t j = 0; j < nb; ++j) {
        auto t = b.t_BL[i].narrow(0, j * blk, std::min(blk, L - j * blk));
        EXPECT_TRUE((t == t[0]).all().item<bool>()) << "row " << i << " block " << j;
        const double tv = t[0].item<double>();
        EXPECT_GE(tv, 0.3 - 1e-6);
        EXPECT_LE(tv, 0.8 + 1e-6);
        all_t.push_back(tv);
      }
    }
    // Masked positions index the noisy half of [x_t ; x_0] and carry their block's weight.
    for (int64_t m = 0; m < b.index_M.size(0); ++m) {
      const int64_t flat = b.index_M[m].item<int64_t>(), row = flat / (2 * L), col = flat % (2 * L);
      ASSERT_LT(col, L);
      EXPECT_EQ(b.xt_BL[row][col].item<int64_t>(), 99);
      const double t = b.t_BL[row][col].item<double>();
      EXPECT_NEAR(b.weight_M[m].item<double>(), 1.0 / (0.999 * t + 0.001), 1e-4);
    }
  }
  // Stratified over the W x B x nb blocks of the global batch: one t per stratum of [0.3, 0.8].
  ASSERT_EQ(all_t.size(), static_cast<size_t>(W * B * nb));
  std::vector<int> per_stratum(all_t.size(), 0);
  for (double t : all_t) {
    const auto k = static_cast<size_t>((t - 0.3) / 0.5 * static_cast<double>(all_t.size()));
    ++per_stratum[std::min(k, all_t.size() - 1)];
  }
  for (int c : per_stratum) EXPECT_EQ(c, 1);
}

// A model that ignores its input and predicts the uniform distribution.
class UniformModel : public ModelBase {
 public:
  ModelOutput forward(const ModelInput& in) override {
    const int64_t n = in.logits_index_M.defined() ? in.logits_index_M.size(0)
                                                  : in.tokens_BL.numel();
    return {torch::zeros({n, 16})};
  }
  int64_t vocab_size() const override { return 16; }
  int64_t max_seq_len() const override { return 64; }
  std::string describe() const override { return "uniform"; }
};

TEST(ComponentDiffusion, NelboOfUniformModelIsLogVAndDeterministic) {
  UniformModel m;
  auto x = torch::randint(0, 16, {256, 64}, torch::kLong);
  NelboResult a = validation_nelbo(m, x, 32, 11);
  NelboResult b = validation_nelbo(m, x, 64, 11);
  EXPECT_NEAR(a.nelbo, std::log(16.0), 0.05 * std::log(16.0));
  EXPECT_DOUBLE_EQ(a.nelbo, b.nelbo);  // batch size does not change the draws
  EXPECT_NEAR(a.ppl_bound, std::exp(a.nelbo), 1e-9);
  EXPECT_NEAR(a.unigram_entropy, std::log(16.0), 0.01);
  EXPECT_EQ(a.tokens, 256 * 64);
  // Several draws per window: the same for any batch size too.
  NelboResult c = validation_nelbo(m, x, 32, 11, 0, 1, {}, 0, false, 3);
  NelboResult d = validation_nelbo(m, x, 48, 11, 0, 1, {}, 0, false, 3);
  EXPECT_DOUBLE_EQ(c.nelbo, d.nelbo);
  EXPECT_DOUBLE_EQ(c.se, d.se);
  EXPECT_EQ(c.draws, 3);
  EXPECT_EQ(c.tokens, 256 * 64);
}

// The reported standard error is the estimate's spread over mask draws: for the uniform model
// every stratum has the same mean, so the collapsed-strata estimate is unbiased for the
// variance; over 300 seeds its root mean square matches the estimates' empirical standard
// deviation, and 4 draws per window halve both.
TEST(ComponentDiffusion, NelboStandardErrorMatchesTheSpreadOverMaskDraws) {
  UniformModel m;
  auto x = torch::randint(0, 16, {64, 16}, torch::kLong);
  double se_one = 0;
  for (int64_t draws : {1, 4}) {
    SCOPED_TRACE(draws);
    double sum = 0, sum2 = 0, se = 0;
    const int n = 300;
    for (int s = 0; s < n; ++s) {
      NelboResult r = validation_nelbo(m, x, 64, 1000 + s, 0, 1, {}, 0, false, draws);
      sum += r.nelbo, sum2 += r.nelbo * r.nelbo, se += r.se * r.se;
    }
    const double mean = sum / n, sd = std::sqrt((sum2 - n * mean * mean) / (n - 1));
    se = std::sqrt(se / n);  // the estimated variance, averaged: unbiased for the variance
    EXPECT_NEAR(mean, std::log(16.0), 3 * sd / std::sqrt(double(n)));
    EXPECT_GT(se / sd, 0.8) << "se " << se << " sd " << sd;
    EXPECT_LT(se / sd, 1.25) << "se " << se << " sd " << sd;
    if (draws == 1) se_one = se;
    if (draws == 4) {
      EXPECT_GT(se, 0.4 * se_one);
      EXPECT_LT(se, 0.6 * se_one);
    }
  }
}

// A model whose cross-entropy depends only on how many positions of the row are masked: every
// token is 0 and the logit of token 0 is c m (m masked in the row). The per-token NELBO is then
// (1/L) sum_{l=1..L} CE(l) exactly, which both forms of the estimator must reach.
class MaskCountModel : public ModelBase {
 public:
  ModelOutput forward(const ModelInput& in) override {
    auto m_B = (in.tokens_BL == mask_id()).sum(1).to(torch::kFloat32);  // [B]
    const int64_t B = in.tokens_BL.size(0), L = in.tokens_BL.size(1);
    auto logits = torch::zeros({B, L, 4});
    logits.select(2, 0).copy_((0.3 * m_B).unsqueeze(1).expand({B, L}));
    logits = logits.view({B * L, 4});
    return {in.logits_index_M.defined() ? logits.index_select(0, in.logits_index_M) : logits};
  }
  int64_t vocab_size() const override { return 4; }
  int64_t max_seq_len() const override { return 64; }
  std::string describe() const override { return "mask count"; }
};

TEST(ComponentDiffusion, BothFormsOfTheNelboEstimateTheExactBound) {
  MaskCountModel m;
  const int64_t L = 8;
  double exact = 0;
  for (int64_t l = 1; l <= L; ++l) exact += std::log(1.0 + 3.0 * std::exp(-0.3 * l)) / L;
  auto x = torch::zeros({64, L}, torch::kLong);
  // The t-form (Bernoulli masks at t): within its standard error of the bound.
  NelboResult t_form = validation_nelbo(m, x, 256, 5, 0, 1, {}, 0, false, 32, false);
  EXPECT_GT(t_form.se, 0);
  EXPECT_NEAR(t_form.nelbo, exact, 4 * t_form.se) << "se " << t_form.se;
  // The l-form: 64 x 32 items stratified over l = 1..8 take every l equally often, and this
  // model's loss depends on l alone, so the estimate is the bound itself, without error.
  NelboResult l_form = validation_nelbo(m, x, 256, 5, 0, 1, {}, 0, false, 32, true);
  EXPECT_NEAR(l_form.nelbo, exact, 1e-6);
  EXPECT_NEAR(l_form.se, 0.0, 1e-9);
  // 100 items (not a multiple of L): still within its (now positive) standard error.
  NelboResult l_odd = validation_nelbo(m, x.narrow(0, 0, 25), 256, 5, 0, 1, {}, 0, false, 4, true);
  EXPECT_GT(l_odd.se, 0);
  EXPECT_LT(l_odd.se, t_form.se);
  EXPECT_NEAR(l_odd.nelbo, exact, 4 * l_odd.se + 1e-9);
  // The uniform model's every masked token costs log 16: the l-form is exact, without error.
  UniformModel u;
  auto y = torch::randint(0, 16, {32, 16}, torch::kLong);
  NelboResult e = validation_nelbo(u, y, 32, 3, 0, 1, {}, 0, false, 2, true);
  EXPECT_NEAR(e.nelbo, std::log(16.0), 1e-6);
  EXPECT_NEAR(e.se, 0.0, 1e-6);
}

}  // namespace
}  // namespace mixdiff
