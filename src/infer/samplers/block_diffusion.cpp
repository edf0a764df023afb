// block_diffusion: semi-autoregressive block decoding with key/value caches (BD3-LM,
// arXiv 2503.09573; LLaDA2.0's `generate`; Fast-dLLM, arXiv 2505.22618; algorithms.md 1.6-1.8).
// Blocks of block_length start at the prompt's end (the model's routing and attention blocks use
// the same grid, ModelInput::block_origin) and are decoded left to right. Each step samples every
// masked position of the current block (argmax, or Gumbel in float64 at temperature > 0) and
// commits: with `threshold`, every masked position whose confidence reaches it, but at least the
// linear schedule's count (LLaDA2.0); without, the schedule's count by confidence.
//   cache: none    every step is a full forward of the whole sequence (the reference)
//          prefix  Fast-dLLM's PrefixCache: at the block's first step a full forward (prompt,
//                  block, masked suffix) commits as step 0 and caches the keys and values of the
//                  positions before the block; later steps run the block and every later
//                  position against that cache
//          dual    Fast-dLLM's DualCache: the same full forward caches the prefix AND the
//                  suffix; later steps run only the block, its fresh keys in place of its cached
//                  ones (Fast-dLLM's replace_position)
//          exact   block-causal models (model.attention: block_causal, block_length =
//                  model.block_size): the prompt is encoded once, each step runs only the block
//                  against the clean earlier blocks, a finished block is run once more to extend
//                  the cache; nothing is approximate. Any cache mode but none means this on a
//                  block-causal model.
//          auto    exact for block-causal models, prefix otherwise
//   refresh_every: prefix and dual caches are rebuilt by a full forward at every block's first
//                  step (Fast-dLLM) and, when > 0, every refresh_every steps inside the block;
//                  with 1 every step is a full forward and decoding equals cache: none.
// Both Fast-dLLM caches are approximations for bidirectional models (the cached keys were computed
// while the block was still masked); `mixdiff eval` reports their agreement with cache: none.
// EOS early stop (with the tokenizer's EOS): a row is done when an EOS was committed and every
// position before it is decoded; its remaining masks become EOS; generation ends when every row is
// done. Several prompts decode as one left-padded batch, each row as it would alone (padding is
// hidden from attention and routing, positions are the row's own).
// cfg_scale > 0: LLaDA's unsupervised classifier-free guidance: every forward runs twice, the
// second with the prompt masked and against its own cache (built, truncated and extended exactly
// as the conditional one), and the logits are combined as u + (scale + 1)(c - u).
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
  int64_t refresh_every = 0;
  double cfg_scale = 0.0;

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
    o.refresh_every = c.get<int64_t>("refresh_every", 0);
    if (o.gen_length <= 0) c.fail("gen_length", "expected a positive integer");
    if (o.block_length <= 0) c.fail("block_length", "expected a positive integer");
    if (o.steps <= 0 || o.steps > o.block_length) {
      c.fail("steps", str("expected 1..block_length (", o.block_length, ") steps per block"));
    }
    if (o.temperature < 0) c.fail("temperature", "expected >= 0 (0 is greedy)");
    if (o.cache != "auto" && o.cache != "prefix" && o.cache != "dual" && o.cache != "none") {
      c.fail("cache", "expected auto, prefix, dual or none, got '" + o.cache + "'");
    }
    if (o.refresh_every < 0) c.fail("refresh_every", "expected >= 0 steps (0: once per block)");
    o.cfg_scale = c.get<double>("cfg_scale", 0.0);
    if (!(o.cfg_scale >= 0)) c.fail("cfg_scale", "expected >= 0 (0: no guidance)");
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
    const std::string cache = block_causal ? (o_.cache == "none" ? "none" : "exact")
                              : o_.cache == "auto" ? "prefix"
                                                   : o_.cache;
    const int64_t mask_id = model.mask_id();
    // Decoding runs on the model's device; random draws stay on the host generator `gen` (the
    // same samples on every device) and are moved there. The result goes back to the prompt's.
    const at::Device dev = module_device(model, prompt.device());
    const auto bopt = torch::TensorOptions().dtype(torch::kBool).device(dev);
    const DecodeLayout lay = decode_layout(prompt, valid_BP, G, mask_id, dev);
    at::Tensor x = lay.x_BL;  // shares storage with the layout: commits are seen by input()
    auto done = torch::zeros({B}, bopt);
    SampleResult res;
    KVCache kv, ukv;  // ukv: the unconditional branch's cache (classifier-free guidance)
    const bool cfg = o_.cfg_scale > 0;
    // One forward of columns [from, from + in's length) (two with guidance).
    auto run = [&](ModelInput in, int64_t step, int64_t from) {
      in.step = step;  // the denoising step inside the block (interval-refresh block routing)
      res.forwards += cfg ? 2 : 1;
      throw_if_interrupted();
      fault::delay("generate_delay_ms");
      at::Tensor uncond;
      if (cfg) uncond = mask_prompt(x, P, mask_id).narrow(1, from, in.tokens_BL.size(1));
      return guided_logits(model, in, uncond, o_.cfg_scale, &ukv);
    };
    // Exact cache: the prompt is encoded once (its blocks end at the prompt's end).
    if (cache == "exact" && P > 0) {
      ModelInput in = lay.input(0, P);
      in.cache = &kv;
      in.cache_append = true;
      run(in, 0, 0);
    }
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t n_blocks = (G + Bk - 1) / Bk;
    for (int64_t j = 0; j < n_blocks && !done.all().item<bool>(); ++j) {
      const int64_t start = P + j * Bk, len = std::min(Bk, Lt - start);
      auto n_masked = (x.narrow(1, start, len) == mask_id).sum(1);
      int64_t s = 0;
      for (; s < o_.steps; ++s) {
        auto blk = x.narrow(1, start, len);
        auto is_mask = (blk == mask_id) & done.logical_not().unsqueeze(1);
        if (!is_mask.any().item<bool>()) break;
        const bool refresh = s == 0 || (o_.refresh_every > 0 && s % o_.refresh_every == 0);
        at::Tensor logits;  // [B * len, V]
        if (cache == "none" || ((cache == "prefix" || cache == "dual") && refresh)) {
          ModelInput in = lay.input(0, Lt, lay.columns(start, len, 0, Lt));
          if (cache != "none") {  // the full forward that (re)builds a Fast-dLLM cache
            kv.clear();
            ukv.clear();
            in.cache = &kv;
            in.cache_append = true;
          }
          logits = run(in, s, 0);
          if (cache == "prefix") {
            kv.truncate(start);
            if (cfg) ukv.truncate(start);
          }
        } else if (cache == "exact") {
          ModelInput in = lay.input(start, len);
          in.cache = &kv;
          logits = run(in, s, start);
        } else if (cache == "prefix") {  // the block and every later position
          ModelInput in = lay.input(start, Lt - start, lay.columns(start, len, start, Lt - start));
          in.cache = &kv;
          logits = run(in, s, start);
        } else {  // dual: the block alone, between the cached prefix and suffix
          ModelInput in = lay.input(start, len);
          in.cache = &kv;
          in.cache_at = start;
          logits = run(in, s, start);
        }
        commit(logits.view({B, len, -1}).to(torch::kFloat64), blk, is_mask, n_masked, s, gen);
      }
      // Rows whose block is finished: EOS early stop.
      if (eos_ >= 0) update_done(x, done, P, start + len, mask_id);
      if (cache == "exact" && j + 1 < n_blocks) {  // the finished block joins the cache
        ModelInput in = lay.input(start, len);
        in.cache = &kv;
        in.cache_append = true;
        run(in, s, start);
      }
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (eos_ >= 0) x.masked_fill_(x == mask_id, eos_);  // rows stopped early
    res.blocks = n_blocks;
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
                 "block diffusion decoding with a KV cache (exact for block-causal models; "
                 "Fast-dLLM's prefix or dual cache otherwise), threshold commits, EOS early stop, "
                 "padded batches; keys: gen_length, block_length, steps, threshold, temperature, "
                 "cache (auto|prefix|dual|none), refresh_every, cfg_scale",
                 [](const ConfigNode& c) -> std::shared_ptr<SamplerBase> {
                   return std::make_shared<BlockDiffusionSampler>(BlockOptions::from(c));
                 });

}  // namespace
}  // namespace mixdiff
