// The `mixdiff` binary as a user runs it: help, one-line errors without partial runs, the
// train -> generate -> eval -> inspect path, and SIGTERM -> checkpoint -> resume.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "support/support.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;
using test::run_mixdiff;

const std::string& tiny_dir() { return test::tiny_dir("cli"); }

void expect_one_line_error(const test::CmdResult& r, const std::string& needle) {
  EXPECT_EQ(r.status, 2) << r.err;
  const auto l = test::lines(r.err);
  ASSERT_EQ(l.size(), 1u) << r.err;
  EXPECT_EQ(l[0].rfind("error: ", 0), 0u) << l[0];
  EXPECT_NE(l[0].find(needle), std::string::npos) << l[0];
}

TEST(E2ECli, HelpIsUsefulOnItsOwn) {
  auto r = run_mixdiff({"--help"});
  EXPECT_EQ(r.status, 0);
  for (const char* sub : {"train", "generate", "eval", "inspect", "data"}) {
    EXPECT_NE(r.out.find(sub), std::string::npos) << sub;
    auto s = run_mixdiff({sub, "--help"});
    EXPECT_EQ(s.status, 0) << sub;
    EXPECT_GT(test::lines(s.out).size(), 3u) << sub;
  }
  EXPECT_EQ(run_mixdiff({"data", "prepare", "--help"}).status, 0);
  EXPECT_EQ(run_mixdiff({"frobnicate"}).status, 2);
}

TEST(E2ECli, BadInputGivesOneLineAndNoPartialRun) {
  const std::string d = tiny_dir();
  const std::string base = test::read_text(d + "/recipe.yaml");
  // Unknown key, with its line.
  test::write_text(d + "/unknown.yaml", base + "trian: {steps: 3}\n");
  const std::string run1 = d + "/runs/unknown";
  expect_one_line_error(run_mixdiff({"train", d + "/unknown.yaml", "--out", run1}),
                        "unknown.yaml:" + std::to_string(test::lines(base).size() + 1) +
                            ":1: trian: unknown key 'trian'");
  EXPECT_FALSE(fs::exists(run1));
  // Wrong type through --set.
  const std::string run2 = d + "/runs/wrongtype";
  expect_one_line_error(
      run_mixdiff({"train", d + "/recipe.yaml", "--set", "train.steps=abc", "--out", run2}),
      "--set train.steps=abc: train.steps: expected an integer, got 'abc'");
  EXPECT_FALSE(fs::exists(run2));
  // Missing data.
  const std::string run3 = d + "/runs/nodata";
  expect_one_line_error(run_mixdiff({"train", d + "/recipe.yaml", "--set",
                                     "data.path=" + d + "/no_such_data", "--out", run3}),
                        "holds no prepared dataset");
  EXPECT_FALSE(fs::exists(run3));
  // Unknown component name lists the known ones.
  expect_one_line_error(run_mixdiff({"train", d + "/recipe.yaml", "--set", "optim.kind=adamx",
                                     "--out", d + "/runs/x"}),
                        "optim.kind: unknown optimizers 'adamx' (known: adamw)");
  expect_one_line_error(run_mixdiff({"train", d + "/missing.yaml"}), "cannot open recipe file");
  expect_one_line_error(run_mixdiff({"generate", "--ckpt", d + "/nowhere"}), "not a checkpoint");
}

TEST(E2ECli, TrainGenerateEvalInspect) {
  const std::string d = tiny_dir();
  const std::string run = d + "/runs/full";
  auto t = run_mixdiff({"train", d + "/recipe.yaml", "--set", "train.steps=8", "--out", run});
  ASSERT_EQ(t.status, 0) << t.err;
  EXPECT_NE(t.out.find("step      8/8 | loss"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("eval  step 8 | val nelbo"), std::string::npos) << t.out;
  EXPECT_TRUE(fs::exists(run + "/recipe.yaml"));
  EXPECT_TRUE(fs::exists(run + "/train.log"));
  EXPECT_NE(test::read_text(run + "/recipe.yaml").find("vocab_size: 320"), std::string::npos);

  auto g = run_mixdiff({"generate", "--ckpt", run, "--prompt", "The dog"});
  ASSERT_EQ(g.status, 0) << g.err;
  EXPECT_NE(g.out.find("sample: The dog"), std::string::npos) << g.out;
  EXPECT_NE(g.out.find("16 forwards"), std::string::npos) << g.out;
  auto g2 = run_mixdiff({"generate", "--ckpt", run, "--prompt", "The dog"});
  EXPECT_EQ(g.out.substr(0, g.out.find("generated")), g2.out.substr(0, g2.out.find("generated")));
  expect_one_line_error(run_mixdiff({"generate", "--ckpt", run, "--set", "train.steps=3"}),
                        "not used by this command");

  auto e = run_mixdiff({"eval", "--ckpt", run});
  ASSERT_EQ(e.status, 0) << e.err;
  EXPECT_NE(e.out.find("\"val_nelbo\":"), std::string::npos) << e.out;

  auto i = run_mixdiff({"inspect", "--ckpt", run});
  ASSERT_EQ(i.status, 0) << i.err;
  EXPECT_NE(i.out.find("(verified)"), std::string::npos);
  auto ir = run_mixdiff({"inspect", "--recipe", d + "/recipe.yaml"});
  ASSERT_EQ(ir.status, 0) << ir.err;
  EXPECT_NE(ir.out.find("n_kv_head: 2"), std::string::npos) << ir.out;  // default filled in
  auto il = run_mixdiff({"inspect"});
  EXPECT_NE(il.out.find("masked_diffusion_elbo"), std::string::npos);

  // Training into a folder that holds a run needs --resume; resuming a finished run is a no-op.
  expect_one_line_error(run_mixdiff({"train", d + "/recipe.yaml", "--out", run}),
                        "already holds checkpoints");
  auto again = run_mixdiff({"train", "--resume", run, "--set", "train.steps=8"});
  EXPECT_EQ(again.status, 0) << again.err;
  EXPECT_NE(again.out.find("run already complete"), std::string::npos) << again.out;
}

// Every shipped recipe builds, trains a few steps and generates (on the tiny fixture data, so
// that the test does not depend on the built-in corpus); MoE runs print their routing table.
TEST(E2ECli, EveryShippedRecipeTrainsAndGenerates) {
  const std::string d = tiny_dir();
  std::vector<fs::path> recipes;
  for (const char* dir : {"recipes", "recipes/debug"}) {
    for (const auto& e : fs::directory_iterator(test::source_dir() + "/" + dir)) {
      if (e.path().extension() == ".yaml") recipes.push_back(e.path());
    }
  }
  ASSERT_GE(recipes.size(), 3u);
  // Experiment recipes (minutes to hours) are validated as `mixdiff train` would build them.
  // SFT recipes read prompt/response pairs: a few made here, in the fixture's tokenizer.
  test::write_text(d + "/sft_pairs.jsonl",
                   "{\"prompt\": \"The cat\", \"response\": \" sat on the mat.\"}\n"
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"The dog\"}, "
                   "{\"role\": \"assistant\", \"content\": \"ran.\"}]}\n");
  for (const auto& e : fs::directory_iterator(test::source_dir() + "/recipes/experiments")) {
    const bool sft = ConfigNode::from_file(e.path().string()).at("data").get<std::string>("kind") ==
                     "sft_jsonl";
    const std::string data =
        sft ? "data={kind: sft_jsonl, train: " + d + "/sft_pairs.jsonl, val: " + d +
                  "/sft_pairs.jsonl, tokenizer: " + d + "/data/tokenizer, seq_len: 32}"
            : "data.path=" + d + "/data";
    std::vector<std::string> args{"inspect", "--recipe", e.path().string(), "--set", data,
                                  "--set", "init=null"};
    if (!sft) args.insert(args.end(), {"--set", "data.prepare=null"});
    auto v = run_mixdiff(args);
    EXPECT_EQ(v.status, 0) << e.path() << ": " << v.err;
  }
  for (const auto& r : recipes) {
    SCOPED_TRACE(r.string());
    const std::string run = d + "/runs/recipe_" + r.parent_path().filename().string() + "_" +
                            r.stem().string();
    const bool debug = r.parent_path().filename() == "debug";
    std::vector<std::string> args = {"train", r.string(), "--out", run, "--set",
                                     "data.path=" + d + "/data", "--set", "data.prepare=null",
                                     "--set", "eval.sequences=2",
                                     "--set", "eval.batch_size=2", "--set", "eval.every=0"};
    if (!debug) {
      for (const char* o : {"train.steps=2", "train.log_every=1", "train.ckpt_every=0"}) {
        args.push_back("--set");
        args.push_back(o);
      }
    }
    auto t = run_mixdiff(args);
    ASSERT_EQ(t.status, 0) << t.err << t.out;
    const bool block_sampler = test::read_text(r.string()).find("block_diffusion") != std::string::npos;
    auto g = block_sampler
                 ? run_mixdiff({"generate", "--ckpt", run, "--set", "generate.sampler.gen_length=16"})
                 : run_mixdiff({"generate", "--ckpt", run, "--set", "generate.sampler.gen_length=8",
                                "--set", "generate.sampler.steps=8", "--set",
                                "generate.sampler.block_length=8"});
    ASSERT_EQ(g.status, 0) << g.err;
    EXPECT_NE(g.out.find("sample: "), std::string::npos) << g.out;
    auto i = run_mixdiff({"inspect", "--ckpt", run});
    ASSERT_EQ(i.status, 0) << i.err;
    const bool moe = test::read_text(r.string()).find("\n  moe:") != std::string::npos;
    EXPECT_EQ(i.out.find("routing of the last logging interval") != std::string::npos, moe)
        << i.out;
    if (moe) {
      EXPECT_NE(t.out.find("active per token"), std::string::npos) << t.out;
    }
  }
}

TEST(E2ECli, BenchMoeLayerReportsEveryExpertCount) {
  const std::string d = test::scratch_dir("bench_moe");
  auto b = run_mixdiff({"bench", "moe-layer", "--tokens", "64", "--d-model", "16", "--d-expert",
                        "8", "--top-k", "2", "--experts", "2,4", "--repeats", "1", "--json",
                        d + "/bench.json"});
  ASSERT_EQ(b.status, 0) << b.err;
  auto j = nlohmann::json::parse(test::read_text(d + "/bench.json"));
  EXPECT_GT(j["dense_s"].get<double>(), 0.0);
  ASSERT_EQ(j["moe"].size(), 2u);
  EXPECT_EQ(j["moe"][1]["n_expert"], 4);
  EXPECT_GT(j["moe"][1]["layer_s"].get<double>(), 0.0);
  expect_one_line_error(run_mixdiff({"bench", "moe-layer", "--top-k", "8", "--experts", "4"}),
                        "below --top-k");
}

// `bench train` runs the trainer's own step on random tokens of the recipe's shape, without its
// corpus; `bench generate` times a checkpoint's sampler. Both print one JSON line.
TEST(E2ECli, BenchTrainAndGenerateReportThroughput) {
  const std::string d = tiny_dir();
  for (const std::string& recipe :
       {d + "/recipe.yaml", test::source_dir() + "/recipes/quickstart_moe.yaml"}) {
    auto b = run_mixdiff({"bench", "train", recipe, "--steps", "2", "--warmup", "1", "--vocab",
                          "128", "--set", "train.batch_size=2", "--set", "data.seq_len=32"});
    ASSERT_EQ(b.status, 0) << recipe << "\n" << b.err;
    const auto j = nlohmann::json::parse(test::lines(b.out).back());
    EXPECT_EQ(j["what"], "train");
    EXPECT_GT(j["tokens_per_s"].get<double>(), 0.0) << recipe;
    EXPECT_GT(j["forward_s_per_step"].get<double>(), 0.0) << recipe;
    EXPECT_GT(j["backward_optimizer_s_per_step"].get<double>(), 0.0) << recipe;
    EXPECT_GT(j["mfu"].get<double>(), 0.0) << recipe;
    EXPECT_GE(j["parameters"].get<int64_t>(), j["active_parameters"].get<int64_t>()) << recipe;
  }
  expect_one_line_error(
      run_mixdiff({"bench", "train", d + "/recipe.yaml", "--set", "optim.kind=adam"}),
      "optim.kind");

  const std::string run = d + "/runs/bench";
  ASSERT_EQ(run_mixdiff({"train", d + "/recipe.yaml", "--set", "train.steps=2", "--out", run}).status, 0);
  auto g = run_mixdiff({"bench", "generate", "--ckpt", run, "--repeats", "1", "--profile"});
  ASSERT_EQ(g.status, 0) << g.err;
  const auto j = nlohmann::json::parse(test::lines(g.out).back());
  EXPECT_GT(j["tokens_per_s"].get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(j["forwards_per_token"].get<double>(), 1.0);  // 16 steps for 16 tokens
  EXPECT_TRUE(j["profile_s_per_forward"].contains("attention")) << g.out;
}

TEST(E2ECli, SigtermSavesACheckpointAndResumeFinishes) {
  const std::string d = tiny_dir();
  const std::string run = d + "/runs/sig";
  const int pid = test::spawn_mixdiff(
      {"train", d + "/recipe.yaml", "--set", "train.steps=100000", "--out", run},
      d + "/sig.out", d + "/sig.err");
  // Wait until training has started (the first progress line is in the log).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (test::read_text(run + "/train.log").find("step ") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ::kill(pid, SIGTERM);
  const int status = test::wait_for(pid);
  EXPECT_EQ(status, 128 + SIGTERM) << test::read_text(d + "/sig.err");
  const std::string out = test::read_text(d + "/sig.out");
  EXPECT_NE(out.find("stopped by signal 15"), std::string::npos) << out;
  ASSERT_TRUE(fs::exists(run + "/checkpoints/latest"));
  const std::string latest = test::lines(test::read_text(run + "/checkpoints/latest")).at(0);
  const int64_t step = std::stoll(latest.substr(5));
  EXPECT_GE(step, 1);
  auto r = run_mixdiff({"train", "--resume", run, "--set",
                        "train.steps=" + std::to_string(step + 3)});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos);
  EXPECT_TRUE(fs::exists(run + "/checkpoints/step_" + std::to_string(step + 3)));
}

}  // namespace
}  // namespace mixdiff
