// Samplers turn a prompt into text by iterative unmasking (registry `samplers`, recipe key
// generate.sampler.kind).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

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

using SamplerRegistry = Registry<std::shared_ptr<SamplerBase>, const ConfigNode&>;
SamplerRegistry& samplers_registry();

/// The recipe's `generate` section: prompt, seed, number of samples and the sampler.
struct GenerateSettings {
  std::string prompt;
  int64_t seed = 0;
  int64_t num_samples = 1;
  std::shared_ptr<SamplerBase> sampler;
  static GenerateSettings from(const ConfigNode& recipe);
};

}  // namespace mixdiff
