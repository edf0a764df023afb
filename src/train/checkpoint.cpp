#include "train/checkpoint.h"

#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "core/compat.h"
#include "core/errors.h"
#include "core/fault.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "core/trainer_state.h"
#include "model/model.h"

namespace mixdiff {

namespace fs = std::filesystem;

namespace {

const char* const kFingerprinted[] = {"model.safetensors", "optimizer.pt", "recipe.yaml",
                                      "tokenizer/tokenizer.json", "tokenizer/encoder.json",
                                      "tokenizer/vocab.bpe"};

int64_t step_of(const std::string& name) {
  if (name.rfind("step_", 0) != 0) return -1;
  const std::string num = name.substr(5);
  if (num.empty() || num.size() > 18 || num.find_first_not_of("0123456789") != std::string::npos) {
    return -1;
  }
  return std::stoll(num);
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> model_state(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& kv : model.named_parameters(/*recurse=*/true)) out.emplace_back(kv.key(), kv.value());
  for (const auto& kv : model.named_buffers(/*recurse=*/true)) out.emplace_back(kv.key(), kv.value());
  return out;
}

std::string save_checkpoint(const std::string& run_dir, int64_t step, const CheckpointContent& c,
                            int64_t keep_last) {
  const std::string root = run_dir + "/checkpoints";
  const std::string final_dir = root + "/step_" + std::to_string(step);
  const std::string tmp = final_dir + ".tmp-" + std::to_string(::getpid());
  try {
    fs::create_directories(root);
    // Folders of writes that never finished (a writer killed mid-checkpoint) are garbage.
    for (const auto& e : fs::directory_iterator(root)) {
      if (e.path().filename().string().find(".tmp-") != std::string::npos) fs::remove_all(e.path());
    }
    fs::create_directories(tmp + "/tokenizer");
    fault::delay("ckpt_file_delay_ms");

    TensorMap tensors;
    for (const auto& kv : model_state(*c.model)) tensors.emplace(kv.first, kv.second);
    save_safetensors(tmp + "/model.safetensors", tensors,
                     {{"format", "pt"}, {"producer", "mixdiff"}, {"model", c.model->describe()}});
    fault::delay("ckpt_file_delay_ms");
    if (c.optimizer) {
      torch::save(*c.optimizer, tmp + "/optimizer.pt");
      fsync_path(tmp + "/optimizer.pt");
    }
    fault::delay("ckpt_file_delay_ms");
    write_file_atomic(tmp + "/recipe.yaml", c.recipe_yaml);
    for (const char* f : {"tokenizer.json", "encoder.json", "vocab.bpe"}) {
      write_file_atomic(tmp + "/tokenizer/" + f,
                        read_file(c.tokenizer_dir + "/" + f, "tokenizer file"));
    }
    nlohmann::json state = c.trainer_state;
    state["format_version"] = kCheckpointFormatVersion;
    state["step"] = step;
    state["torch_version"] = compat::torch_version();
    nlohmann::json files = nlohmann::json::object();
    for (const char* f : kFingerprinted) {
      const std::string p = tmp + "/" + f;
      if (!fs::exists(p)) continue;
      files[f] = {{"bytes", fs::file_size(p)}, {"fnv1a64", fnv1a64_file(p)}};
    }
    state["files"] = files;
    write_file_atomic(tmp + "/trainer_state.json", state.dump(2) + "\n");
    fsync_path(tmp + "/tokenizer");
    fsync_path(tmp);
    // Re-saving the same step (a stop after a non-finite step): the old folder is moved aside
    // first, so that a kill at any point leaves one complete step_N or the one before it.
    const std::string old = final_dir + ".tmp-old-" + std::to_string(::getpid());
    if (fs::exists(final_dir)) fs::rename(final_dir, old);
    fs::rename(tmp, final_dir);
    fs::remove_all(old);
    fsync_path(root);
    write_file_atomic(root + "/latest", "step_" + std::to_string(step) + "\n");
  } catch (const fs::filesystem_error& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw CheckpointError(str("writing checkpoint ", final_dir, " failed: ", e.what()));
  } catch (const InputError& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw CheckpointError(str("writing checkpoint ", final_dir, " failed: ", e.what()));
  } catch (const c10::Error& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw CheckpointError(str("writing checkpoint ", final_dir, " failed: ", e.what_without_backtrace()));
  }

  if (keep_last > 0) {
    std::vector<std::pair<int64_t, std::string>> all;
    for (const auto& e : fs::directory_iterator(root)) {
      const int64_t s = step_of(e.path().filename().string());
      if (s >= 0 && e.is_directory()) all.emplace_back(s, e.path().string());
    }
    std::sort(all.begin(), all.end());
    for (size_t i = 0; i + static_cast<size_t>(keep_last) < all.size(); ++i) {
      std::error_code ec;
      fs::remove_all(all[i].second, ec);
    }
  }
  return final_dir;
}

std::string resolve_checkpoint(const std::string& p) {
  if (fs::exists(p + "/trainer_state.json")) return p;
  for (const std::string& root : {p + "/checkpoints", p}) {
    if (fs::exists(root + "/latest")) {
      std::string name = read_file(root + "/latest", "checkpoint pointer");
      while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
      if (step_of(name) < 0) {
        throw CheckpointError(str(root, "/latest: expected 'step_<N>', got '", name, "'"));
      }
      if (fs::exists(root + "/" + name + "/trainer_state.json")) return root + "/" + name;
      // A kill between re-saving a step and its rename: the newest complete folder.
      int64_t best = -1;
      for (const auto& e : fs::directory_iterator(root)) {
        const int64_t s = step_of(e.path().filename().string());
        if (s > best && fs::exists(e.path() / "trainer_state.json")) best = s;
      }
      if (best < 0) throw CheckpointError(str(root, "/latest names ", name, ", which is missing"));
      return root + "/step_" + std::to_string(best);
    }
  }
  throw CheckpointError(str(p, ": not a checkpoint (no trainer_state.json) nor a run folder (no "
                            "checkpoints/latest)"));
}

nlohmann::json verify_checkpoint(const std::string& dir) {
  const std::string sp = dir + "/trainer_state.json";
  if (!fs::exists(sp)) throw CheckpointError(str(dir, ": missing trainer_state.json"));
  std::string text;
  try {
    text = read_file(sp, "trainer state");
  } catch (const DataError& e) {
    throw CheckpointError(e.what());
  }
  TrainerStateFile st = parse_trainer_state(text, sp, kCheckpointFormatVersion);
  for (const auto& [name, f] : st.files) {
    const std::string p = dir + "/" + name;
    if (!fs::exists(p)) throw CheckpointError(str(p, ": missing from the checkpoint"));
    if (fs::file_size(p) != f.bytes) {
      throw CheckpointError(str(p, ": ", fs::file_size(p), " bytes, expected ", f.bytes,
                                " (truncated or corrupt checkpoint)"));
    }
    if (fnv1a64_file(p) != f.fnv1a64) {
      throw CheckpointError(str(p, ": content fingerprint mismatch (corrupt checkpoint)"));
    }
  }
  return st.state;
}

void load_model_weights(ModelBase& model, const std::string& path) {
  TensorMap t = load_safetensors(path);
  torch::NoGradGuard ng;
  for (auto& kv : model_state(model)) {
    auto it = t.find(kv.first);
    if (it == t.end()) throw CheckpointError(str(path, ": missing tensor '", kv.first, "'"));
    if (it->second.sizes() != kv.second.sizes()) {
      throw CheckpointError(str(path, ": tensor '", kv.first, "' has shape ", it->second.sizes(),
                                ", the model expects ", kv.second.sizes()));
    }
    kv.second.copy_(it->second);
    t.erase(it);
  }
  if (!t.empty()) {
    throw CheckpointError(str(path, ": tensor '", t.begin()->first,
                              "' is not a parameter of this model (recipe and checkpoint differ)"));
  }
}

void load_optimizer_state(torch::optim::Optimizer& opt, const std::string& path) {
  try {
    torch::load(opt, path);
  } catch (const c10::Error& e) {
    throw CheckpointError(str(path, ": cannot load optimizer state: ",
                              std::string(e.what_without_backtrace()).substr(0, 200)));
  }
}

}  // namespace mixdiff
