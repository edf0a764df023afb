#include "infer/sampler.h"

#include <torch/torch.h>

#include <algorithm>

#include "core/errors.h"

namespace mixdiff {

SamplerRegistry& samplers_registry() {
  static SamplerRegistry r("samplers", "diffusion samplers (generate.sampler.kind)");
  return r;
}

DecodeLayout decode_layout(const at::Tensor& prompt_BP, const at::Tensor& valid_BP, int64_t G,
                           int64_t mask_id, const at::Device& device) {
  TORCH_CHECK(prompt_BP.dim() == 2, "[decode_layout] expected prompt_BP [B, P], got ",
              prompt_BP.sizes());
  DecodeLayout d;
  const int64_t B = prompt_BP.size(0);
  d.P = prompt_BP.size(1);
  d.G = G;
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(device);
  d.x_BL = torch::cat({prompt_BP.to(device, torch::kLong), torch::full({B, G}, mask_id, lopt)}, 1);
  if (valid_BP.defined() && !valid_BP.all().item<bool>()) {
    const auto v = valid_BP.to(device, torch::kBool);
    d.valid_BL = torch::cat({v, torch::ones({B, G}, v.options())}, 1);
    // Left padding: row b's first real token is column pad_b; it sits at position 0, as alone.
    auto pad_B = d.P - v.to(torch::kLong).sum(1);
    d.pos_BL = (torch::arange(d.P + G, lopt).unsqueeze(0) - pad_B.unsqueeze(1)).clamp_min(0);
  }
  return d;
}

std::pair<at::Tensor, at::Tensor> left_pad(const std::vector<std::vector<int32_t>>& rows,
                                           int64_t pad_id, int64_t repeat) {
  int64_t P = 0;
  for (const auto& r : rows) P = std::max<int64_t>(P, static_cast<int64_t>(r.size()));
  const int64_t B = static_cast<int64_t>(rows.size()) * repeat;
  auto x = torch::full({B, P}, pad_id, torch::kLong);
  auto valid = torch::zeros({B, P}, torch::kBool);
  auto xa = x.accessor<int64_t, 2>();
  auto va = valid.accessor<bool, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const auto& ids = rows[static_cast<size_t>(b / repeat)];
    const int64_t pad = P - static_cast<int64_t>(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      xa[b][pad + static_cast<int64_t>(i)] = ids[i];
      va[b][pad + static_cast<int64_t>(i)] = true;
    }
  }
  return {x, valid};
}

ModelInput DecodeLayout::input(int64_t from, int64_t len, at::Tensor index) const {
  ModelInput in(x_BL.narrow(1, from, len), std::move(index));
  if (valid_BL.defined()) in.valid_BL = valid_BL.narrow(1, from, len);
  if (pos_BL.defined()) in.positions_L = pos_BL.narrow(1, from, len);
  in.block_origin = P;
  return in;
}

at::Tensor DecodeLayout::columns(int64_t from, int64_t len, int64_t slice_from,
                                 int64_t width) const {
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(x_BL.device());
  return (torch::arange(x_BL.size(0), lopt).unsqueeze(1) * width +
          torch::arange(from - slice_from, from - slice_from + len, lopt))
      .reshape({-1});
}

at::Tensor guided_logits(ModelBase& model, const ModelInput& in, const at::Tensor& uncond_tokens,
                         double cfg_scale, KVCache* uncond_cache) {
  at::Tensor cond = model.forward(in).logits;
  if (cfg_scale == 0) return cond;
  TORCH_CHECK(uncond_tokens.sizes() == in.tokens_BL.sizes(),
              "[guided_logits] the unconditional tokens must have the input's shape");
  ModelInput u = in;
  u.tokens_BL = uncond_tokens;
  if (in.cache) {
    TORCH_CHECK(uncond_cache != nullptr, "[guided_logits] a cached forward needs an unconditional "
                                         "cache");
    u.cache = uncond_cache;
  }
  at::Tensor uncond = model.forward(u).logits;
  return uncond + (cfg_scale + 1.0) * (cond - uncond);
}

at::Tensor mask_prompt(const at::Tensor& x_BL, int64_t P, int64_t mask_id) {
  at::Tensor u = x_BL.clone();
  if (P > 0) u.narrow(1, 0, P).fill_(mask_id);
  return u;
}

GenerateSettings GenerateSettings::from(const ConfigNode& recipe) {
  GenerateSettings g;
  ConfigNode c = recipe.section("generate");
  g.prompt = c.get<std::string>("prompt", "");
  g.seed = c.get<int64_t>("seed", 0);
  g.num_samples = c.get<int64_t>("num_samples", 1);
  if (g.num_samples <= 0) c.fail("num_samples", "expected a positive integer");
  ConfigNode s = c.section("sampler");
  g.sampler_kind = s.get<std::string>("kind", "llada");
  g.sampler = samplers_registry().create(g.sampler_kind, s.path() + ".kind", s);
  g.sampler_yaml = s.to_yaml();
  return g;
}

std::shared_ptr<SamplerBase> GenerateSettings::variant(const std::string& key,
                                                       const std::string& value) const {
  ConfigNode s = ConfigNode::from_string(sampler_yaml.empty() ? "{}" : sampler_yaml,
                                         "generate.sampler");
  s.apply_override(key + "=" + value);
  return samplers_registry().create(sampler_kind, "generate.sampler.kind", s);
}

}  // namespace mixdiff
