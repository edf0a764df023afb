// The CUDA path (built with tools/build_cuda.sh; skipped where no CUDA device is visible): a
// forward/backward on the GPU equals the CPU one, a bf16-autocast run trains, and an NCCL
// process group of world size 1 reduces CUDA tensors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/compat.h"
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
