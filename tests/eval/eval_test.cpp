// Post-training and downstream evaluation: the Wilson interval, task files, LLaDA's SFT loss
// against its hand computation, the Monte-Carlo conditional likelihood against the bound
// enumerated over every mask, multiple choice on a model right by construction, classifier-free
// guidance, and built-in tasks and SFT pairs made from held-out documents only (a hermetic
// WordNet and KJV made in the test).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/errors.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "diffusion/diffusion.h"
#include "eval/likelihood.h"
#include "eval/tasks.h"
#include "infer/sampler.h"
#include "loss/loss.h"
#include "report/report.h"
#include "report/stats.h"
#include "support/support.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

std::shared_ptr<ModelBase> tiny_model(uint64_t seed = 0, int64_t vocab = 50) {
  torch::manual_seed(seed);
  ConfigNode c = ConfigNode::from_string(
      "kind: dense_dlm\nvocab_size: " + std::to_string(vocab) +
          "\nd_model: 32\nn_layer: 2\nn_head: 4\nn_kv_head: 2\nd_ff: 48\nmax_seq_len: 32\n",
      "model.yaml");
  auto m = build_model(c);
  c.check_unknown_keys();
  m->eval();
  return m;
}

TEST(UnitStats, WilsonIntervalMatchesHandComputedCases) {
  // 7 of 10, z = 1.959964: centre 0.7 + z^2/20, half z sqrt(0.021 + z^2/400), both / (1 + z^2/10).
  const Proportion a = wilson_interval(7, 10);
  EXPECT_DOUBLE_EQ(a.p, 0.7);
  EXPECT_NEAR(a.lo, 0.396781, 1e-5);
  EXPECT_NEAR(a.hi, 0.892208, 1e-5);
  // 0 of 10: [0, z^2/(10 + z^2)] = [0, 0.277533].
  const Proportion b = wilson_interval(0, 10);
  EXPECT_DOUBLE_EQ(b.lo, 0.0);
  EXPECT_NEAR(b.hi, 0.277533, 1e-5);
  const Proportion c = wilson_interval(50, 50);
  EXPECT_DOUBLE_EQ(c.hi, 1.0);
  EXPECT_NEAR(c.lo, 0.928650, 1e-5);
  EXPECT_TRUE(std::isnan(wilson_interval(0, 0).p));
  EXPECT_NEAR(normal_quantile(0.975), 1.959964, 1e-6);
}

TEST(UnitTasks, TaskFilesOfEveryFormReadAndBadLinesAreNamed) {
  const std::string d = test::scratch_dir("task_files");
  test::write_text(d + "/mc.jsonl",
                   "{\"context\": \"2 + 2 =\", \"choices\": [\" 4\", \" 5\", \" 6\"], \"gold\": 0}\n"
                   "\n"
                   "{\"contexts\": [\"cat (noun):\", \"run (verb):\"], \"continuation\": \" a "
                   "feline\", \"gold\": 0}\n");
  Task mc = read_task(d + "/mc.jsonl");
  EXPECT_EQ(mc.name, "mc");
  EXPECT_EQ(mc.kind, "multiple_choice");
  ASSERT_EQ(mc.choice_items.size(), 2u);
  EXPECT_EQ(mc.choice_items[0].contexts, std::vector<std::string>(3, "2 + 2 ="));
  EXPECT_EQ(mc.choice_items[0].continuations[1], " 5");
  EXPECT_EQ(mc.choice_items[1].continuations, std::vector<std::string>(2, " a feline"));
  EXPECT_NEAR(mc.chance(), (1.0 / 3 + 1.0 / 2) / 2, 1e-12);
  // Written and read back, both forms survive.
  write_task(mc, d + "/mc2.jsonl");
  Task back = read_task(d + "/mc2.jsonl");
  EXPECT_EQ(back.choice_items[1].contexts, mc.choice_items[1].contexts);
  EXPECT_EQ(back.choice_items[0].continuations, mc.choice_items[0].continuations);

  test::write_text(d + "/gen.jsonl",
                   "{\"context\": \"In the beginning God created the\", \"target\": \"heaven\"}\n"
                   "{\"context\": \"x\", \"target\": \"heaven\", \"max_tokens\": 6}\n"
                   "{\"context\": \"y\", \"target\": \"earth\"}\n");
  Task gen = read_task(d + "/gen.jsonl");
  EXPECT_EQ(gen.kind, "generation");
  EXPECT_EQ(gen.generation_items[1].max_tokens, 6);
  EXPECT_NEAR(gen.chance(), 2.0 / 3, 1e-12);  // always "heaven"

  auto refused = [&](const std::string& body, const std::string& what) {
    test::write_text(d + "/bad.jsonl", body);
    try {
      read_task(d + "/bad.jsonl");
      ADD_FAILURE() << "accepted: " << body;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  refused("{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 2}\n",
          "bad.jsonl line 1: \"gold\" 2 is not the index of a choice (0..1)");
  refused("{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n{nope\n",
          "bad.jsonl line 2: not valid JSON");
  refused("{\"context\": \"a\", \"choices\": [\"b\"], \"gold\": 0}\n",
          "line 1: expected \"choices\": a list of at least two strings");
  refused("{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n"
          "{\"context\": \"a\", \"target\": \"b\"}\n",
          "line 2: a generation item in a multiple_choice task");
  refused("{\"context\": \"a\", \"target\": \"two words\"}\n", "must be one word");
  refused("\n", "no items");
}

TEST(UnitTasks, FirstWordOfAGeneratedText) {
  EXPECT_EQ(first_word(" heaven and the earth"), "heaven");
  EXPECT_EQ(first_word("Israel."), "Israel");
  EXPECT_EQ(first_word("  don't,"), "don't");
  EXPECT_EQ(first_word(",,,"), "");
  EXPECT_EQ(first_word("well-known fact"), "well-known");
}

// LLaDA's SFT loss against its hand computation: prompt positions never masked and never
// counted, the EOS padding counted as response, each row normalised by its response length.
TEST(ComponentSft, LossOnAHandMadeBatchEqualsItsHandComputation) {
  ConfigNode sc = ConfigNode::from_string("kind: linear\n", "s.yaml");
  auto schedule = schedules_registry().create("linear", "kind", sc);
  const int64_t V = 7, mask = 7, eos = 6;
  // Row 0: prompt 3 tokens, response 2 + 3 EOS; row 1: prompt 1, response 4 + 3 EOS.
  auto x0 = torch::tensor({{1, 2, 3, 4, 5, 6, 6, 6}, {2, 1, 1, 4, 3, 6, 6, 6}}, torch::kLong);
  auto resp = torch::tensor({{0, 0, 0, 1, 1, 1, 1, 1}, {0, 1, 1, 1, 1, 1, 1, 1}}, torch::kBool);
  auto t = torch::tensor({0.6f, 0.3f});
  auto u = torch::tensor({{0.1f, 0.1f, 0.1f, 0.5f, 0.7f, 0.2f, 0.9f, 0.1f},
                          {0.0f, 0.2f, 0.5f, 0.1f, 0.25f, 0.9f, 0.05f, 0.6f}});
  DiffusionBatch b = corrupt_with(x0, t, u, *schedule, mask, resp);
  // The prompt is never masked, even where u < p.
  EXPECT_FALSE((b.masked_BL & resp.logical_not()).any().item<bool>());
  EXPECT_TRUE(torch::equal(b.response_len_B, torch::tensor({5.0f, 7.0f})));
  torch::manual_seed(3);
  auto logits = torch::randn({b.index_M.size(0), V});
  ModelOutput out{logits};
  auto loss = losses_registry().create("sft_elbo", "kind", ConfigNode::from_string("{}", "l"))
                  ->compute(out, b)
                  .item<double>();
  // By hand: p_b = (1 - 1e-3) t + 1e-3; masked where u < p_b on the response; each term
  // CE / p_b / |response_b|, summed, over B = 2.
  auto a = x0.accessor<int64_t, 2>();
  auto ua = u.accessor<float, 2>();
  auto ra = resp.accessor<bool, 2>();
  const auto lsm = torch::log_softmax(logits.to(torch::kFloat64), 1);
  double expect = 0;
  int64_t m = 0, eos_counted = 0;
  for (int64_t row = 0; row < 2; ++row) {
    const double tt = t[row].item<double>();
    const double p = (1 - 1e-3) * tt + 1e-3;
    const double len = row == 0 ? 5 : 7;
    for (int64_t i = 0; i < 8; ++i) {
      if (!ra[row][i] || !(ua[row][i] < p)) continue;
      expect += -lsm[m][a[row][i]].item<double>() / p / len;
      eos_counted += a[row][i] == eos;
      ++m;
    }
  }
  ASSERT_EQ(m, b.index_M.size(0));
  EXPECT_GT(eos_counted, 0);  // the test exercises the EOS padding
  EXPECT_NEAR(loss, expect / 2, 1e-5 * std::abs(expect));
  // The loss asks for prompt/response data.
  DiffusionBatch plain = corrupt_with(x0, t, u, *schedule, mask);
  EXPECT_THROW(losses_registry().create("sft_elbo", "kind", ConfigNode::from_string("{}", "l"))
                   ->compute(ModelOutput{torch::randn({plain.index_M.size(0), V})}, plain),
               ConfigError);
}

// sum_{l=1..|c|} (1/l) mean over every mask S of l continuation positions of sum_{i in S} CE_i:
// the bound the Monte-Carlo estimate samples, enumerated.
double enumerated_nll(ModelBase& m, const LoglikRequest& r) {
  torch::NoGradGuard ng;
  const int64_t C = static_cast<int64_t>(r.context.size());
  const int64_t l = static_cast<int64_t>(r.continuation.size());
  std::vector<int64_t> row(r.context.begin(), r.context.end());
  row.insert(row.end(), r.continuation.begin(), r.continuation.end());
  std::map<int64_t, std::pair<double, int64_t>> by_size;  // size -> (sum, count)
  for (int64_t s = 1; s < (int64_t(1) << l); ++s) {
    auto x = torch::tensor(row, torch::kLong).unsqueeze(0);
    std::vector<int64_t> idx;
    for (int64_t i = 0; i < l; ++i) {
      if (s >> i & 1) {
        idx.push_back(C + i);
        x[0][C + i] = m.mask_id();
      }
    }
    auto logits = m.forward(ModelInput(x, torch::tensor(idx, torch::kLong))).logits;
    auto lsm = torch::log_softmax(logits.to(torch::kFloat64), 1);
    double ce = 0;
    for (size_t k = 0; k < idx.size(); ++k) ce -= lsm[static_cast<int64_t>(k)][row[static_cast<size_t>(idx[k])]].item<double>();
    auto& e = by_size[static_cast<int64_t>(idx.size())];
    e.first += ce;
    ++e.second;
  }
  double nll = 0;
  for (const auto& [size, e] : by_size) nll += e.first / static_cast<double>(e.second) / static_cast<double>(size);
  return nll;
}

TEST(ComponentLikelihood, MonteCarloConvergesToTheBoundEnumeratedOverEveryMask) {
  auto m = tiny_model(1);
  LoglikRequest r{{3, 9, 14}, {5, 21, 7, 30, 2}};  // 31 masks of 5 positions
  const double exact = enumerated_nll(*m, r);
  double prev_err = 1e9;
  for (int64_t n : {16, 1024}) {
    LoglikOptions o;
    o.samples = n;
    o.seed = 7;
    const auto res = conditional_loglik(*m, {r}, o);
    const double err = std::abs(-res[0].loglik - exact);
    EXPECT_LT(err, 4 * res[0].se + 1e-9) << n << " samples";
    EXPECT_EQ(res[0].tokens, 5);
    if (n == 1024) {
      EXPECT_LT(res[0].se, 0.02 * exact);
      EXPECT_LT(err, prev_err + 1e-9);
    }
    prev_err = err;
  }
  // A one-token continuation has one mask: one sample is the exact bound, its s.e. 0.
  LoglikRequest one{{3, 9, 14}, {5}};
  LoglikOptions o;
  o.samples = 8;
  const auto res = conditional_loglik(*m, {one}, o);
  EXPECT_NEAR(-res[0].loglik, enumerated_nll(*m, one), 1e-9);
  EXPECT_EQ(res[0].se, 0.0);
}

// Logits that depend on the position only (a fixed random table), never on the tokens.
class PositionModel : public ModelBase {
 public:
  PositionModel() : table_(torch::randn({64, 20}, at::make_generator<at::CPUGeneratorImpl>(5))) {}
  ModelOutput forward(const ModelInput& in) override {
    const int64_t B = in.tokens_BL.size(0), L = in.tokens_BL.size(1);
    auto full = table_.narrow(0, 0, L).repeat({B, 1});
    return {in.logits_index_M.defined() ? full.index_select(0, in.logits_index_M) : full};
  }
  int64_t vocab_size() const override { return 20; }
  int64_t max_seq_len() const override { return 64; }
  std::string describe() const override { return "position"; }

 private:
  at::Tensor table_;
};

TEST(ComponentLikelihood, ScoresDoNotDependOnBatchingOrOrderAndChoicesShareMasks) {
  auto m = tiny_model(2);
  std::vector<LoglikRequest> reqs{{{1, 2}, {3, 4, 5}}, {{7}, {8, 9}}, {{1, 2, 6}, {3, 4, 5}},
                                  {{}, {10, 11, 12, 13}}};
  LoglikOptions o;
  o.samples = 12;
  o.batch_size = 5;
  o.greedy = true;
  const auto all = conditional_loglik(*m, reqs, o);
  o.batch_size = 1;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto alone = conditional_loglik(*m, {reqs[i]}, o);
    // The same masks; only the float32 forward's summation order differs with the batch.
    EXPECT_NEAR(alone[0].loglik, all[i].loglik, 1e-6 * std::abs(all[i].loglik)) << i;
    EXPECT_NEAR(alone[0].se, all[i].se, 1e-6 * std::abs(all[i].loglik)) << i;
    EXPECT_EQ(alone[0].greedy, all[i].greedy) << i;
  }
  // Another seed draws other masks.
  o.seed = 99;
  EXPECT_NE(conditional_loglik(*m, {reqs[0]}, o)[0].loglik, all[0].loglik);
  // Requests with one continuation share its masks whatever their contexts: under a model whose
  // logits depend on the position only, their estimates are equal sample by sample.
  PositionModel pm;
  const auto shared = conditional_loglik(pm, {{{1, 2}, {3, 4, 5, 6}}, {{7, 9}, {3, 4, 5, 6}}}, o);
  EXPECT_DOUBLE_EQ(shared[0].loglik, shared[1].loglik);
  EXPECT_DOUBLE_EQ(shared[0].se, shared[1].se);
  EXPECT_GT(shared[0].se, 0.0);
}

// A model right by construction: at masked positions of a row that agrees with one of the gold
// sequences on every unmasked position it predicts that sequence's tokens with logit 30; any
// other row gets uniform logits.
class OracleModel : public ModelBase {
 public:
  OracleModel(std::vector<std::vector<int32_t>> gold, int64_t vocab)
      : gold_(std::move(gold)), vocab_(vocab) {}
  ModelOutput forward(const ModelInput& in) override {
    const int64_t B = in.tokens_BL.size(0), L = in.tokens_BL.size(1);
    auto x = in.tokens_BL.to(torch::kCPU);
    auto full = torch::zeros({B * L, vocab_});
    for (int64_t b = 0; b < B; ++b) {
      for (const auto& g : gold_) {
        if (static_cast<int64_t>(g.size()) != L) continue;
        bool agrees = true;
        for (int64_t i = 0; i < L && agrees; ++i) {
          const int64_t t = x[b][i].item<int64_t>();
          agrees = t == mask_id() || t == g[static_cast<size_t>(i)];
        }
        if (!agrees) continue;
        for (int64_t i = 0; i < L; ++i) full[b * L + i][g[static_cast<size_t>(i)]] = 30.0;
        break;
      }
    }
    if (in.logits_index_M.defined()) full = full.index_select(0, in.logits_index_M.cpu());
    return {full};
  }
  int64_t vocab_size() const override { return vocab_; }
  int64_t max_seq_len() const override { return 64; }
  std::string describe() const override { return "oracle"; }

 private:
  std::vector<std::vector<int32_t>> gold_;
  int64_t vocab_;
};

TEST(ComponentTasks, MultipleChoiceOnAModelRightByConstructionScores100Percent) {
  const std::string& dir = test::tiny_dir("eval_oracle");
  const Tokenizer tok = Tokenizer::load(dir + "/data/tokenizer");
  const std::vector<std::string> words{"cat", "dog", "bird", "fish", "tree", "stone", "river",
                                       "cloud", "bread", "salt"};
  Task t;
  t.name = "oracle";
  t.kind = "multiple_choice";
  std::vector<std::vector<int32_t>> gold;
  for (size_t i = 0; i < 8; ++i) {
    ChoiceItem c;
    const int64_t g = static_cast<int64_t>(i % 4);
    for (int64_t k = 0; k < 4; ++k) {
      if (i % 2 == 0) {  // lm-eval's form: one context, the choices as continuations
        c.contexts.push_back("Word " + std::to_string(i) + " is");
        c.continuations.push_back(" " + words[(i + static_cast<size_t>(k)) % words.size()]);
      } else {  // partial evaluation: the choices in the context, one continuation
        c.contexts.push_back(words[(i + static_cast<size_t>(k)) % words.size()] + " (noun):");
        c.continuations.push_back(" a thing that one sees");
      }
    }
    c.gold = g;
    const auto r = encode_pair(tok, c.contexts[static_cast<size_t>(g)],
                               c.continuations[static_cast<size_t>(g)], 64);
    std::vector<int32_t> seq = r.context;
    seq.insert(seq.end(), r.continuation.begin(), r.continuation.end());
    gold.push_back(seq);
    t.choice_items.push_back(c);
  }
  OracleModel m(gold, tok.vocab_size());
  TaskOptions o;
  o.loglik.samples = 4;
  const nlohmann::json r = run_task(m, tok, t, o);
  EXPECT_EQ(r["n"], 8);
  EXPECT_EQ(r["correct"], 8);
  EXPECT_DOUBLE_EQ(r["acc"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(r["chance"].get<double>(), 0.25);
  EXPECT_NEAR(r["acc_ci95"][0].get<double>(), wilson_interval(8, 8).lo, 1e-12);
  EXPECT_EQ(r["examples"].size(), 3u);
}

TEST(ComponentSampler, ClassifierFreeGuidanceCombinesBothBranchesAndScaleZeroIsPlainDecoding) {
  auto m = tiny_model(4);
  auto prompt = torch::tensor({{3, 9, 14, 2}, {5, 6, 7, 8}}, torch::kLong);
  auto sampler = [](const std::string& yaml) {
    ConfigNode c = ConfigNode::from_string(yaml, "s.yaml");
    auto s = samplers_registry().create(c.get<std::string>("kind"), "kind", c);
    c.check_unknown_keys();
    return s;
  };
  // guided_logits: u + (w + 1)(c - u), u from the prompt-masked input.
  {
    torch::NoGradGuard ng;
    auto x = torch::cat({prompt, torch::full({2, 4}, m->mask_id(), torch::kLong)}, 1);
    auto ux = mask_prompt(x, 4, m->mask_id());
    EXPECT_TRUE((ux.narrow(1, 0, 4) == m->mask_id()).all().item<bool>());
    auto c = m->forward(ModelInput(x)).logits, u = m->forward(ModelInput(ux)).logits;
    auto g = guided_logits(*m, ModelInput(x), ux, 1.5);
    EXPECT_LT((g - (u + 2.5 * (c - u))).abs().max().item<double>(), 1e-5);
    EXPECT_TRUE(torch::equal(guided_logits(*m, ModelInput(x), {}, 0.0), c));
  }
  for (const std::string base :
       {"kind: llada\ngen_length: 8\nsteps: 8\nblock_length: 4\n",
        "kind: block_diffusion\ngen_length: 8\nblock_length: 4\nsteps: 4\ncache: none\n",
        "kind: block_diffusion\ngen_length: 8\nblock_length: 4\nsteps: 4\ncache: prefix\n",
        "kind: block_diffusion\ngen_length: 8\nblock_length: 4\nsteps: 4\ncache: dual\n"}) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
    auto plain = sampler(base)->generate(*m, prompt, gen);
    auto zero = sampler(base + "cfg_scale: 0\n")->generate(*m, prompt, gen);
    EXPECT_TRUE(torch::equal(plain.tokens_BL, zero.tokens_BL)) << base;
    EXPECT_EQ(plain.forwards, zero.forwards) << base;
    auto guided = sampler(base + "cfg_scale: 2\n")->generate(*m, prompt, gen);
    EXPECT_EQ(guided.forwards, 2 * plain.forwards) << base;
    EXPECT_FALSE((guided.tokens_BL == m->mask_id()).any().item<bool>()) << base;
  }
  // With guidance, refreshing the prefix cache at every step decodes exactly as no cache: the
  // unconditional branch has its own cache, kept like the conditional one.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  const std::string g = "kind: block_diffusion\ngen_length: 8\nblock_length: 4\nsteps: 4\n"
                        "cfg_scale: 1.5\n";
  auto none = sampler(g + "cache: none\n")->generate(*m, prompt, gen);
  auto refreshed = sampler(g + "cache: prefix\nrefresh_every: 1\n")->generate(*m, prompt, gen);
  EXPECT_TRUE(torch::equal(none.tokens_BL, refreshed.tokens_BL));
  auto llada = sampler("kind: llada\ngen_length: 8\nsteps: 8\nblock_length: 4\ncfg_scale: 1.5\n")
                   ->generate(*m, prompt, gen);
  EXPECT_TRUE(torch::equal(none.tokens_BL, llada.tokens_BL));
}

// A hermetic corpus pair: a WordNet in its data-file format and a `bible` program printing KJV-
// style verses, so that the built-in tasks and SFT pairs can be made without the real corpora.
std::string fake_corpora(const std::string& d) {
  fs::create_directories(d + "/wordnet");
  const std::vector<std::string> pos{"noun", "verb", "adj", "adv"};
  const char* type[] = {"n", "v", "a", "r"};
  for (size_t p = 0; p < pos.size(); ++p) {
    std::ofstream f(d + "/wordnet/data." + pos[p]);
    f << "  1 This software and database is being provided\n";
    for (int i = 0; i < 120; ++i) {
      const std::string w = pos[p].substr(0, 1) + "word" + std::to_string(i);
      char off[16];
      std::snprintf(off, sizeof(off), "%08d", i + 1);
      f << off << " 03 " << type[p] << " 02 " << w << " 0 " << w << "_alt 0 000 | a "
        << pos[p] << " sense number " << i << " of the list about thing " << (i * 7) % 13
        << "; \"the " << w << " example\"\n";
    }
  }
  std::ofstream v(d + "/verses.txt");
  for (int c = 1; c <= 30; ++c) {
    for (int k = 1; k <= 8; ++k) {
      const char* last[] = {"temple", "river", "mountain", "garden"};
      v << "Ge" << c << ":" << k << " And the people of chapter " << c << " went unto the city "
        << "number " << k << " and they saw the gate of the " << last[(c + k) % 4] << ".\n";
    }
  }
  v.close();
  test::write_text(d + "/bible", "#!/bin/sh\ncat '" + d + "/verses.txt'\n");
  fs::permissions(d + "/bible", fs::perms::owner_all);
  return "    corpora: [{kind: wordnet, dir: " + d + "/wordnet}, {kind: kjv, program: " + d +
         "/bible}]\n";
}

std::string recipe_with_fake_corpora(const std::string& d) {
  return "name: evaldata\nseed: 0\n"
         "model: {kind: dense_dlm, d_model: 32, n_layer: 2, n_head: 2, d_ff: 64, max_seq_len: 64}\n"
         "diffusion: {schedule: {kind: linear}}\nlosses: [{kind: masked_diffusion_elbo}]\n"
         "data:\n  kind: token_shards\n  path: " + d + "/data\n  seq_len: 32\n  prepare:\n" +
         fake_corpora(d) +
         "    tokenizer: {kind: byte_bpe, vocab_size: 300, min_frequency: 1}\n"
         "    val_fraction: 0.2\n"
         "optim: {kind: adamw, lr: 0.01}\nlr_schedule: {kind: constant, warmup_steps: 5}\n"
         "train: {steps: 4, batch_size: 8, log_every: 1}\neval: {sequences: 8, batch_size: 8}\n";
}

// Every n-gram of the training split's tokens, hashed.
std::unordered_set<uint64_t> train_ngrams(const std::string& dataset, size_t n) {
  const DatasetInfo info = read_dataset_info(dataset);
  std::vector<int64_t> toks;
  for (const auto& s : info.train_shards) {
    ShardReader r(dataset + "/" + s);
    std::vector<int64_t> part(static_cast<size_t>(r.size()));
    r.copy_to(0, r.size(), part.data());
    toks.insert(toks.end(), part.begin(), part.end());
  }
  std::unordered_set<uint64_t> out;
  for (size_t i = 0; i + n <= toks.size(); ++i) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t k = 0; k < n; ++k) h = (h ^ static_cast<uint64_t>(toks[i + k])) * 1099511628211ULL;
    out.insert(h);
  }
  return out;
}

bool occurs_in_training(const std::vector<int32_t>& seq, const std::unordered_set<uint64_t>& grams,
                        size_t n) {
  if (seq.size() < n) return false;
  for (size_t i = 0; i + n <= seq.size(); ++i) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t k = 0; k < n; ++k) h = (h ^ static_cast<uint64_t>(seq[i + k])) * 1099511628211ULL;
    if (!grams.count(h)) return false;
  }
  return true;  // every n-gram of it is in the training split
}

TEST(E2EEval, BuiltinTasksAndSftPairsComeFromHeldOutDocumentsOnly) {
  const std::string d = test::scratch_dir("eval_builtin");
  test::write_text(d + "/recipe.yaml", recipe_with_fake_corpora(d));
  auto prep = test::run_mixdiff({"data", "prepare", d + "/recipe.yaml"});
  ASSERT_EQ(prep.status, 0) << prep.err;
  const auto tasks = builtin_tasks(d + "/data", 0);
  ASSERT_EQ(tasks.size(), 2u);
  const Task& mc = tasks[0];
  const Task& cloze = tasks[1];
  EXPECT_EQ(mc.name, "wordnet_mc");
  EXPECT_EQ(cloze.name, "kjv_cloze");
  EXPECT_GT(mc.size(), 20u);
  EXPECT_GT(cloze.size(), 0u);
  // Which synsets and chapters preparation held out.
  std::set<std::string> val_definitions, train_definitions;
  for_each_split_document(d + "/data", [&](const SplitDocument& doc) {
    auto it = doc.fields.find("definition");
    if (it == doc.fields.end()) return;
    (doc.validation ? val_definitions : train_definitions).insert(it->second);
  });
  const Tokenizer tok = Tokenizer::load(d + "/data/tokenizer");
  const size_t n = 8;
  const auto grams = train_ngrams(d + "/data", n);
  for (const auto& item : mc.choice_items) {
    ASSERT_EQ(item.contexts.size(), 4u);
    const std::string def = item.continuations[0].substr(1);
    EXPECT_TRUE(val_definitions.count(def)) << def;
    EXPECT_FALSE(train_definitions.count(def)) << def;
    // The gold choice as it is scored, and the document's own text, appear in no training window.
    const auto [c, r] = encode_pair(tok, item.contexts[static_cast<size_t>(item.gold)],
                                    item.continuations[static_cast<size_t>(item.gold)]);
    std::vector<int32_t> seq = c;
    seq.insert(seq.end(), r.begin(), r.end());
    EXPECT_FALSE(occurs_in_training(seq, grams, n));
    EXPECT_FALSE(occurs_in_training(tok.encode(def), grams, n)) << def;
  }
  for (const auto& item : cloze.generation_items) {
    EXPECT_FALSE(occurs_in_training(tok.encode(item.context + " " + item.target), grams, n))
        << item.context;
  }
  // The tasks were kept in the dataset for lm-eval; made again, they are the same.
  EXPECT_TRUE(fs::exists(d + "/data/tasks/wordnet_mc.jsonl"));
  const auto again = builtin_tasks(d + "/data", 0);
  EXPECT_EQ(again[0].choice_items.size(), mc.choice_items.size());
  EXPECT_EQ(again[1].generation_items[0].target, cloze.generation_items[0].target);

  // The built-in SFT pairs: training pairs from training synsets only.
  test::write_text(d + "/sft.yaml",
                   "name: sft\nseed: 0\n"
                   "model: {kind: dense_dlm, d_model: 32, n_layer: 2, n_head: 2, d_ff: 64, "
                   "max_seq_len: 64}\n"
                   "diffusion: {schedule: {kind: linear}}\nlosses: [{kind: sft_elbo}]\n"
                   "data: {kind: sft_jsonl, builtin: wordnet, from: " + d + "/data, train: " + d +
                       "/sft/train.jsonl, val: " + d + "/sft/val.jsonl, seq_len: 48}\n"
                   "optim: {kind: adamw, lr: 0.01}\nlr_schedule: {kind: constant, warmup_steps: 2}\n"
                   "train: {steps: 6, batch_size: 4, log_every: 1}\n"
                   "eval: {sequences: 8, batch_size: 16, draws: 2, final_draws: 2}\n"
                   "init: {checkpoint: " + d + "/run}\n");
  // A pre-trained run to fine-tune.
  // tasks.run: the named tasks are scored on the final checkpoint (a sweep's columns).
  auto tr = test::run_mixdiff({"train", d + "/recipe.yaml", "--out", d + "/run", "--set",
                               "tasks.run=[wordnet_mc]", "--set", "tasks.limit=3", "--set",
                               "tasks.samples=2"});
  ASSERT_EQ(tr.status, 0) << tr.err;
  EXPECT_NE(tr.out.find("task wordnet_mc (multiple_choice): acc"), std::string::npos) << tr.out;
  const auto after_training = nlohmann::json::parse(test::read_text(d + "/run/eval_tasks.json"));
  EXPECT_EQ(after_training["tasks"][0]["n"], 3);
  EXPECT_EQ(RunSummary::read(d + "/run").task_acc.count("wordnet_mc"), 1u);
  auto sp = test::run_mixdiff({"data", "prepare", d + "/sft.yaml"});
  ASSERT_EQ(sp.status, 0) << sp.err;
  std::set<std::string> sft_train_responses;
  {
    std::ifstream f(d + "/sft/train.jsonl");
    for (std::string line; std::getline(f, line);) {
      auto j = nlohmann::json::parse(line);
      sft_train_responses.insert(j["response"].get<std::string>());
      EXPECT_NE(j["prompt"].get<std::string>().find(" ("), std::string::npos);
    }
  }
  EXPECT_EQ(sft_train_responses.size(), train_definitions.size());
  for (const auto& item : mc.choice_items) EXPECT_FALSE(sft_train_responses.count(item.continuations[0]));

  // SFT end to end: the loss trains, the held-out pairs' response NELBO is logged, and eval
  // scores the built-in tasks next to the checkpoint.
  auto ft = test::run_mixdiff({"train", d + "/sft.yaml", "--out", d + "/sft_run"});
  ASSERT_EQ(ft.status, 0) << ft.err;
  EXPECT_NE(ft.out.find("val response nelbo"), std::string::npos) << ft.out;
  auto ev = test::run_mixdiff({"eval", "--ckpt", d + "/sft_run", "--set", "tasks.limit=5",
                               "--set", "tasks.samples=2"});
  ASSERT_EQ(ev.status, 0) << ev.err;
  EXPECT_NE(ev.out.find("val response nelbo"), std::string::npos) << ev.out;
  EXPECT_NE(ev.out.find("task wordnet_mc (multiple_choice): acc"), std::string::npos) << ev.out;
  EXPECT_NE(ev.out.find("task kjv_cloze (generation): acc"), std::string::npos) << ev.out;
  auto res = nlohmann::json::parse(test::read_text(d + "/sft_run/eval_tasks.json"));
  ASSERT_EQ(res["tasks"].size(), 2u);
  EXPECT_EQ(res["tasks"][0]["n"], 5);
  EXPECT_DOUBLE_EQ(res["tasks"][0]["chance"].get<double>(), 0.25);
  // The same tasks through lm-eval (tools/lm_eval_mixdiff.py; task files of lm-eval's format
  // pointing at the local JSON) give the same accuracy as `mixdiff eval`.
  const std::string py = test::source_dir() + "/.venv/bin/python";
  const bool have_lm_eval =
      fs::exists(py) && std::system((py + " -c 'import lm_eval' 2>/dev/null").c_str()) == 0;
  if (have_lm_eval) {
    fs::create_directories(d + "/lm_tasks");
    std::string wn = test::read_text(test::source_dir() + "/tools/lm_eval_tasks/mixdiff_wordnet_mc.yaml");
    std::string kc = test::read_text(test::source_dir() + "/tools/lm_eval_tasks/mixdiff_kjv_cloze.yaml");
    auto repoint = [&](std::string y, const std::string& file) {
      const std::string from = "datasets/default/tasks/" + file;
      y.replace(y.find(from), from.size(), d + "/data/tasks/" + file);
      return y;
    };
    test::write_text(d + "/lm_tasks/mixdiff_wordnet_mc.yaml", repoint(wn, "wordnet_mc.jsonl"));
    test::write_text(d + "/lm_tasks/mixdiff_kjv_cloze.yaml", repoint(kc, "kjv_cloze.jsonl"));
    const std::string cmd = "cd '" + d + "' && HF_HOME='" + d + "/hf' HF_DATASETS_OFFLINE=1 '" +
                            py + "' '" + test::source_dir() +
                            "/tools/lm_eval_mixdiff.py' --ckpt sft_run --binary '" +
                            test::mixdiff_binary() +
                            "' --tasks mixdiff_wordnet_mc,mixdiff_kjv_cloze --include_path lm_tasks "
                            "--limit 5 --set tasks.samples=2 --output lm.json > lm.log 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << test::read_text(d + "/lm.log");
    auto lm = nlohmann::json::parse(test::read_text(d + "/lm.json"));
    EXPECT_DOUBLE_EQ(lm["mixdiff_wordnet_mc"]["acc,none"].get<double>(),
                     res["tasks"][0]["acc"].get<double>());
    EXPECT_DOUBLE_EQ(lm["mixdiff_kjv_cloze"]["exact_match,first_word"].get<double>(),
                     res["tasks"][1]["acc"].get<double>());
  } else if (std::getenv("MIXDIFF_REQUIRE_TORCH2")) {
    ADD_FAILURE() << "lm-eval is not installed in .venv (tools/setup.sh --tests --torch2)";
  } else {
    std::cout << "[  NOTE    ] lm-eval not in .venv: the lm-eval comparison was skipped\n";
  }
  // A bad task file: one line naming it, non-zero exit.
  test::write_text(d + "/bad.jsonl", "{\"context\": \"a\", \"choices\": [\"b\", \"c\"]}\n");
  auto bad = test::run_mixdiff({"eval", "--ckpt", d + "/sft_run", "--task", d + "/bad.jsonl"});
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.err.find("bad.jsonl line 1: expected \"gold\""), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace mixdiff
