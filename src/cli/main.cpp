// `mixdiff`: one binary, subcommands in the habit of git. This file only parses arguments; the
// work is in src/app. Bad input ends with one line "error: ..." and exit status 2; an internal
// failure with "internal error: ..." and exit status 1.
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "app/app.h"
#include "core/errors.h"
#include "core/signals.h"

namespace {

const char* kSetHelp =
    "override a recipe value, e.g. --set train.steps=200 (repeatable; value parsed as YAML)";

int run(int argc, char** argv) {
  CLI::App app{
      "MixDiff: train and study Mixture-of-Experts diffusion language models.\n"
      "Typical session:\n"
      "  mixdiff data prepare recipes/quickstart.yaml     # corpus -> tokenizer -> token shards\n"
      "  mixdiff train recipes/quickstart.yaml            # -> runs/quickstart/\n"
      "  mixdiff generate --ckpt runs/quickstart --prompt 'And God said'\n"
      "  mixdiff eval --ckpt runs/quickstart              # validation NELBO\n"
      "  mixdiff inspect                                  # every registry and its entries\n"
      "  mixdiff sweep recipes/sweeps/balancing.yaml      # ablations -> one table, one report\n"
      "  mixdiff launch --nproc-per-node 2 -- train R.yaml  # data parallel (c10d Gloo)",
      "mixdiff"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "help for every subcommand");

  mixdiff::TrainArgs train;
  auto* t = app.add_subcommand("train", "train a model from a YAML recipe (or resume a run)");
  t->add_option("recipe", train.recipe, "recipe file (optional with --resume: the checkpoint's)");
  t->add_option("--set", train.overrides, kSetHelp)->allow_extra_args(false);
  t->add_option("--out", train.out, "run folder (default runs/<name>)");
  t->add_option("--resume", train.resume,
                "continue from a run folder (its latest checkpoint) or a checkpoint folder");
  t->footer(
      "Writes <run>/recipe.yaml (resolved), metrics.jsonl, train.log and "
      "checkpoints/step_<N>/.\nSIGINT/SIGTERM save a checkpoint and exit with 128+signal.");

  mixdiff::GenerateArgs gen;
  auto* g = app.add_subcommand("generate", "sample text from a checkpoint");
  g->add_option("--ckpt", gen.ckpt, "run folder or checkpoint folder")->required();
  g->add_option("--prompt", gen.prompts, "prompt text (repeatable; default generate.prompt)")
      ->allow_extra_args(false);
  g->add_option("--set", gen.overrides, kSetHelp + std::string(", e.g. generate.sampler.steps=32"))
      ->allow_extra_args(false);
  g->footer("The model, tokenizer and sampler settings come from the checkpoint's own recipe.");

  mixdiff::EvalArgs ev;
  auto* e = app.add_subcommand("eval", "validation NELBO of a checkpoint");
  e->add_option("--ckpt", ev.ckpt, "run folder or checkpoint folder")->required();
  e->add_option("--set", ev.overrides, kSetHelp + std::string(", e.g. eval.sequences=512"))
      ->allow_extra_args(false);

  mixdiff::InspectArgs in;
  auto* i = app.add_subcommand(
      "inspect", "list registries; print a resolved recipe (--recipe); describe a checkpoint");
  i->add_option("--recipe", in.recipe, "print this recipe fully resolved (defaults filled in)");
  i->add_option("--ckpt", in.ckpt, "verify and describe a checkpoint");
  i->add_option("--set", in.overrides, kSetHelp)->allow_extra_args(false);

  auto* d = app.add_subcommand("data", "data preparation");
  d->require_subcommand(1);
  mixdiff::PrepareArgs prep;
  auto* dp = d->add_subcommand(
      "prepare",
      "read the recipe's data.prepare corpora, train or load its tokenizer, write token shards");
  dp->add_option("recipe", prep.recipe, "recipe whose data section to prepare")->required();
  dp->add_option("--set", prep.overrides, kSetHelp)->allow_extra_args(false);
  dp->add_flag("--force", prep.force, "rebuild even if data.path already holds prepared data");

  mixdiff::SweepArgs sw;
  auto* sc = app.add_subcommand(
      "sweep", "run an ablation sweep: one table (results.csv/.md) and one report.html");
  sc->add_option("file", sw.file, "sweep file (recipes/sweeps/*.yaml)")->required();
  sc->add_flag("--dry-run", sw.dry_run, "expand, validate every cell and print the plan only");
  sc->add_option("--jobs", sw.jobs, "cells run at the same time")->capture_default_str();
  sc->add_option("--launch", sw.launch, "run each cell as `mixdiff launch` with this many workers");
  sc->add_option("--out", sw.out, "runs root (default runs/): cells go to <out>/<sweep>/<cell>");
  sc->add_option("--set", sw.overrides, kSetHelp + std::string(" (every cell)"))
      ->allow_extra_args(false);
  sc->footer("Finished cells are skipped and checkpointed ones resumed: re-run the same command "
             "after an interrupt.");

  mixdiff::ReportArgs rep;
  auto* rp = app.add_subcommand("report", "write report.html for a run or a sweep folder");
  rp->add_option("path", rep.path, "run folder (runs/NAME) or sweep folder (runs/SWEEP)")
      ->required();

  mixdiff::UpcycleArgs up;
  auto* uc = app.add_subcommand(
      "upcycle", "dense -> MoE or E -> mE experts from a checkpoint, as a resumable run");
  uc->add_option("--ckpt", up.ckpt, "source run folder or checkpoint folder")->required();
  uc->add_option("--recipe", up.recipe, "target recipe (its upcycle: section sets the method)")
      ->required();
  uc->add_option("--out", up.out, "run folder to write (default runs/<target name>)");
  uc->add_option("--set", up.overrides, kSetHelp)->allow_extra_args(false);
  uc->footer("Then: mixdiff train --resume OUT. The checkpoint's trainer_state.json records the "
             "provenance.");

  mixdiff::LaunchArgs la;
  auto* l = app.add_subcommand(
      "launch", "start data-parallel workers of this binary (torchrun-style; c10d Gloo)");
  l->add_option("--nproc-per-node", la.nproc_per_node, "workers on this node")->capture_default_str();
  l->add_option("--nnodes", la.nnodes, "nodes taking part")->capture_default_str();
  l->add_option("--node-rank", la.node_rank, "this node's index, 0..nnodes-1")->capture_default_str();
  l->add_option("--master-addr", la.master_addr, "address of the node of global rank 0")
      ->capture_default_str();
  l->add_option("--master-port", la.master_port, "port of the rendezvous store")
      ->capture_default_str();
  l->add_option("--grace", la.grace_s,
                "seconds the other workers get to exit after one fails, then SIGKILL")
      ->capture_default_str();
  l->footer(
      "The worker command follows '--', e.g.\n"
      "  mixdiff launch --nproc-per-node 2 -- train recipes/quickstart_moe.yaml\n"
      "Two nodes: run one launcher on each with --nnodes 2 --node-rank 0|1 and the same\n"
      "--master-addr/--master-port. Workers get RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,\n"
      "MASTER_ADDR, MASTER_PORT; any launcher that sets them (torchrun --no-python, Slurm) works.");

  auto* b = app.add_subcommand("bench", "benchmarks measured side by side in one process");
  b->require_subcommand(1);
  mixdiff::BenchMoeArgs bm;
  auto* bml = b->add_subcommand(
      "moe-layer", "forward+backward of one MoE layer vs a dense SwiGLU of equal active FLOPs");
  bml->add_option("--tokens", bm.tokens, "tokens T per forward")->capture_default_str();
  bml->add_option("--d-model", bm.d_model, "model width D")->capture_default_str();
  bml->add_option("--d-expert", bm.d_expert, "expert width F")->capture_default_str();
  bml->add_option("--top-k", bm.top_k, "experts per token K (dense d_ff = K F)")
      ->capture_default_str();
  bml->add_option("--experts", bm.experts, "expert counts E to measure")
      ->delimiter(',')
      ->capture_default_str();
  std::vector<std::string> dispatchers;  // the `dispatchers` registry's entries
  for (const auto& r : mixdiff::list_registries()) {
    if (r.kind != "dispatchers") continue;
    for (const auto& e : r.entries) dispatchers.push_back(e.first);
  }
  bml->add_option("--dispatch", bm.dispatch, "a dispatchers entry (mixdiff inspect)")
      ->check(CLI::IsMember(dispatchers))
      ->capture_default_str();
  bml->add_option("--repeats", bm.repeats, "timed repeats (median reported)")->capture_default_str();
  bml->add_option("--threads", bm.threads, "LibTorch intra-op threads")->capture_default_str();
  bml->add_option("--json", bm.json, "also write the JSON result to this file");

  // `launch ... -- WORKER ARGS`: everything after the first "--" is the worker's command line.
  std::vector<std::string> worker;
  for (int k = 1; k < argc; ++k) {
    if (std::string(argv[k]) == "--") {
      worker.assign(argv + k + 1, argv + argc);
      argc = k;
      break;
    }
  }
  mixdiff::BenchTrainArgs bt;
  auto* btr = b->add_subcommand("train", "the training step on random tokens of a recipe's shape");
  btr->add_option("recipe", bt.recipe, "recipe")->required();
  btr->add_option("--set", bt.overrides, kSetHelp)->allow_extra_args(false);
  btr->add_option("--steps", bt.steps, "timed steps")->capture_default_str();
  btr->add_option("--warmup", bt.warmup, "untimed steps first")->capture_default_str();
  btr->add_option("--vocab", bt.vocab, "vocabulary when the recipe leaves it to the data")
      ->capture_default_str();
  btr->add_flag("--profile", bt.profile, "time per component (attention, routing, experts, ...)");
  mixdiff::BenchGenerateArgs bg;
  auto* bge = b->add_subcommand("generate", "generation with a checkpoint's sampler");
  bge->add_option("--ckpt", bg.ckpt, "run or checkpoint folder")->required();
  bge->add_option("--set", bg.overrides, kSetHelp)->allow_extra_args(false);
  bge->add_option("--repeats", bg.repeats, "timed generations (median)")->capture_default_str();
  bge->add_option("--prompt-len", bg.prompt_len, "random prompt tokens")->capture_default_str();
  bge->add_flag("--profile", bg.profile, "time per component (attention, routing, experts, ...)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& err) {
    return app.exit(err) == 0 ? 0 : 2;
  }
  if (t->parsed()) return mixdiff::cmd_train(train);
  if (g->parsed()) return mixdiff::cmd_generate(gen);
  if (e->parsed()) return mixdiff::cmd_eval(ev);
  if (i->parsed()) return mixdiff::cmd_inspect(in);
  if (dp->parsed()) return mixdiff::cmd_data_prepare(prep);
  if (bml->parsed()) return mixdiff::cmd_bench_moe_layer(bm);
  if (btr->parsed()) return mixdiff::cmd_bench_train(bt);
  if (bge->parsed()) return mixdiff::cmd_bench_generate(bg);
  if (sc->parsed()) return mixdiff::cmd_sweep(sw);
  if (uc->parsed()) return mixdiff::cmd_upcycle(up);
  if (rp->parsed()) return mixdiff::cmd_report(rep);
  if (l->parsed()) {
    la.command = worker;
    return mixdiff::cmd_launch(la);
  }
  if (!worker.empty()) {
    std::cerr << "error: '--' separates a worker command only for `mixdiff launch`" << std::endl;
    return 2;
  }
  return 2;
}

// c10::Error messages carry a backtrace after the first line; keep the first line.
std::string first_line(const std::string& s) {
  const size_t nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

}  // namespace

// "[rank 3] " for a worker of a multi-process run, so that its errors name it.
std::string rank_prefix() {
  const char* r = std::getenv("RANK");
  const char* w = std::getenv("WORLD_SIZE");
  if (!r || !w || std::string(w) == "1") return "";
  return std::string("[rank ") + r + "] ";
}

int main(int argc, char** argv) {
  mixdiff::configure_process();
  try {
    return run(argc, argv);
  } catch (const mixdiff::InputError& e) {
    std::cerr << rank_prefix() << "error: " << first_line(e.what()) << std::endl;
    return 2;
  } catch (const mixdiff::Interrupted& e) {
    std::cerr << rank_prefix() << "stopped: " << e.what() << "; nothing was written" << std::endl;
    return 128 + e.signal;
  } catch (const std::exception& e) {
    std::cerr << rank_prefix() << "internal error: " << first_line(e.what()) << std::endl;
    return 1;
  }
}
