// The CUDA path (built with tools/build_cuda.sh; skipped where no CUDA device is visible): a
// forward/backward on the GPU equals the CPU one, a bf16-autocast run trains, and an NCCL
// process group of world size 1 reduces CUDA tensors.
#include <cstdio>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/compat.h"
#include "infer/sampler.h"
#include "model/model.h"
#include "support/support.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace mixdiff {
namespace {

#define SKIP_WITHOUT_CUDA() \
  if (!compat::cuda_available()) GTEST_SKIP() << "no CUDA device in this build or machine"

const char* kMoe =
    "model={kind: moe_dlm, d_model: 64, n_layer: 2, n_head: 4, d_ff: 128, max_seq_len: 64, "
    "qk_norm: true, moe: {n_expert: 8, d_expert: 32, n_shared: 1, first_k_dense: 0, "
    "router: {kind: token_choice, top_k: 2}}}";

TEST(ComponentCuda, ForwardAndBackwardMatchTheCpu) {
  SKIP_WITHOUT_CUDA();
  const std::string d = test::scratch_dir("cuda_parity");
  test::tiny_setup(d, d + "/data");
  auto parts_for = [&](const std::string& device) {
    ConfigNode r = ConfigNode::from_file(d + "/recipe.yaml");
    r.apply_override(kMoe);
    r.apply_override("losses=[{kind: masked_diffusion_elbo}, {kind: load_balance, weight: 0.01}]");
    r.apply_override("runtime={device: " + device + "}");
    return build_trainer_parts(r);
  };
  TrainerParts cpu = parts_for("cpu"), gpu = parts_for("cuda");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  auto x0 = cpu.data->train_batch(0, 4);
  auto t = torch::rand({x0.size(0)}, gen);
  DiffusionBatch b = corrupt(x0, t, *cpu.schedule, cpu.model->mask_id(), gen);
  auto run = [&](TrainerParts& p, const at::Device& dev) {
    p.model->train();
    ModelInput in(b.xt_BL.to(dev), b.index_M.to(dev));
    ModelOutput out = p.model->forward(in);
    DiffusionBatch bd = b;
    bd.index_M = b.index_M.to(dev);
    bd.target_M = b.target_M.to(dev);
    bd.weight_M = b.weight_M.to(dev);
    bd.xt_BL = b.xt_BL.to(dev);
    bd.x0_BL = b.x0_BL.to(dev);
    at::Tensor loss;
    for (auto& w : p.losses) {
      if (!w.routing) loss = w.term->compute(out, bd) * w.weight;
    }
    loss.backward();
    return std::make_pair(out.logits.detach().cpu(), loss.item<double>());
  };
  auto [lc, vc] = run(cpu, at::kCPU);
  auto [lg, vg] = run(gpu, at::Device("cuda"));
  EXPECT_LT((lc - lg).abs().max().item<double>(), 2e-3);
  EXPECT_NEAR(vc, vg, 1e-3 * std::abs(vc));
  auto pc = cpu.model->named_parameters(), pg = gpu.model->named_parameters();
  for (const auto& kv : pc) {
    const auto& gc = kv.value().grad();
    const auto& gg = pg[kv.key()].grad();
    ASSERT_EQ(gc.defined(), gg.defined()) << kv.key();
    if (!gc.defined()) continue;
    const double scale = gc.abs().max().item<double>() + 1e-12;
    EXPECT_LT((gc - gg.cpu()).abs().max().item<double>() / scale, 1e-2) << kv.key();
  }
}

// Ten model set-ups, one CPU copy and one CUDA copy of the same weights (fp32): logits, the
// diffusion loss and every gradient agree.
TEST(ComponentCuda, EveryModelKindAndRouterFamilyMatchesTheCpu) {
  SKIP_WITHOUT_CUDA();
  const std::string back = "vocab_size: 64, d_model: 32, n_layer: 2, n_head: 2, max_seq_len: 64";
  const std::vector<std::string> models = {
      "{kind: dense_dlm, " + back + "}",
      "{kind: dense_dlm, " + back + ", attention: block_causal, block_size: 8}",
      "{kind: moe_dlm, " + back + ", moe: {n_expert: 8, d_expert: 16, n_shared: 1, router: {kind: token_choice, top_k: 2}}}",
      "{kind: moe_dlm, " + back + ", moe: {n_expert: 8, d_expert: 16, router: {kind: token_choice, top_k: 2, score: sigmoid, balancer: {kind: aux_free}}}}",
      "{kind: moe_dlm, " + back + ", moe: {n_expert: 8, d_expert: 16, router: {kind: top_p, p: 0.5}}}",
      "{kind: moe_dlm, " + back + ", moe: {n_expert: 8, d_expert: 16, router: {kind: expert_choice, capacity: {kind: constant, k: 2}}}}",
      "{kind: unipool_dlm, " + back + ", moe: {n_expert: 4, d_expert: 16, router: {kind: norm_router, top_k: 2}}}",
      "{kind: rexmoe_dlm, " + back + ", moe: {n_expert: 4, d_expert: 16, sharing: sliding, window: 1, router: {kind: token_choice, top_k: 2}}}",
      "{kind: coe_dlm, " + back + ", moe: {n_expert: 4, d_expert: 16, iterations: 2, router: {kind: token_choice, top_k: 1}}}",
      "{kind: moe_dlm, " + back + ", moe: {n_expert: 8, d_expert: 16, router: {kind: token_choice, top_k: 2}, block_routing: {kind: dmoe, p: 0.5, guard: 2, block_size: 8}}}",
  };
  for (const auto& yaml : models) {
    SCOPED_TRACE(yaml);
    ConfigNode c = ConfigNode::from_string(yaml, "m.yaml");
    torch::manual_seed(0);
    auto cpu = build_model(c);
    torch::manual_seed(0);
    auto gpu = build_model(c);
    gpu->to(at::Device("cuda"));
    cpu->train();
    gpu->train();
    auto x = torch::randint(0, 65, {3, 24});
    auto idx = (x == 64).reshape({-1}).nonzero().squeeze(1);
    auto target = torch::randint(0, 64, {idx.size(0)});
    auto run = [&](ModelBase& m, const at::Device& dev) {
      auto out = m.forward(ModelInput(x.to(dev), idx.to(dev))).logits;
      auto loss = torch::nn::functional::cross_entropy(out, target.to(dev));
      loss.backward();
      return std::make_pair(out.detach().cpu(), loss.item<double>());
    };
    auto [lc, vc] = run(*cpu, at::kCPU);
    auto [lg, vg] = run(*gpu, at::Device("cuda"));
    const double dlogit = (lc - lg).abs().max().item<double>();
    EXPECT_LT(dlogit, 1e-4 * (lc.abs().max().item<double>() + 1));
    EXPECT_NEAR(vc, vg, 1e-5 * std::abs(vc));
    auto pg = gpu->named_parameters();
    double worst_grad = 0;
    for (const auto& kv : cpu->named_parameters()) {
      const auto& gc = kv.value().grad();
      const auto& gg = pg[kv.key()].grad();
      ASSERT_EQ(gc.defined(), gg.defined()) << kv.key();
      if (!gc.defined()) continue;
      const double scale = gc.abs().max().item<double>() + 1e-12;
      const double rel = (gc - gg.cpu()).abs().max().item<double>() / scale;
      worst_grad = std::max(worst_grad, rel);
      EXPECT_LT(rel, 1e-3) << kv.key();
    }
    // The agreement figures the README quotes.
    std::printf("cuda vs cpu | %s | max |logit diff| %.2e | loss diff %.2e | worst relative grad diff %.2e\n",
                yaml.c_str(), dlogit, std::abs(vc - vg), worst_grad);
  }
}

// Greedy decoding on the GPU gives the CPU's tokens, for every sampler and cache mode.
TEST(ComponentCuda, SamplersDecodeTheCpusTokens) {
  SKIP_WITHOUT_CUDA();
  ConfigNode c = ConfigNode::from_string(
      "{kind: moe_dlm, vocab_size: 40, d_model: 32, n_layer: 2, n_head: 2, max_seq_len: 64, "
      "init_std: 0.3, moe: {n_expert: 8, d_expert: 16, router: {kind: token_choice, top_k: 2}}}",
      "m.yaml");
  torch::manual_seed(0);
  auto cpu = build_model(c);
  torch::manual_seed(0);
  auto gpu = build_model(c);
  gpu->to(at::Device("cuda"));
  auto prompt = torch::randint(0, 40, {2, 6});
  for (const char* yaml : {"{kind: llada, gen_length: 16, steps: 16, block_length: 8}",
                           "{kind: confidence_threshold, gen_length: 16, block_length: 8, threshold: 0.3}",
                           "{kind: block_diffusion, gen_length: 16, block_length: 8, threshold: 0.3, cache: none}",
                           "{kind: block_diffusion, gen_length: 16, block_length: 8, threshold: 0.3, cache: prefix}",
                           "{kind: block_diffusion, gen_length: 16, block_length: 8, threshold: 0.3, cache: dual}"}) {
    SCOPED_TRACE(yaml);
    ConfigNode sc = ConfigNode::from_string(yaml, "s.yaml");
    auto s = samplers_registry().create(sc.get<std::string>("kind"), "kind", sc);
    auto g1 = at::make_generator<at::CPUGeneratorImpl>(0);
    auto g2 = at::make_generator<at::CPUGeneratorImpl>(0);
    auto a = s->generate(*cpu, prompt, g1).tokens_BL;
    auto b = s->generate(*gpu, prompt.to(at::Device("cuda")), g2).tokens_BL.cpu();
    EXPECT_TRUE(torch::equal(a, b)) << a << b;
  }
}

TEST(E2ECuda, Bf16AutocastRunTrainsAndResumes) {
  SKIP_WITHOUT_CUDA();
  const std::string d = test::scratch_dir("cuda_bf16");
  const std::string recipe = test::tiny_setup(d, d + "/data");
  auto r = test::run_mixdiff({"train", recipe, "--out", d + "/run", "--set", kMoe, "--set",
                              "runtime={device: cuda, dtype: bf16}", "--set", "train.steps=20"});
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  const auto state = verify_checkpoint(resolve_checkpoint(d + "/run"));
  EXPECT_EQ(state.at("step").get<int64_t>(), 20);
  auto g = test::run_mixdiff({"generate", "--ckpt", d + "/run"});
  EXPECT_EQ(g.status, 0) << g.err;
  EXPECT_NE(g.out.find("sample:"), std::string::npos);
}

TEST(DistributedCuda, NcclWorldOfOneReducesCudaTensors) {
  SKIP_WITHOUT_CUDA();
  compat::ProcessGroupSpec s;
  s.backend = "nccl";
  s.master_port = test::free_port();
  s.world = 1;
  auto pg = compat::make_process_group(s);
  std::vector<at::Tensor> v{torch::arange(6, torch::TensorOptions().dtype(torch::kFloat).device(torch::kCUDA))};
  pg->all_reduce_sum(v);
  EXPECT_TRUE(torch::equal(v[0].cpu(), torch::arange(6, torch::kFloat)));
  pg->all_reduce_max(v);
  pg->broadcast(v, 0);
  pg->barrier();
  EXPECT_TRUE(torch::equal(v[0].cpu(), torch::arange(6, torch::kFloat)));
}

TEST(ComponentCuda, CpuBuildRefusesCudaDevice) {
  if (compat::cuda_available()) GTEST_SKIP() << "this machine has CUDA";
  ConfigNode r = ConfigNode::from_string("runtime: {device: cuda}\n", "r.yaml");
  EXPECT_THROW(parse_device(r.at("runtime")), ConfigError);
  ConfigNode c = ConfigNode::from_string("runtime: {dtype: bf16}\n", "r.yaml");
  EXPECT_THROW(parse_dtype(c.at("runtime"), at::kCPU), ConfigError);
}

}  // namespace
}  // namespace mixdiff
