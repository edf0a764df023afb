// LLaDA's reverse process (arXiv 2502.09992, `generate.py`; algorithms.md 1.5) and Fast-dLLM's
// confidence-threshold parallel decoding (arXiv 2505.22618, Alg. 1; algorithms.md 1.7).
//
//   llada                 the generated span is split into blocks of block_length decoded left
//                         to right ("semi-autoregressive remasking"); each block gets
//                         steps / n_blocks steps and commits a linear schedule of tokens per step:
//                         the most confident predictions (low_confidence) or random ones (random).
//   confidence_threshold  inside the current block, commit every masked position whose
//                         confidence is >= threshold, and always at least the most confident one;
//                         a block takes as many steps as it needs (at most block_length).
// Blocks start at the prompt's end, and the model's routing and attention blocks with them
// (ModelInput::block_origin); several prompts decode as one left-padded batch, each row as alone.
// Temperature 0 is argmax; otherwise Gumbel-max sampling in float64 (low precision hurts masked
// diffusion sampling). Confidence is the probability of the chosen token under the un-noised
// softmax. Committed tokens are never re-masked. Only the current block's logits are computed
// (the head is the largest matmul of a small model); positions after the block are never
// committed early. cfg_scale > 0: LLaDA's unsupervised classifier-free guidance, a second
// forward with the prompt masked per step (infer/sampler.h guided_logits).
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/errors.h"
#include "infer/sampler.h"
#include "core/fault.h"
#include "core/signals.h"

namespace mixdiff {
namespace {

struct LladaOptions {
  int64_t gen_length = 64;
  int64_t steps = 64;
  int64_t block_length = 32;
  double temperature = 0.0;
  std::string remasking = "low_confidence";
  std::optional<double> threshold;
  double cfg_scale = 0.0;  ///< unsupervised classifier-free guidance (0: off)

  static LladaOptions from(const ConfigNode& c, bool threshold_mode) {
    LladaOptions o;
    o.gen_length = c.get<int64_t>("gen_length", 64);
    o.block_length = c.get<int64_t>("block_length", 32);
    o.temperature = c.get<double>("temperature", 0.0);
    if (o.gen_length <= 0) c.fail("gen_length", "expected a positive integer");
    if (o.block_length <= 0 || o.gen_length % o.block_length != 0) {
      c.fail("block_length", str("expected a positive divisor of gen_length (", o.gen_length,
                                 "), got ", o.block_length));
    }
    if (o.temperature < 0) c.fail("temperature", "expected >= 0 (0 is greedy)");
    o.cfg_scale = c.get<double>("cfg_scale", 0.0);
    if (!(o.cfg_scale >= 0)) c.fail("cfg_scale", "expected >= 0 (0: no guidance)");
    if (threshold_mode) {
      o.threshold = c.get<double>("threshold", 0.9);
      if (!(*o.threshold > 0 && *o.threshold <= 1)) c.fail("threshold", "expected a number in (0, 1]");
      o.steps = o.gen_length;  // an upper bound: one token per step at worst
    } else {
      o.steps = c.get<int64_t>("steps", o.gen_length);
      const int64_t n_blocks = o.gen_length / o.block_length;
      if (o.steps <= 0 || o.steps % n_blocks != 0) {
        c.fail("steps", str("expected a positive multiple of the number of blocks (", n_blocks,
                            "), got ", o.steps));
      }
      o.remasking = c.get<std::string>("remasking", "low_confidence");
      if (o.remasking != "low_confidence" && o.remasking != "random") {
        c.fail("remasking", "expected low_confidence or random, got '" + o.remasking + "'");
      }
    }
    return o;
  }
};

class LladaSampler : public SamplerBase {
 public:
  explicit LladaSampler(LladaOptions o) : o_(std::move(o)) {}
  int64_t gen_length() const override { return o_.gen_length; }
  bool supports_padding() const override { return true; }

  SampleResult generate(ModelBase& model, const at::Tensor& prompt, at::Generator& gen) override {
    return generate_padded(model, prompt, at::Tensor(), gen);
  }

  SampleResult generate_padded(ModelBase& model, const at::Tensor& prompt,
                               const at::Tensor& valid_BP, at::Generator& gen) override {
    torch::NoGradGuard ng;
    model.eval();
    TORCH_CHECK(prompt.dim() == 2, "[llada] expected prompt_BP [B, P], got ", prompt.sizes());
    const int64_t B = prompt.size(0), P = prompt.size(1), G = o_.gen_length;
    const int64_t Lt = P + G, Bk = o_.block_length, n_blocks = G / Bk;
    if (Lt > model.max_seq_len()) {
      throw InputError(str("prompt (", P, " tokens) + gen_length (", G, ") = ", Lt,
                           " exceeds model.max_seq_len ", model.max_seq_len()));
    }
    const int64_t mask_id = model.mask_id();
    // Decoding runs on the model's device; random draws stay on the host generator `gen` (the
    // same samples on every device) and are moved there. The result goes back to the prompt's.
    const at::Device dev = module_device(model, prompt.device());
    const DecodeLayout lay = decode_layout(prompt, valid_BP, G, mask_id, dev);
    at::Tensor x = lay.x_BL;  // shares storage with the layout: commits are seen by input()
    const int64_t steps_per_block = o_.threshold ? Bk : o_.steps / n_blocks;
    SampleResult res;
    for (int64_t j = 0; j < n_blocks; ++j) {
      const int64_t start = P + j * Bk;
      // Flattened positions of this block in every row: logits are computed only there.
      auto index = lay.columns(start, Bk, 0, Lt);
      auto n_masked = (x.narrow(1, start, Bk) == mask_id).sum(1);  // [B]
      for (int64_t s = 0; s < steps_per_block; ++s) {
        auto blk = x.narrow(1, start, Bk);                          // view into x
        auto is_mask = blk == mask_id;                              // [B, Bk]
        if (!is_mask.any().item<bool>()) break;
        throw_if_interrupted();
        fault::delay("generate_delay_ms");
        ModelInput in = lay.input(0, Lt, index);
        in.step = s;  // the denoising step inside the block (interval-refresh block routing)
        at::Tensor uncond;
        if (o_.cfg_scale > 0) uncond = mask_prompt(x, P, mask_id);
        auto logits = guided_logits(model, in, uncond, o_.cfg_scale)
                          .view({B, Bk, -1})
                          .to(torch::kFloat64);
        res.forwards += o_.cfg_scale > 0 ? 2 : 1;
        at::Tensor pred;
        if (o_.temperature > 0) {
          // argmax(logits + T * Gumbel) samples softmax(logits / T).
          auto u = torch::rand(logits.sizes(), gen, torch::kFloat64).clamp_min(1e-300).to(dev);
          pred = (logits - o_.temperature * torch::log(-torch::log(u))).argmax(-1);
        } else {
          pred = logits.argmax(-1);
        }
        at::Tensor conf;
        if (o_.remasking == "random" && !o_.threshold) {
          conf = torch::rand({B, Bk}, gen, torch::kFloat64).to(dev);
        } else {
          conf = torch::softmax(logits, -1).gather(-1, pred.unsqueeze(-1)).squeeze(-1);
        }
        conf = conf.masked_fill(is_mask.logical_not(), -std::numeric_limits<double>::infinity());
        auto commit =
            torch::zeros({B, Bk}, torch::TensorOptions().dtype(torch::kBool).device(dev));
        for (int64_t b = 0; b < B; ++b) {
          const int64_t left = is_mask[b].sum().item<int64_t>();
          if (left == 0) continue;
          int64_t k;
          if (o_.threshold) {
            k = std::max<int64_t>(1, (conf[b] >= *o_.threshold).sum().item<int64_t>());
          } else {
            // Linear schedule: floor(M / s) per step plus one for the first M mod s steps.
            const int64_t M = n_masked[b].item<int64_t>();
            k = M / steps_per_block + (s < M % steps_per_block ? 1 : 0);
          }
          k = std::min(k, left);
          if (k == 0) continue;
          commit[b].index_fill_(0, std::get<1>(conf[b].topk(k)), true);
        }
        blk.copy_(torch::where(commit, pred, blk));
      }
      // The linear schedule sums to the block's mask count, and threshold decoding commits at
      // least one token per step within block_length steps: no block ends with a mask left.
      TORCH_INTERNAL_ASSERT(!(x.narrow(1, start, Bk) == mask_id).any().item<bool>(),
                            "[llada] block left masked tokens");
    }
    res.tokens_BL = x.to(prompt.device());
    return res;
  }

 private:
  LladaOptions o_;
};

MIXDIFF_REGISTER(samplers_registry(), "llada",
                 "LLaDA semi-autoregressive remasking (blocks from the prompt's end; padded "
                 "batches); keys: gen_length, steps, block_length, temperature, remasking "
                 "(low_confidence|random), cfg_scale",
                 [](const ConfigNode& c) -> std::shared_ptr<SamplerBase> {
                   return std::make_shared<LladaSampler>(LladaOptions::from(c, false));
                 });
MIXDIFF_REGISTER(samplers_registry(), "confidence_threshold",
                 "Fast-dLLM parallel decoding: commit all masked tokens with confidence >= "
                 "threshold (at least one) per step; keys: gen_length, block_length, temperature, "
                 "threshold, cfg_scale",
                 [](const ConfigNode& c) -> std::shared_ptr<SamplerBase> {
                   return std::make_shared<LladaSampler>(LladaOptions::from(c, true));
                 });

}  // namespace
}  // namespace mixdiff
