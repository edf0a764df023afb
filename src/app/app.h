// The subcommands of `mixdiff`, as plain functions (the CLI in src/cli/main.cpp only parses
// arguments). Each returns the process exit status and throws InputError for bad input, which
// the CLI prints as one line.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/registry.h"
#include "moe/block_routing.h"

namespace mixdiff {

class ModelBase;
class DataSource;
class Tokenizer;
struct GenerateSettings;

struct TrainArgs {
  std::string recipe;                  ///< may be empty with --resume (the checkpoint's recipe)
  std::vector<std::string> overrides;  ///< "key.path=value"
  std::string out;                     ///< run folder; default runs/<name>
  std::string resume;                  ///< run folder or checkpoint folder
};
int cmd_train(const TrainArgs& a);

struct GenerateArgs {
  std::string ckpt;  ///< run folder or checkpoint folder
  std::vector<std::string> prompts;  ///< overrides generate.prompt; several give a batch
  std::vector<std::string> overrides;
};
int cmd_generate(const GenerateArgs& a);

struct EvalArgs {
  std::string ckpt;
  std::vector<std::string> overrides;
  /// Task files or built-in task names; empty: the validation NELBO and every built-in task;
  /// "none": the NELBO only. With tasks named, the NELBO is skipped.
  std::vector<std::string> tasks;
  std::string requests;  ///< lm-eval requests (JSON Lines) to answer instead
  std::string out;       ///< where the answers go (with --requests)
};
int cmd_eval(const EvalArgs& a);

struct InspectArgs {
  std::string recipe;  ///< print the resolved recipe
  std::string ckpt;    ///< describe a checkpoint
  bool memory = false; ///< with recipe: the memory plan (train/memory_plan.h)
  int world = 1;       ///< ranks the memory plan is for
  std::vector<std::string> overrides;
};
int cmd_inspect(const InspectArgs& a);

struct PrepareArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  bool force = false;
};
int cmd_data_prepare(const PrepareArgs& a);

struct BenchMoeArgs {
  int64_t tokens = 2048;
  int64_t d_model = 256;
  int64_t d_expert = 176;
  int64_t top_k = 4;
  std::vector<int64_t> experts{8, 16, 32, 64};
  std::string dispatch = "sorted";
  int repeats = 10;
  int threads = 1;
  std::string json;  ///< also write the JSON result here
};
/// `mixdiff bench moe-layer`: MoE layer vs dense FFN of equal active FLOPs, over E.
int cmd_bench_moe_layer(const BenchMoeArgs& a);

struct BenchTrainArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  int64_t steps = 10, warmup = 2, vocab = 4096;
  bool profile = false;
};
/// `mixdiff bench train`: the trainer's step on random tokens: tokens/s (forward/backward), MFU,
/// peak memory, and with --profile the time per component.
int cmd_bench_train(const BenchTrainArgs& a);

struct BenchGenerateArgs {
  std::string ckpt;
  std::vector<std::string> overrides;
  int repeats = 3;
  int64_t prompt_len = 8;
  bool profile = false;
};
/// `mixdiff bench generate`: the checkpoint's sampler: tokens/s, forwards per token, peak memory.
int cmd_bench_generate(const BenchGenerateArgs& a);

/// The recipe's `infer` section for block-routing evaluation (src/app/block_eval.cpp):
/// infer.block_routing {kind, block_size, policy keys}, infer.infill {samples, context, span, seed}.
/// infer.decode {prompts, prompt_tokens}: the held-out prompts that every cache mode of a
/// block_diffusion sampler decodes, for speed and agreement with cache: none.
struct BlockEvalSettings {
  BlockRoutingConfig routing;
  int64_t samples = 64, context = 64, span = 4;
  uint64_t seed = 7;
  int64_t decode_prompts = 4, decode_prompt_tokens = 16;
  int64_t eval_sequences = 128, eval_batch_size = 32;
  uint64_t eval_seed = 1234;
  static BlockEvalSettings from(const ConfigNode& recipe);
};
/// Token-level vs block-routed: NELBO, infill exact match, unique experts, expert bytes per token,
/// generation speed; prints a table and returns the JSON.
nlohmann::json run_block_eval(ModelBase& model, DataSource& data, const BlockEvalSettings& s,
                              GenerateSettings& g, const Tokenizer& tok);

struct SweepArgs {
  std::string file;
  bool dry_run = false;
  int jobs = 1;                        ///< cells at a time
  int launch = 0;                      ///< >0: each cell as `mixdiff launch --nproc-per-node N`
  std::string out;                     ///< runs root (default runs/)
  std::vector<std::string> overrides;  ///< --set for every cell
};
/// `mixdiff sweep`: expand, validate, plan, run (resumable), results and report.
int cmd_sweep(const SweepArgs& a);

struct ReportArgs {
  std::string path;  ///< a run folder or a sweep folder
};
/// `mixdiff report`: writes report.html into the folder.
int cmd_report(const ReportArgs& a);

struct UpcycleArgs {
  std::string ckpt;    ///< source run or checkpoint
  std::string recipe;  ///< target recipe (its `upcycle:` section configures the method)
  std::string out;     ///< run folder to write (default runs/<target name>)
  std::vector<std::string> overrides;
};
/// `mixdiff upcycle`: dense -> MoE or E -> mE, written as a resumable run (src/app/upcycle.cpp).
int cmd_upcycle(const UpcycleArgs& a);

struct ImportHfArgs {
  std::string dir;         ///< Hugging Face model folder
  std::string out;         ///< run folder to write
  std::string recipe_out;  ///< where to write the adaptation recipe (empty: not written)
  std::string attention;   ///< full or causal; empty: full (an export-hf folder: its own)
};
/// `mixdiff import-hf` (src/app/hf_interchange.cpp).
int cmd_import_hf(const ImportHfArgs& a);

struct ExportHfArgs {
  std::string ckpt;
  std::string out;
  std::string as = "auto";  ///< auto, causal or mixdiff
};
/// `mixdiff export-hf` (src/app/hf_interchange.cpp).
int cmd_export_hf(const ExportHfArgs& a);

struct LaunchArgs {
  int nnodes = 1;
  int node_rank = 0;
  int nproc_per_node = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  double grace_s = 30;               ///< after a worker fails, how long the others get to exit
  std::vector<std::string> command;  ///< the worker's arguments, e.g. {"train", "r.yaml"}
};
/// `mixdiff launch`: torchrun-style multi-process (multi-node) launcher (src/app/launch.cpp).
int cmd_launch(const LaunchArgs& a);

/// Process-wide settings for training speed; call once at the start of main().
/// glibc serves allocations above a dynamic threshold with mmap/munmap, so every step of a
/// LibTorch loop page-faults its activations in again; raising the mmap threshold to its maximum
/// (32 MiB) and never trimming the heap keeps those pages. Measured on the quickstart (2 cores):
/// 3685 -> 4771 tokens/s, system time 16.7 s -> 7.8 s over 60 steps (README, "Performance").
void configure_process();

/// Every registry with its entries and help strings, in a fixed order.
std::vector<RegistryListing> list_registries();

}  // namespace mixdiff
