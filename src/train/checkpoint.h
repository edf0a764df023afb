// Checkpoints: runs/<name>/checkpoints/step_<N>/ holding
//   model.safetensors   parameters and buffers by name (standard safetensors; readable by
//                       other tools)
//   optimizer.pt        optimizer state (LibTorch archive, parameters in model order)
//   trainer_state.json  format version, step, tokens, data cursor, seed, RNG scheme, metrics,
//                       and the size + FNV-1a 64 fingerprint of every other file
//   recipe.yaml         the resolved recipe: inference needs nothing else
//   tokenizer/          the run's tokenizer
// A checkpoint is written into `step_<N>.tmp-<pid>/`, every file fsynced, then renamed to
// `step_<N>`; `checkpoints/latest` (written atomically) names the newest. A crash at any moment
// leaves the previous checkpoint intact. Loading verifies every fingerprint first, so a truncated
// or corrupt checkpoint is refused with the name of the bad file.
#pragma once

#include <ATen/core/Tensor.h>

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace mixdiff {

class ModelBase;

constexpr int kCheckpointFormatVersion = 1;

struct CheckpointContent {
  const ModelBase* model = nullptr;
  torch::optim::Optimizer* optimizer = nullptr;  ///< may be null (weights-only checkpoint)
  nlohmann::json trainer_state;                  ///< step, tokens, ... (files are added)
  std::string recipe_yaml;
  std::string tokenizer_dir;                     ///< copied into the checkpoint
};

/// Writes checkpoints/step_<step> under `run_dir`, updates `latest`, keeps the newest
/// `keep_last` checkpoints (0 keeps all). Returns the checkpoint folder.
std::string save_checkpoint(const std::string& run_dir, int64_t step, const CheckpointContent& c,
                            int64_t keep_last);

/// A checkpoint folder from a run folder (its `latest`) or a checkpoint folder itself.
/// Throws CheckpointError when neither.
std::string resolve_checkpoint(const std::string& run_or_ckpt);

/// Checks format version, presence, size and fingerprint of every file; returns the state.
nlohmann::json verify_checkpoint(const std::string& ckpt_dir);

/// Loads model.safetensors into `model`: every parameter must be present with its shape, and
/// no extra tensor may be left over (CheckpointError naming the tensor otherwise).
void load_model_weights(ModelBase& model, const std::string& safetensors_path);

/// Everything model.safetensors holds of a model: its parameters, then its buffers (routing
/// state such as the auxiliary-loss-free bias), by their dotted module names.
std::vector<std::pair<std::string, at::Tensor>> model_state(const torch::nn::Module& model);

void load_optimizer_state(torch::optim::Optimizer& opt, const std::string& path);

}  // namespace mixdiff
