// Expert specialisation by domain and local routing consistency (src/moe/observers.h) on
// hand-made routings, and the telemetry a forward with domains produces.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "moe/observers.h"

namespace mixdiff {
namespace {

TEST(UnitSpecialisation, ZeroForRoutingIndependentOfTheDomain) {
  // n[d, e] = N p(d) p(e): the expert distribution is the same in every domain.
  auto pd = torch::tensor({0.5, 0.3, 0.2}, torch::kFloat64);
  auto pe = torch::tensor({0.1, 0.4, 0.25, 0.25}, torch::kFloat64);
  EXPECT_NEAR(specialisation_score(1000 * pd.unsqueeze(1) * pe.unsqueeze(0)), 0.0, 1e-12);
}

TEST(UnitSpecialisation, OneForFullySpecialisedRouting) {
  // Each expert serves one domain (experts 0, 1 -> domain 0; 2 -> 1; 3 -> 2), domains of unequal
  // size: the expert tells the domain, I(E; D) = H(D).
  auto n = torch::tensor({{30.0, 20.0, 0.0, 0.0}, {0.0, 0.0, 35.0, 0.0}, {0.0, 0.0, 0.0, 15.0}},
                         torch::kFloat64);
  EXPECT_NEAR(specialisation_score(n), 1.0, 1e-12);
  // Between: two domains, expert 0 only domain 0, expert 1 shared equally. p(d) = (3/4, 1/4)
  // with n = {{2, 1}, {0, 1}} (N = 4): I = sum p log(p / (p_d p_e)) by hand.
  auto m = torch::tensor({{2.0, 1.0}, {0.0, 1.0}}, torch::kFloat64);
  const double p00 = 0.5, p01 = 0.25, p11 = 0.25, pd0 = 0.75, pd1 = 0.25, pe0 = 0.5, pe1 = 0.5;
  const double mi = p00 * std::log(p00 / (pd0 * pe0)) + p01 * std::log(p01 / (pd0 * pe1)) +
                    p11 * std::log(p11 / (pd1 * pe1));
  const double hd = -(pd0 * std::log(pd0) + pd1 * std::log(pd1));
  EXPECT_NEAR(specialisation_score(m), mi / hd, 1e-12);
  // No counts, or a single domain: undefined.
  EXPECT_TRUE(std::isnan(specialisation_score(torch::zeros({2, 3}, torch::kFloat64))));
  EXPECT_TRUE(std::isnan(specialisation_score(torch::ones({1, 3}, torch::kFloat64))));
}

TEST(UnitSpecialisation, SegmentConsistencyByHand) {
  // One sequence of 4 tokens, segments of 2, top-1 routing over 3 experts:
  //   tokens 0, 1 -> experts 0, 0 (gates 1.0, 0.5); tokens 2, 3 -> experts 1, 2 (gates 0.8, 0.2).
  // k = 1: SRP = (1.5 + 0.8) / 2.5; cache 2 x k = 2 experts: SCH = (2 + 2) / 4 = 1; cache 1: 3/4.
  auto tok = torch::tensor({0, 1, 2, 3}, torch::kLong);
  auto ex = torch::tensor({0, 0, 1, 2}, torch::kLong);
  auto gate = torch::tensor({1.0f, 0.5f, 0.8f, 0.2f});
  auto s2 = segment_consistency_sums(tok, ex, gate, 4, 1, 3, 2, 2.0);
  EXPECT_NEAR(s2[0] / s2[1], 2.3 / 2.5, 1e-6);
  EXPECT_DOUBLE_EQ(s2[2] / s2[3], 1.0);
  auto s1 = segment_consistency_sums(tok, ex, gate, 4, 1, 3, 2, 1.0);
  EXPECT_DOUBLE_EQ(s1[2] / s1[3], 0.75);
  // Segments never cross sequences: two sequences of 2 tokens, one segment each of length 4.
  auto t2 = segment_consistency_sums(tok, ex, gate, 4, 2, 3, 4, 1.0);
  EXPECT_DOUBLE_EQ(t2[2] / t2[3], 0.75);
  // A segment of the whole sequence: the best single expert covers 2 of 4.
  auto whole = segment_consistency_sums(tok, ex, gate, 4, 1, 3, 4, 1.0);
  EXPECT_DOUBLE_EQ(whole[2] / whole[3], 0.5);
}

TEST(UnitSpecialisation, TelemetryReportsLoadPerDomainAndTheScore) {
  // Two sequences of 4 tokens; sequence 0 is domain 0 and routes to expert 0, sequence 1 is
  // domain 1 and routes to expert 1: fully specialised.
  RoutingStats st(2, 2, /*n_domains=*/2, /*segment=*/4, /*cache=*/1.0);
  RoutingDecision d;
  d.probs_TS = torch::full({8, 2}, 0.5);
  RoutingContext ctx;
  ctx.mask_ratio_B = torch::tensor({0.25f, 0.75f});
  ctx.seq_T = torch::tensor({0, 0, 0, 0, 1, 1, 1, 1}, torch::kLong);
  ctx.n_seq = 2;
  ctx.domain_T = torch::tensor({0, 0, 0, 0, 1, 1, 1, 1}, torch::kLong);
  auto tok = torch::arange(8, torch::kLong);
  auto ex = torch::tensor({0, 0, 0, 0, 1, 1, 1, 1}, torch::kLong);
  st.add(d, tok, ex, torch::ones({8}), 8, ctx);
  auto j = st.to_json();
  ASSERT_TRUE(j.contains("by_domain"));
  EXPECT_EQ(j["by_domain"][0], (std::vector<double>{4, 0}));
  EXPECT_EQ(j["by_domain"][1], (std::vector<double>{0, 4}));
  EXPECT_NEAR(j["specialisation"].get<double>(), 1.0, 1e-12);
  // Per mask-ratio bucket each holds one domain only: the score is undefined there.
  EXPECT_TRUE(j["by_mask_ratio"][0]["specialisation"].is_null());
  EXPECT_DOUBLE_EQ(j["segment_cache_best_hit"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(j["segment_routing_best"].get<double>(), 1.0);
  // Unknown domains (-1) are left out of the domain counts.
  RoutingStats st2(2, 1, 2);
  ctx.domain_T = torch::full({8}, -1, torch::kLong);
  st2.add(d, tok, ex, torch::ones({8}), 8, ctx);
  EXPECT_EQ(st2.to_json()["by_domain"][0], (std::vector<double>{0, 0}));
}

}  // namespace
}  // namespace mixdiff
