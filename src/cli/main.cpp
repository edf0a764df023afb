// `mixdiff`: one binary, subcommands in the habit of git. This file only parses arguments (one
// function per subcommand); the work is in src/app. Bad input ends with one line "error: ..." and
// exit status 2; an internal failure with "internal error: ..." and exit status 1.
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <exception>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "app/app.h"
#include "core/errors.h"
#include "core/signals.h"

namespace {

const char* kSetHelp =
    "override a recipe value, e.g. --set train.steps=200 (repeatable; value parsed as YAML)";

/// A subcommand: its node in the parser and what runs it once parsed. Each *_command below adds
/// one subcommand (its options bound to its own argument struct) and returns it.
struct Command {
  CLI::App* cli = nullptr;
  std::function<int()> run;
};

Command train_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::TrainArgs>();
  auto* t = app.add_subcommand("train", "train a model from a YAML recipe (or resume a run)");
  t->add_option("recipe", a->recipe, "recipe file (optional with --resume: the checkpoint's)");
  t->add_option("--set", a->overrides, kSetHelp)->allow_extra_args(false);
  t->add_option("--out", a->out, "run folder (default runs/<name>)");
  t->add_option("--resume", a->resume,
                "continue from a run folder (its latest checkpoint) or a checkpoint folder");
  t->footer(
      "Writes <run>/recipe.yaml (resolved), metrics.jsonl, train.log and "
      "checkpoints/step_<N>/.\nSIGINT/SIGTERM save a checkpoint and exit with 128+signal.");
  return {t, [a] { return mixdiff::cmd_train(*a); }};
}

Command generate_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::GenerateArgs>();
  auto* g = app.add_subcommand("generate", "sample text from a checkpoint");
  g->add_option("--ckpt", a->ckpt, "run folder or checkpoint folder")->required();
  g->add_option("--prompt", a->prompts, "prompt text (repeatable; default generate.prompt)")
      ->allow_extra_args(false);
  g->add_option("--set", a->overrides, kSetHelp + std::string(", e.g. generate.sampler.steps=32"))
      ->allow_extra_args(false);
  g->footer("The model, tokenizer and sampler settings come from the checkpoint's own recipe.");
  return {g, [a] { return mixdiff::cmd_generate(*a); }};
}

Command eval_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::EvalArgs>();
  auto* e = app.add_subcommand("eval", "validation NELBO and downstream tasks of a checkpoint");
  e->add_option("--ckpt", a->ckpt, "run folder or checkpoint folder")->required();
  e->add_option("--task", a->tasks,
                "a task file (JSON Lines) or built-in task (wordnet_mc, kjv_cloze); repeatable; "
                "'none': the NELBO only. Default: the NELBO and every built-in task")
      ->allow_extra_args(false);
  e->add_option("--requests", a->requests,
                "answer lm-eval requests (JSON Lines; tools/lm_eval_mixdiff.py) instead");
  e->add_option("--out", a->out, "where --requests writes its answers (JSON Lines)");
  e->add_option("--set", a->overrides,
                kSetHelp + std::string(", e.g. eval.sequences=512 or tasks.samples=32"))
      ->allow_extra_args(false);
  return {e, [a] { return mixdiff::cmd_eval(*a); }};
}

Command inspect_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::InspectArgs>();
  auto* i = app.add_subcommand(
      "inspect", "list registries; print a resolved recipe (--recipe); describe a checkpoint");
  i->add_option("--recipe", a->recipe, "print this recipe fully resolved (defaults filled in)");
  i->add_option("--ckpt", a->ckpt, "verify and describe a checkpoint");
  i->add_flag("--memory", a->memory,
              "with --recipe: the memory plan per rank (parameters, gradients, optimizer state, "
              "activations by block with and without checkpointing, communication buffers)");
  i->add_option("--world", a->world, "with --memory: the number of ranks to plan for (default 1)")
      ->check(CLI::PositiveNumber);
  i->add_option("--set", a->overrides, kSetHelp)->allow_extra_args(false);
  return {i, [a] { return mixdiff::cmd_inspect(*a); }};
}

Command data_prepare_command(CLI::App& data) {
  auto a = std::make_shared<mixdiff::PrepareArgs>();
  auto* dp = data.add_subcommand(
      "prepare",
      "read the recipe's data.prepare corpora, train or load its tokenizer, write token shards");
  dp->add_option("recipe", a->recipe, "recipe whose data section to prepare")->required();
  dp->add_option("--set", a->overrides, kSetHelp)->allow_extra_args(false);
  dp->add_flag("--force", a->force, "rebuild even if data.path already holds prepared data");
  return {dp, [a] { return mixdiff::cmd_data_prepare(*a); }};
}

Command sweep_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::SweepArgs>();
  auto* sc = app.add_subcommand(
      "sweep", "run an ablation sweep: one table (results.csv/.md) and one report.html");
  sc->add_option("file", a->file, "sweep file (recipes/sweeps/*.yaml)")->required();
  sc->add_flag("--dry-run", a->dry_run, "expand, validate every cell and print the plan only");
  sc->add_option("--jobs", a->jobs, "cells run at the same time")->capture_default_str();
  sc->add_option("--launch", a->launch, "run each cell as `mixdiff launch` with this many workers");
  sc->add_option("--out", a->out, "runs root (default runs/): cells go to <out>/<sweep>/<cell>");
  sc->add_option("--set", a->overrides, kSetHelp + std::string(" (every cell)"))
      ->allow_extra_args(false);
  sc->footer("Finished cells are skipped and checkpointed ones resumed: re-run the same command "
             "after an interrupt.");
  return {sc, [a] { return mixdiff::cmd_sweep(*a); }};
}

Command report_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::ReportArgs>();
  auto* rp = app.add_subcommand("report", "write report.html for a run, or report.html and the result tables for a sweep folder");
  rp->add_option("path", a->path, "run folder (runs/NAME) or sweep folder (runs/SWEEP)")
      ->required();
  return {rp, [a] { return mixdiff::cmd_report(*a); }};
}

Command upcycle_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::UpcycleArgs>();
  auto* uc = app.add_subcommand(
      "upcycle", "dense -> MoE or E -> mE experts from a checkpoint, as a resumable run");
  uc->add_option("--ckpt", a->ckpt, "source run folder or checkpoint folder")->required();
  uc->add_option("--recipe", a->recipe, "target recipe (its upcycle: section sets the method)")
      ->required();
  uc->add_option("--out", a->out, "run folder to write (default runs/<target name>)");
  uc->add_option("--set", a->overrides, kSetHelp)->allow_extra_args(false);
  uc->footer("Then: mixdiff train --resume OUT. The checkpoint's trainer_state.json records the "
             "provenance.");
  return {uc, [a] { return mixdiff::cmd_upcycle(*a); }};
}

Command import_hf_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::ImportHfArgs>();
  auto* c = app.add_subcommand(
      "import-hf", "a Hugging Face model folder (llama, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, "
                   "olmoe, or an export-hf folder) as a MixDiff checkpoint, with a diffusion "
                   "adaptation recipe");
  c->add_option("dir", a->dir, "folder with config.json, safetensors and tokenizer.json")->required();
  c->add_option("--out", a->out, "run folder to write")->required();
  c->add_option("--recipe-out", a->recipe_out,
                "write the adaptation recipe here (init: names the imported checkpoint)");
  c->add_option("--attention", a->attention,
                "full (diffusion, default) or causal (to check against the source)");
  c->footer("Then: mixdiff data prepare R.yaml && mixdiff train R.yaml (R.yaml from --recipe-out); "
            "mixdiff generate/eval --ckpt OUT read the imported checkpoint directly.");
  return {c, [a] { return mixdiff::cmd_import_hf(*a); }};
}

Command export_hf_command(CLI::App& app) {
  auto a = std::make_shared<mixdiff::ExportHfArgs>();
  auto* c = app.add_subcommand("export-hf", "a checkpoint as a folder that transformers loads");
  c->add_option("--ckpt", a->ckpt, "run folder or checkpoint folder")->required();
  c->add_option("--out", a->out, "folder to write")->required();
  c->add_option("--as", a->as,
                "auto (default: a causal architecture when the model is causal and one fits, "
                "else mixdiff), causal, or mixdiff (config + modeling_mixdiff.py, "
                "trust_remote_code)");
  return {c, [a] { return mixdiff::cmd_export_hf(*a); }};
}

/// `worker`: the command line after the first "--".
Command launch_command(CLI::App& app, const std::vector<std::string>& worker) {
  auto a = std::make_shared<mixdiff::LaunchArgs>();
  auto* l = app.add_subcommand(
      "launch", "start data-parallel workers of this binary (torchrun-style; c10d Gloo)");
  l->add_option("--nproc-per-node", a->nproc_per_node, "workers on this node")
      ->capture_default_str();
  l->add_option("--nnodes", a->nnodes, "nodes taking part")->capture_default_str();
  l->add_option("--node-rank", a->node_rank, "this node's index, 0..nnodes-1")
      ->capture_default_str();
  l->add_option("--master-addr", a->master_addr, "address of the node of global rank 0")
      ->capture_default_str();
  l->add_option("--master-port", a->master_port, "port of the rendezvous store")
      ->capture_default_str();
  l->add_option("--grace", a->grace_s,
                "seconds the other workers get to exit after one fails, then SIGKILL")
      ->capture_default_str();
  l->footer(
      "The worker command follows '--', e.g.\n"
      "  mixdiff launch --nproc-per-node 2 -- train recipes/quickstart_moe.yaml\n"
      "Two nodes: run one launcher on each with --nnodes 2 --node-rank 0|1 and the same\n"
      "--master-addr/--master-port. Workers get RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,\n"
      "MASTER_ADDR, MASTER_PORT; any launcher that sets them (torchrun --no-python, Slurm) works.");
  return {l, [a, worker] {
            a->command = worker;
            return mixdiff::cmd_launch(*a);
          }};
}

Command bench_moe_layer_command(CLI::App& bench) {
  auto a = std::make_shared<mixdiff::BenchMoeArgs>();
  auto* bml = bench.add_subcommand(
      "moe-layer", "forward+backward of one MoE layer vs a dense SwiGLU of equal active FLOPs");
  bml->add_option("--tokens", a->tokens, "tokens T per forward")->capture_default_str();
  bml->add_option("--d-model", a->d_model, "model width D")->capture_default_str();
  bml->add_option("--d-expert", a->d_expert, "expert width F")->capture_default_str();
  bml->add_option("--top-k", a->top_k, "experts per token K (dense d_ff = K F)")
      ->capture_default_str();
  bml->add_option("--experts", a->experts, "expert counts E to measure")
      ->delimiter(',')
      ->capture_default_str();
  std::vector<std::string> dispatchers;  // the `dispatchers` registry's entries
  for (const auto& r : mixdiff::list_registries()) {
    if (r.kind != "dispatchers") continue;
    for (const auto& e : r.entries) dispatchers.push_back(e.first);
  }
  bml->add_option("--dispatch", a->dispatch, "a dispatchers entry (mixdiff inspect)")
      ->check(CLI::IsMember(dispatchers))
      ->capture_default_str();
  bml->add_option("--repeats", a->repeats, "timed repeats (median reported)")
      ->capture_default_str();
  bml->add_option("--threads", a->threads, "LibTorch intra-op threads")->capture_default_str();
  bml->add_option("--json", a->json, "also write the JSON result to this file");
  return {bml, [a] { return mixdiff::cmd_bench_moe_layer(*a); }};
}

Command bench_train_command(CLI::App& bench) {
  auto a = std::make_shared<mixdiff::BenchTrainArgs>();
  auto* btr =
      bench.add_subcommand("train", "the training step on random tokens of a recipe's shape");
  btr->add_option("recipe", a->recipe, "recipe")->required();
  btr->add_option("--set", a->overrides, kSetHelp)->allow_extra_args(false);
  btr->add_option("--steps", a->steps, "timed steps")->capture_default_str();
  btr->add_option("--warmup", a->warmup, "untimed steps first")->capture_default_str();
  btr->add_option("--vocab", a->vocab, "vocabulary when the recipe leaves it to the data")
      ->capture_default_str();
  btr->add_flag("--profile", a->profile, "time per component (attention, routing, experts, ...)");
  return {btr, [a] { return mixdiff::cmd_bench_train(*a); }};
}

Command bench_generate_command(CLI::App& bench) {
  auto a = std::make_shared<mixdiff::BenchGenerateArgs>();
  auto* bge = bench.add_subcommand("generate", "generation with a checkpoint's sampler");
  bge->add_option("--ckpt", a->ckpt, "run or checkpoint folder")->required();
  bge->add_option("--set", a->overrides, kSetHelp)->allow_extra_args(false);
  bge->add_option("--repeats", a->repeats, "timed generations (median)")->capture_default_str();
  bge->add_option("--prompt-len", a->prompt_len, "random prompt tokens")->capture_default_str();
  bge->add_flag("--profile", a->profile, "time per component (attention, routing, experts, ...)");
  return {bge, [a] { return mixdiff::cmd_bench_generate(*a); }};
}

/// `launch ... -- WORKER ARGS`: everything after the first "--" is the worker's command line;
/// argc is cut before it.
std::vector<std::string> take_worker_command(int& argc, char** argv) {
  for (int k = 1; k < argc; ++k) {
    if (std::string(argv[k]) == "--") {
      std::vector<std::string> worker(argv + k + 1, argv + argc);
      argc = k;
      return worker;
    }
  }
  return {};
}

int run(int argc, char** argv) {
  CLI::App app{
      "MixDiff: train and study Mixture-of-Experts diffusion language models.\n"
      "Typical session:\n"
      "  mixdiff data prepare recipes/quickstart.yaml     # corpus -> tokenizer -> token shards\n"
      "  mixdiff train recipes/quickstart.yaml            # -> runs/quickstart/\n"
      "  mixdiff generate --ckpt runs/quickstart --prompt 'And God said'\n"
      "  mixdiff eval --ckpt runs/quickstart              # validation NELBO\n"
      "  mixdiff inspect                                  # every registry and its entries\n"
      "  mixdiff inspect --recipe R.yaml --memory         # bytes per rank before training\n"
      "  mixdiff sweep recipes/sweeps/balancing.yaml      # ablations -> one table, one report\n"
      "  mixdiff launch --nproc-per-node 2 -- train R.yaml  # data parallel (c10d Gloo)",
      "mixdiff"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "help for every subcommand");
  const std::vector<std::string> worker = take_worker_command(argc, argv);

  std::vector<Command> commands = {train_command(app), generate_command(app), eval_command(app),
                                   inspect_command(app)};
  auto* data = app.add_subcommand("data", "data preparation");
  data->require_subcommand(1);
  commands.push_back(data_prepare_command(*data));
  commands.push_back(sweep_command(app));
  commands.push_back(report_command(app));
  commands.push_back(upcycle_command(app));
  commands.push_back(import_hf_command(app));
  commands.push_back(export_hf_command(app));
  const Command launch = launch_command(app, worker);
  commands.push_back(launch);
  auto* bench = app.add_subcommand("bench", "benchmarks measured side by side in one process");
  bench->require_subcommand(1);
  commands.push_back(bench_moe_layer_command(*bench));
  commands.push_back(bench_train_command(*bench));
  commands.push_back(bench_generate_command(*bench));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& err) {
    return app.exit(err) == 0 ? 0 : 2;
  }
  if (!worker.empty() && !launch.cli->parsed()) {
    std::cerr << "error: '--' separates a worker command only for `mixdiff launch`" << std::endl;
    return 2;
  }
  for (const Command& c : commands) {
    if (c.cli->parsed()) return c.run();
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
