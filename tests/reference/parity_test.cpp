// Parity with the independent PyTorch reference (tools/reference/mixdiff_ref.py): for a fixed
// batch and fixed masks, logits, the diffusion loss, every layer's routing decision (experts and
// gates) and the auxiliary losses agree to float tolerance, and one AdamW step (with gradient
// clipping) changes every weight identically. The reference runs under every PyTorch the machine
// has: /usr/bin/python3 (Debian's python3-torch 1.13) and the project's .venv (PyTorch 2.x,
// tools/setup.sh --torch2). A missing one is skipped with a message, unless
// MIXDIFF_REQUIRE_TORCH2=1 (tools/test.sh sets it), which makes a missing .venv a failure.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "core/safetensors.h"
#include "moe/moe_layer.h"
#include "moe/observers.h"
#include "support/support.h"
#include "infer/sampler.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

void check_parity_with(const std::string& name, const std::vector<std::string>& model_sets,
                       const std::string& python);

struct Reference {
  std::string label, python;
};

bool imports_torch(const std::string& python) {
  return std::system((python + " -c 'import torch, yaml' > /dev/null 2>&1").c_str()) == 0;
}

/// The interpreters the reference runs under here; `missing` says which could not import torch.
std::vector<Reference> references(std::string* missing) {
  std::vector<Reference> out;
  const Reference all[] = {{"Debian PyTorch 1.13", "/usr/bin/python3"},
                           {"PyTorch 2.x (.venv)", test::source_dir() + "/.venv/bin/python"}};
  for (const auto& r : all) {
    if (imports_torch(r.python)) {
      out.push_back(r);
    } else {
      *missing += (missing->empty() ? "" : "; ") + r.python + " cannot import torch and yaml";
    }
  }
  return out;
}

void check_parity(const std::string& name, const std::vector<std::string>& model_sets) {
  std::string missing;
  const auto refs = references(&missing);
  const char* require = std::getenv("MIXDIFF_REQUIRE_TORCH2");
  if (require != nullptr && std::string(require) == "1") {
    ASSERT_EQ(refs.size(), 2u) << "MIXDIFF_REQUIRE_TORCH2=1: " << missing;
  }
  if (refs.empty()) GTEST_SKIP() << missing;
  if (!missing.empty()) std::printf("[ parity   ] %s: skipped: %s\n", name.c_str(), missing.c_str());
  for (const auto& ref : refs) {
    SCOPED_TRACE(ref.label);
    std::printf("[ parity   ] %s against %s\n", name.c_str(), ref.label.c_str());
    check_parity_with(name, model_sets, ref.python);
  }
}

void check_parity_with(const std::string& name, const std::vector<std::string>& model_sets,
                       const std::string& python) {
  const std::string d = test::scratch_dir("parity_" + name);
  test::tiny_setup(d, d + "/data");
  ConfigNode r = ConfigNode::from_file(d + "/recipe.yaml");
  for (const auto& s : model_sets) r.apply_override(s);
  r.apply_override("lr_schedule={kind: constant, warmup_steps: 0}");
  TrainerParts p = build_trainer_parts(r);
  GenerateSettings::from(r);
  r.check_unknown_keys();
  auto& model = *p.model;
  {  // a non-zero selection bias, so that the reference must apply it
    torch::NoGradGuard ng;
    for (auto& kv : model.named_buffers()) {
      if (kv.key().find("balancer.bias") != std::string::npos) kv.value().normal_(0.0, 0.05);
    }
  }
  CheckpointContent c;
  c.model = &model;
  c.recipe_yaml = r.to_yaml();
  c.tokenizer_dir = p.data->tokenizer_dir();
  c.trainer_state = {{"tokens", 0}, {"data_cursor", 0}, {"seed", 0}};
  const std::string ckpt = save_checkpoint(d + "/run", 0, c, 0);

  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  auto x0 = p.data->train_batch(0, p.options.batch_size);
  auto t = torch::rand({x0.size(0)}, gen);
  DiffusionBatch b = corrupt(x0, t, *p.schedule, model.mask_id(), gen);
  save_safetensors(d + "/batch.safetensors",
                   {{"xt", b.xt_BL},
                    {"index", b.index_M},
                    {"target", b.target_M},
                    {"weight", b.weight_M},
                    {"n_slots", torch::tensor({b.n_slots}, torch::kLong)}},
                   {});

  // MixDiff's step, as the trainer takes it.
  for (MoeLayer* l : model.moe_layers()) l->set_aux_scale(1.0);
  const auto last = observe_layers<LastRouting>(model.moe_layers());
  model.train();
  ModelOutput out = model.forward(ModelInput(b.xt_BL, b.index_M));
  at::Tensor elbo;
  for (auto& w : p.losses) {
    if (!w.routing) elbo = w.term->compute(out, b) * w.weight;
  }
  elbo.backward();
  torch::nn::utils::clip_grad_norm_(model.parameters(), p.options.grad_clip);
  std::map<std::string, at::Tensor> grads;
  for (const auto& kv : model.named_parameters()) grads[kv.key()] = kv.value().grad().clone();
  p.optimizer->step();

  const std::string cmd = python + " " + test::source_dir() +
                          "/tools/reference/mixdiff_ref.py step --ckpt " + ckpt + " --batch " + d +
                          "/batch.safetensors --out " + d + "/ref.safetensors > " + d +
                          "/ref.log 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << test::read_text(d + "/ref.log");
  auto ref = load_safetensors(d + "/ref.safetensors");
  EXPECT_LT((out.logits.detach() - ref.at("logits")).abs().max().item<double>(), 1e-4);
  EXPECT_NEAR(elbo.item<double>(), ref.at("elbo").item<double>(), 1e-5);
  const auto layers = model.moe_layers();
  for (size_t i = 0; i < layers.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "MoE layer " << i);
    const auto& dl = last[i]->get();
    auto ex = ref.at(str("route.", i, ".experts"));
    const int64_t T = ex.size(0), K = ex.size(1);
    ASSERT_EQ(dl.expert_A.numel(), T * K);
    EXPECT_TRUE(torch::equal(dl.expert_A.view({T, K}), ex));
    EXPECT_LT((dl.gate_A.detach().view({T, K}) - ref.at(str("route.", i, ".gates"))).abs().max()
                  .item<double>(),
              1e-5);
  }
  std::vector<double> aux_sum;
  for (MoeLayer* l : layers) {
    const auto v = l->take_aux_values();
    if (aux_sum.empty()) aux_sum.assign(v.size(), 0.0);
    for (size_t k = 0; k < v.size(); ++k) aux_sum[k] += v[k] / static_cast<double>(layers.size());
  }
  size_t k = 0;
  for (const auto& w : p.losses) {
    if (!w.routing) continue;
    EXPECT_NEAR(aux_sum[k++], ref.at("aux." + w.name).item<double>(), 1e-5) << w.name;
  }
  // Gradients (after clipping) agree to float tolerance relative to their scale. The step then
  // agrees to 2e-6 up to what the gradient difference explains: AdamW's first update is
  // -lr g / (|g| + eps), whose derivative lr eps / (|g| + eps)^2 turns float noise in a gradient
  // within a few eps of zero into a difference of order lr.
  const auto& ao = static_cast<torch::optim::AdamWOptions&>(p.optimizer->param_groups()[0].options());
  const double lr = ao.lr(), eps = ao.eps();
  int64_t compared = 0;
  for (const auto& kv : model.named_parameters()) {
    auto it = ref.find("after." + kv.key());
    ASSERT_NE(it, ref.end()) << kv.key();
    const auto& g_ref = ref.at("grad." + kv.key());
    const auto g = grads.at(kv.key());
    const double scale = g_ref.abs().max().item<double>();
    auto dg = (g - g_ref).abs();
    EXPECT_LE(dg.max().item<double>(), 1e-4 * scale + 1e-9) << kv.key();
    auto explained = 2 * lr * eps * dg / (g_ref.abs() + eps).pow(2);
    auto excess = (kv.value().detach() - it->second).abs() - explained;
    EXPECT_LT(excess.max().item<double>(), 2e-6) << kv.key();
    ++compared;
  }
  EXPECT_GT(compared, 10);
}

TEST(ComponentParity, DenseModelMatchesThePyTorchReference) {
  check_parity("dense", {"model.qk_norm=true", "model.n_kv_head=1"});
}

TEST(ComponentParity, MoeModelMatchesThePyTorchReference) {
  check_parity("moe_softmax",
               {"model.kind=moe_dlm",
                "model.moe={n_expert: 6, d_expert: 16, n_shared: 1, first_k_dense: 1, router: "
                "{kind: token_choice, top_k: 2}}",
                "losses=[{kind: masked_diffusion_elbo}, {kind: load_balance, weight: 0.01}, "
                "{kind: z_loss, weight: 0.001}]"});
  check_parity("moe_sigmoid",
               {"model.kind=moe_dlm",
                "model.moe={n_expert: 8, d_expert: 16, router: {kind: token_choice, top_k: 3, "
                "score: sigmoid, scaling: 2.5, balancer: {kind: aux_free}}}",
                "losses=[{kind: masked_diffusion_elbo}, {kind: z_loss, weight: 0.001}]"});
}

}  // namespace
}  // namespace mixdiff
