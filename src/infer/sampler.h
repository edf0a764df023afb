// Samplers turn a prompt into text by iterative unmasking (registry `samplers`, recipe key
// generate.sampler.kind).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/registry.h"
#include "model/model.h"

namespace mixdiff {

struct SampleResult {
  at::Tensor tokens_BL;  ///< int64 [B, P + G]: prompt then generated tokens (no [MASK] left)
  int64_t forwards = 0;  ///< model forward passes used
  int64_t blocks = 0;    ///< blocks decoded (block samplers)
  double decode_seconds = 0;  ///< time spent decoding the blocks (block samplers)
};

class SamplerBase {
 public:
  virtual ~SamplerBase() = default;
  /// prompt_BP int64 [B, P] (rows of equal length); `gen` drives temperature/random remasking.
  virtual SampleResult generate(ModelBase& model, const at::Tensor& prompt_BP,
                                at::Generator& gen) = 0;
  /// Number of tokens generated after the prompt.
  virtual int64_t gen_length() const = 0;
  /// The tokenizer's end-of-sequence id, for samplers that stop early on it.
  virtual void set_eos(int64_t eos) {}
  /// Whether generate_padded accepts left-padded batches of prompts of different lengths.
  virtual bool supports_padding() const { return false; }
  /// `valid_BP`: false at left padding (undefined: no padding).
  virtual SampleResult generate_padded(ModelBase& model, const at::Tensor& prompt_BP,
                                       const at::Tensor& valid_BP, at::Generator& gen) {
    return generate(model, prompt_BP, gen);
  }
};

/// A batch of prompts laid out for decoding: left padding, each row's prompt ending at column P,
/// then G [MASK]. Decoding blocks start at P (the generation's start, as LLaDA's and Fast-dLLM's
/// do) and so do the model's block grids (ModelInput::block_origin). A padded row gets the rotary
/// positions it has alone (its first real token at 0) and its padding is hidden from attention
/// and routing, so a prompt decodes the same alone and in a batch.
struct DecodeLayout {
  at::Tensor x_BL;      ///< int64 [B, P + G]
  at::Tensor valid_BL;  ///< bool [B, P + G], false at padding; undefined without padding
  at::Tensor pos_BL;    ///< int64 rotary positions of each row; undefined without padding
  int64_t P = 0, G = 0;
  int64_t length() const { return P + G; }
  /// The model input for columns [from, from + len): tokens, padding and positions sliced,
  /// blocks starting at P; `index` selects logits (flattened over the slice).
  ModelInput input(int64_t from, int64_t len, at::Tensor index = {}) const;
  /// int64 flattened indices of columns [from, from + len) of every row of a slice of `width`
  /// columns that starts at `slice_from`.
  at::Tensor columns(int64_t from, int64_t len, int64_t slice_from, int64_t width) const;
};

/// Token rows of different lengths as one left-padded batch: int64 [B, P] (P the longest row,
/// padding `pad_id`) and bool [B, P], false at padding; every row repeated `repeat` times.
std::pair<at::Tensor, at::Tensor> left_pad(const std::vector<std::vector<int32_t>>& rows,
                                           int64_t pad_id, int64_t repeat = 1);

/// `prompt_BP` (rows padded on the left where `valid_BP` is false; undefined: no padding) and
/// G masks, on `device`.
DecodeLayout decode_layout(const at::Tensor& prompt_BP, const at::Tensor& valid_BP, int64_t G,
                           int64_t mask_id, const at::Device& device);

/// Unsupervised classifier-free guidance (LLaDA, arXiv 2502.09992 App. B; algorithms.md 1.5):
/// the logits of `in` and of the same input with the prompt masked (`uncond_tokens_BL`, the same
/// shape as in.tokens_BL; `uncond_cache` replaces in.cache for it), combined as
/// u + (scale + 1) (c - u). Scale 0 runs one forward and returns its logits unchanged.
at::Tensor guided_logits(ModelBase& model, const ModelInput& in, const at::Tensor& uncond_tokens_BL,
                         double cfg_scale, KVCache* uncond_cache = nullptr);

/// `x_BL` with its first P columns (the prompt, padding included) set to [MASK]: the input of the
/// unconditional branch.
at::Tensor mask_prompt(const at::Tensor& x_BL, int64_t P, int64_t mask_id);

using SamplerRegistry = Registry<std::shared_ptr<SamplerBase>, const ConfigNode&>;
SamplerRegistry& samplers_registry();

/// The recipe's `generate` section: prompt, seed, number of samples and the sampler.
struct GenerateSettings {
  std::string prompt;
  int64_t seed = 0;
  int64_t num_samples = 1;
  std::shared_ptr<SamplerBase> sampler;
  std::string sampler_kind;
  std::string sampler_yaml;  ///< the resolved generate.sampler section (to build variants)
  static GenerateSettings from(const ConfigNode& recipe);
  /// The same sampler with `key` set to `value` (e.g. another cache mode).
  std::shared_ptr<SamplerBase> variant(const std::string& key, const std::string& value) const;
};

}  // namespace mixdiff
