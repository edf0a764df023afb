// block_diffusion: semi-autoregressive block decoding with a key/value cache (BD3-LM,
// arXiv 2503.09573; LLaDA2.0's `generate`; Fast-dLLM, arXiv 2505.22618; algorithms.md 1.6-1.8).
// Blocks are aligned to multiples of block_length in the (left-padded) sequence and decoded left
// to right. Within the current block each step runs ONLY the block's tokens against the cached
// keys and values of the positions before it, samples every masked position (argmax, or Gumbel
// in float64 at temperature > 0) and commits: with `threshold`, every masked position whose
// confidence reaches it, but at least the linear schedule's count (LLaDA2.0); without, the
// schedule's count by confidence. A finished block is run once more to extend the cache.
//   cache: auto      exact prefix cache for block-causal models (model.attention: block_causal,
//                    block_length = model.block_size); for fully bidirectional models the
//                    Fast-dLLM prefix cache (approximate: the prefix's keys were computed while
//                    the block was still masked, refreshed at every block)
//          prefix    the Fast-dLLM prefix cache on any model: the step runs the block and every
//                    later position
//          none      full forwards of the whole sequence (the reference)
// EOS early stop (with the tokenizer's EOS): a row is done when an EOS was committed and every
// position before it is decoded; its remaining masks become EOS; generation ends when every row is
// done. Several prompts decode as one batch, left-padded (padding is hidden from attention and
// routing).
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <limits>

#include "core/errors.h"
#include "infer/sampler.h"
#include "core/fault.h"
#include "core/signals.h"

namespace mixdiff {
namespace {

struct BlockOptions {
  int64_t gen_length = 64;
  int64_t block_length = 32;
  int64_t steps = 32;  ///< per block (upper bound with a threshold)
  double temperature = 0.0;
  std::optional<double> threshold;
  std::string cache = "auto";

  static BlockOptions from(const ConfigNode& c) {
    BlockOptions o;
    o.gen_length = c.get<int64_t>("gen_length", 64);
    o.block_length = c.get<int64_t>("block_length", 32);
    o.steps = c.get<int64_t>("steps", o.block_length);
    o.temperature = c.get<double>("temperature", 0.0);
    if (c.has("threshold")) {
      o.threshold = c.get<double>("threshold");
      if (!(*o.threshold > 0 && *o.threshold <= 1)) c.fail("threshold", "expected (0, 1]");
    }
    o.cache = c.get<std::string>("cache", "auto");
    if (o.gen_length <= 0) c.fail("gen_length", "expected a positive integer");
    if (o.block_length <= 0) c.fail("block_length", "expected a positive integer");
    if (o.steps <= 0 || o.steps > o.block_length) {
      c.fail("steps", str("expected 1..block_length (", o.block_length, ") steps per block"));
    }
    if (o.temperature < 0) c.fail("temperature", "expected >= 0 (0 is greedy)");
    if (o.cache != "auto" && o.cache != "prefix" && o.cache != "none") {
      c.fail("cache", "expected auto, prefix or none, got '" + o.cache + "'");
    }
    return o;
  }
};

class BlockDiffusionSampler : public SamplerBase {
 public:
  explicit BlockDiffusionSampler(BlockOptions o) : o_(std::move(o)) {}
  int64_t gen_length() const override { return o_.gen_length; }
  void set_eos(int64_t eos) override { eos_ = eos; }
  bool supports_padding() const override { return true; }

  SampleResult generate(ModelBase& model, const at::Tensor& prompt, at::Generator& gen) override {
    return generate_padded(model, prompt, at::Tensor(), gen);
  }

  SampleResult generate_padded(ModelBase& model, const at::Tensor& prompt,
                               const at::Tensor& valid_BP, at::Generator& gen) override {
    torch::NoGradGuard ng;
    model.eval();
    TORCH_CHECK(prompt.dim() == 2, "[block_diffusion] expected prompt_BP [B, P]");
    const int64_t B = prompt.size(0), P = prompt.size(1), G = o_.gen_length, Bk = o_.block_length;
    const int64_t Lt = P + G;
    if (Lt > model.max_seq_len()) {
      throw InputError(str("prompt (", P, " tokens) + gen_length (", G, ") = ", Lt,
                           " exceeds model.max_seq_len ", model.max_seq_len()));
    }
    const bool block_causal = model.attention() == "block_causal";
    if (block_causal && model.attention_block() != Bk) {
      throw InputError(str("generate.sampler.block_length ", Bk, " must equal the block-causal "
                           "model's model.block_size ", model.attention_block()));
    }
    std::string cache = o_.cache == "auto" ? (block_causal ? "exact" : "prefix") : o_.cache;
    if (block_causal && cache == "prefix") cache = "exact";
    const int64_t mask_id = model.mask_id();
    // Decoding runs on the model's device; random draws stay on the host generator `gen` (the
    // same samples on every device) and are moved there. The result goes back to the prompt's.
    const at::Device dev = module_device(model, prompt.device());
    const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
    const auto bopt = torch::TensorOptions().dtype(torch::kBool).device(dev);
    auto x = torch::cat({prompt.to(dev, torch::kLong), torch::full({B, G}, mask_id, lopt)}, 1);
    at::Tensor valid;
    if (valid_BP.defined()) valid = torch::cat({valid_BP.to(dev), torch::ones({B, G}, bopt)}, 1);
    auto done = torch::zeros({B}, bopt);
    SampleResult res;
    KVCache kv;
    const int64_t first_block = P / Bk, n_blocks = (Lt + Bk - 1) / Bk;
    auto forward = [&](int64_t from, int64_t len, bool use_cache, bool append,
                       const at::Tensor& index) {
      ModelInput in(x.narrow(1, from, len), index);
      if (valid.defined()) in.valid_BL = valid.narrow(1, from, len);
      if (use_cache) {
        in.cache = &kv;
        in.cache_append = append;
      }
      ++res.forwards;
      throw_if_interrupted();
      fault::delay("generate_delay_ms");
      return model.forward(in).logits;
    };
    // Prefill: the complete blocks before the first one with masks.
    if (cache != "none" && first_block > 0) {
      kv.clear();
      forward(0, first_block * Bk, true, true, {});
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t j = first_block; j < n_blocks && !done.all().item<bool>(); ++j) {
      const int64_t start = j * Bk, len = std::min(Bk, Lt - start);
      auto n_masked = (x.narrow(1, start, len) == mask_id).sum(1);
      if (cache == "prefix" && !block_causal) {
        // Fast-dLLM prefix cache: the prefix's keys from one forward at the block's start.
        kv.clear();
        if (start > 0) forward(0, start, true, true, {});
      }
      for (int64_t s = 0; s < o_.steps; ++s) {
        auto blk = x.narrow(1, start, len);
        auto is_mask = (blk == mask_id) & done.logical_not().unsqueeze(1);
        if (!is_mask.any().item<bool>()) break;
        at::Tensor logits;  // [B, len, V]
        if (cache == "none") {
          auto pos = torch::arange(start, start + len, lopt);
          auto index = (torch::arange(B, lopt).unsqueeze(1) * Lt + pos).reshape({-1});
          ModelInput in(x, index);
          if (valid.defined()) in.valid_BL = valid;
          ++res.forwards;
          throw_if_interrupted();
          fault::delay("generate_delay_ms");
          logits = model.forward(in).logits.view({B, len, -1});
        } else if (cache == "exact") {
          logits = forward(start, len, true, false, {});
        } else {  // prefix: the block and every later position
          const int64_t rest = Lt - start;
          auto idx = (torch::arange(B, lopt).unsqueeze(1) * rest + torch::arange(len, lopt))
                         .reshape({-1});
          logits = forward(start, rest, true, false, idx).view({B, len, -1});
        }
        commit(logits.to(torch::kFloat64), blk, is_mask, n_masked, s, gen);
      }
      // Rows whose block is finished: EOS early stop.
      if (eos_ >= 0) update_done(x, done, P, start + len, mask_id);
      if (cache == "exact" && j + 1 < n_blocks) forward(start, len, true, true, {});
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (eos_ >= 0) x = x.masked_fill(x == mask_id, eos_);  // rows stopped early
    res.blocks = n_blocks - first_block;
    res.decode_seconds = secs;
    res.tokens_BL = x.to(prompt.device());
    return res;
  }

 private:
  void commit(const at::Tensor& logits, at::Tensor& blk, const at::Tensor& is_mask,
              const at::Tensor& n_masked, int64_t s, at::Generator& gen) const {
    const int64_t B = blk.size(0), len = blk.size(1);
    at::Tensor pred;
    if (o_.temperature > 0) {
      auto u = torch::rand(logits.sizes(), gen, torch::kFloat64)  // host generator, then moved
                   .clamp_min(1e-300)
                   .to(logits.device());
      pred = (logits - o_.temperature * torch::log(-torch::log(u))).argmax(-1);
    } else {
      pred = logits.argmax(-1);
    }
    auto conf = torch::softmax(logits, -1).gather(-1, pred.unsqueeze(-1)).squeeze(-1);
    conf = conf.masked_fill(is_mask.logical_not(), -std::numeric_limits<double>::infinity());
    auto take =
        torch::zeros({B, len}, torch::TensorOptions().dtype(torch::kBool).device(blk.device()));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t left = is_mask[b].sum().item<int64_t>();
      if (left == 0) continue;
      // Linear schedule: floor(M / steps) per step, one more for the first M mod steps steps;
      // the last step takes what is left.
      const int64_t M = n_masked[b].item<int64_t>();
      int64_t k = s + 1 >= o_.steps ? left : M / o_.steps + (s < M % o_.steps ? 1 : 0);
      if (o_.threshold) k = std::max(k, (conf[b] >= *o_.threshold).sum().item<int64_t>());
      k = std::min(std::max<int64_t>(k, 1), left);
      take[b].index_fill_(0, std::get<1>(conf[b].topk(k)), true);
    }
    blk.copy_(torch::where(take, pred, blk));
  }

  void update_done(const at::Tensor& x, at::Tensor& done, int64_t P, int64_t end,
                   int64_t mask_id) const {
    const int64_t B = x.size(0);
    for (int64_t b = 0; b < B; ++b) {
      if (done[b].item<bool>()) continue;
      auto gen = x[b].narrow(0, P, end - P);
      auto eos_at = (gen == eos_).nonzero();
      if (eos_at.numel() == 0) continue;
      const int64_t first = eos_at[0][0].item<int64_t>();
      if (!(gen.narrow(0, 0, first) == mask_id).any().item<bool>()) done[b] = true;
    }
  }

  BlockOptions o_;
  int64_t eos_ = -1;
};

MIXDIFF_REGISTER(samplers_registry(), "block_diffusion",
                 "block diffusion decoding with a KV cache (exact for block-causal models, "
                 "Fast-dLLM prefix cache otherwise), threshold commits, EOS early stop, padded "
                 "batches; keys: gen_length, block_length, steps, threshold, temperature, cache",
                 [](const ConfigNode& c) -> std::shared_ptr<SamplerBase> {
                   return std::make_shared<BlockDiffusionSampler>(BlockOptions::from(c));
                 });

}  // namespace
}  // namespace mixdiff
