// Fault injection: nothing a user started is lost and no fault crashes the program.
//   kill -9 in the middle of a checkpoint write   -> the previous checkpoint loads, the run resumes
//   a full disk (file size limit) while saving    -> one clear error line, no corrupt checkpoint
//   NaN in the loss                               -> reported with its step; skipped or stopped
//                                                    with a checkpoint of the last good state
//   a truncated shard, a swapped tokenizer        -> refused before training starts
//   SIGTERM during evaluation or generation       -> a clean stop, exit 128 + 15, nothing written
// Faults are armed through MIXDIFF_FAULT (src/core/fault.h) or the shell (ulimit -f).
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "core/safetensors.h"
#include "support/support.h"
#include "train/checkpoint.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;
using test::run_mixdiff;

// The tiny fixture data, prepared once for this file.
const std::string& data_dir() {
  static const std::string d = [] {
    const std::string dir = test::scratch_dir("rel_data");
    test::tiny_setup(dir, dir + "/data");
    return dir + "/data";
  }();
  return d;
}

std::string recipe_in(const std::string& d) {
  test::write_text(d + "/recipe.yaml", test::tiny_recipe(data_dir()));
  return d + "/recipe.yaml";
}

bool has_tmp_folder(const std::string& ckpt_root) {
  if (!fs::exists(ckpt_root)) return false;
  for (const auto& e : fs::directory_iterator(ckpt_root)) {
    if (e.path().filename().string().find(".tmp-") != std::string::npos) return true;
  }
  return false;
}

bool all_finite(const std::string& safetensors) {
  for (const auto& kv : load_safetensors(safetensors)) {
    if (kv.second.is_floating_point() && !kv.second.isfinite().all().item<bool>()) return false;
  }
  return true;
}

TEST(E2EReliability, KillDuringACheckpointWriteLeavesTheLastOneLoadable) {
  const std::string d = test::scratch_dir("rel_kill");
  const std::string run = d + "/run";
  const int pid = test::spawn_mixdiff(
      {"train", recipe_in(d), "--out", run, "--set", "train.ckpt_every=5"}, d + "/out", d + "/err",
      {"MIXDIFF_FAULT=ckpt_file_delay_ms=400"});
  // Wait for the second checkpoint's write to be under way (the first one is complete).
  bool caught = false;
  for (int i = 0; i < 1200 && !caught; ++i) {
    caught = fs::exists(run + "/checkpoints/latest") && has_tmp_folder(run + "/checkpoints");
    if (!caught) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_TRUE(caught) << test::read_text(d + "/err");
  kill(pid, SIGKILL);
  EXPECT_EQ(test::wait_for(pid), 128 + SIGKILL);

  const std::string last = resolve_checkpoint(run);
  EXPECT_NO_THROW(verify_checkpoint(last));
  EXPECT_TRUE(all_finite(last + "/model.safetensors"));
  auto ev = run_mixdiff({"eval", "--ckpt", run});
  EXPECT_EQ(ev.status, 0) << ev.err;
  auto resumed = run_mixdiff({"train", "--resume", run});
  ASSERT_EQ(resumed.status, 0) << resumed.err << resumed.out;
  EXPECT_EQ(verify_checkpoint(resolve_checkpoint(run)).at("step").get<int64_t>(), 30);
  EXPECT_FALSE(has_tmp_folder(run + "/checkpoints"));  // the killed write's folder is gone
}

// `ulimit -f` makes every write past the limit fail with EFBIG (SIGXFSZ ignored), as a full disk
// makes it fail with ENOSPC: the same code path.
test::CmdResult run_with_file_limit(const std::string& d, int kib, const std::string& args) {
  const std::string cmd = "bash -c 'ulimit -f " + std::to_string(kib) + "; trap \"\" XFSZ; exec " +
                          test::mixdiff_binary() + " " + args + "' > " + d + "/out 2> " + d +
                          "/err";
  const int rc = std::system(cmd.c_str());
  test::CmdResult r;
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
  r.out = test::read_text(d + "/out");
  r.err = test::read_text(d + "/err");
  return r;
}

TEST(E2EReliability, AFullDiskGivesOneClearErrorAndKeepsThePreviousCheckpoint) {
  const std::string d = test::scratch_dir("rel_disk");
  const std::string run = d + "/run";
  const std::string recipe = recipe_in(d);
  auto first = run_mixdiff({"train", recipe, "--out", run, "--set", "train.steps=4"});
  ASSERT_EQ(first.status, 0) << first.err;
  const auto model_bytes = fs::file_size(resolve_checkpoint(run) + "/model.safetensors");
  // Resume to step 8 with room for the logs but not for another model file.
  auto r = run_with_file_limit(d, static_cast<int>(model_bytes / 1024 / 2),
                               "train --resume " + run + " --set train.steps=8");
  EXPECT_NE(r.status, 0);
  const auto err_lines = test::lines(r.err);
  ASSERT_EQ(err_lines.size(), 1u) << r.err;
  EXPECT_NE(err_lines[0].find("writing checkpoint"), std::string::npos) << r.err;
  EXPECT_NE(err_lines[0].find("File too large"), std::string::npos) << r.err;
  // The checkpoint of step 4 is still the latest, complete and loadable; nothing half-written.
  const std::string last = resolve_checkpoint(run);
  EXPECT_EQ(verify_checkpoint(last).at("step").get<int64_t>(), 4);
  EXPECT_FALSE(has_tmp_folder(run + "/checkpoints"));
  EXPECT_FALSE(fs::exists(run + "/checkpoints/step_8"));
  auto again = run_mixdiff({"train", "--resume", run, "--set", "train.steps=8"});
  EXPECT_EQ(again.status, 0) << again.err;
}

TEST(E2EReliability, NanLossStopsWithACheckpointOfTheLastGoodState) {
  const std::string d = test::scratch_dir("rel_nan_stop");
  const std::string run = d + "/run";
  auto r = run_mixdiff({"train", recipe_in(d), "--out", run, "--set", "train.steps=10"}, ".",
                       {"MIXDIFF_FAULT=nan_loss_at_step=4"});
  EXPECT_EQ(r.status, 3) << r.err;
  const std::string log = test::read_text(run + "/train.log") + r.out + r.err;
  EXPECT_NE(log.find("non-finite loss or gradient (loss nan) at step 4"), std::string::npos) << log;
  const std::string last = resolve_checkpoint(run);
  EXPECT_EQ(verify_checkpoint(last).at("step").get<int64_t>(), 3);
  EXPECT_TRUE(all_finite(last + "/model.safetensors"));
  auto resumed = run_mixdiff({"train", "--resume", run});
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  EXPECT_EQ(verify_checkpoint(resolve_checkpoint(run)).at("step").get<int64_t>(), 10);
}

TEST(E2EReliability, NanLossIsSkippedWhenTheRecipeSaysSo) {
  const std::string d = test::scratch_dir("rel_nan_skip");
  const std::string run = d + "/run";
  auto r = run_mixdiff({"train", recipe_in(d), "--out", run, "--set", "train.steps=10", "--set",
                        "train.on_nonfinite=skip"},
                       ".", {"MIXDIFF_FAULT=nan_loss_at_step=4"});
  ASSERT_EQ(r.status, 0) << r.err;
  const std::string log = test::read_text(run + "/train.log");
  EXPECT_NE(log.find("at step 4; update skipped (1 in a row, at most 10)"), std::string::npos)
      << log;
  const std::string last = resolve_checkpoint(run);
  EXPECT_EQ(verify_checkpoint(last).at("step").get<int64_t>(), 10);
  EXPECT_TRUE(all_finite(last + "/model.safetensors"));
  auto bad = run_mixdiff({"train", recipe_in(d), "--out", d + "/r2", "--set",
                          "train.on_nonfinite=ignore"});
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("train.on_nonfinite"), std::string::npos) << bad.err;
}

TEST(E2EReliability, TruncatedShardOrSwappedTokenizerIsRefusedBeforeTraining) {
  const std::string d = test::scratch_dir("rel_data_bad");
  fs::copy(data_dir(), d + "/data", fs::copy_options::recursive);
  std::string recipe = test::tiny_recipe(d + "/data");
  test::write_text(d + "/recipe.yaml", recipe);
  // Truncate the first training shard by a few bytes.
  std::string shard;
  for (const auto& e : fs::directory_iterator(d + "/data")) {
    const std::string n = e.path().filename().string();
    if (n.find("train") != std::string::npos && n.find(".bin") != std::string::npos) {
      shard = e.path().string();
      break;
    }
  }
  ASSERT_FALSE(shard.empty());
  const std::string saved = test::read_text(shard);
  fs::resize_file(shard, fs::file_size(shard) - 3);
  auto r = run_mixdiff({"train", d + "/recipe.yaml", "--out", d + "/run"});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find(fs::path(shard).filename().string()), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(d + "/run/checkpoints"));
  EXPECT_FALSE(fs::exists(d + "/run/metrics.jsonl"));
  test::write_text(shard, saved);

  // A tokenizer that is not the one the shards were made with: two merges swapped.
  const std::string mp = d + "/data/tokenizer/vocab.bpe";
  auto merges = test::read_text(mp);
  const auto l1 = merges.find('\n') + 1, l2 = merges.find('\n', l1) + 1, l3 = merges.find('\n', l2) + 1;
  merges = merges.substr(0, l1) + merges.substr(l2, l3 - l2) + merges.substr(l1, l2 - l1) +
           merges.substr(l3);
  test::write_text(mp, merges);
  auto r2 = run_mixdiff({"train", d + "/recipe.yaml", "--out", d + "/run2"});
  EXPECT_NE(r2.status, 0);
  EXPECT_NE(r2.err.find("tokenizer"), std::string::npos) << r2.err;
  EXPECT_FALSE(fs::exists(d + "/run2/checkpoints"));
}

void expect_clean_sigterm(const std::string& d, const std::vector<std::string>& args) {
  const int pid = test::spawn_mixdiff(args, d + "/out", d + "/err",
                                      {"MIXDIFF_FAULT=generate_delay_ms=300"});
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  kill(pid, SIGTERM);
  EXPECT_EQ(test::wait_for(pid), 128 + SIGTERM) << test::read_text(d + "/err");
  const auto err = test::lines(test::read_text(d + "/err"));
  ASSERT_FALSE(err.empty());
  EXPECT_NE(err.back().find("stopped: interrupted by signal 15"), std::string::npos) << err.back();
  EXPECT_EQ(test::read_text(d + "/out").find("sample:"), std::string::npos);
}

TEST(E2EReliability, SigtermDuringGenerationOrEvaluationStopsCleanly) {
  const std::string d = test::scratch_dir("rel_term");
  const std::string run = d + "/run";
  auto r = run_mixdiff({"train", recipe_in(d), "--out", run, "--set", "train.steps=2"});
  ASSERT_EQ(r.status, 0) << r.err;
  expect_clean_sigterm(d, {"generate", "--ckpt", run, "--set", "generate.sampler.steps=64",
                           "--set", "generate.sampler.gen_length=32"});
  expect_clean_sigterm(d, {"eval", "--ckpt", run, "--set", "eval.sequences=64", "--set",
                           "eval.batch_size=1"});
}

}  // namespace
}  // namespace mixdiff
