// Hugging Face interchange against transformers itself (PyPI transformers in .venv; tiny random
// models made by tests/interop/hf_reference.py, no hub): for every supported family, import-hf
// with causal attention gives transformers' logits to 1e-4; export-hf back gives a folder that
// transformers loads with the same logits and every tensor bit-equal to the source (experts
// included); a diffusion (full attention) import exported as modeling_mixdiff.py computes
// MixDiff's logits under trust_remote_code, and importing that folder again gives a bit-equal
// checkpoint; the imported tokenizer encodes as the source's; unsupported folders are refused
// with the field named.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/safetensors.h"
#include "data/tokenizer.h"
#include "model/model.h"
#include "support/support.h"
#include "train/checkpoint.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

const char* const kFamilies[] = {"llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"};

/// The checkpoint's model on the reference tokens; logits written for the Python side.
at::Tensor logits_of(const std::string& run, const at::Tensor& ids, const std::string& save_to) {
  torch::NoGradGuard ng;
  const std::string ckpt = resolve_checkpoint(run);
  ConfigNode recipe = ConfigNode::from_file(ckpt + "/recipe.yaml");
  auto model = build_model(recipe.at("model"));
  load_model_weights(*model, ckpt + "/model.safetensors");
  model->eval();
  at::Tensor logits = model->forward(ModelInput(ids)).logits.contiguous();
  save_safetensors(save_to, {{"logits", logits}});
  return logits;
}

TEST(E2EHuggingFace, ImportExportAgreeWithTransformersForEveryFamily) {
  const std::string py = test::source_dir() + "/.venv/bin/python";
  const bool have = fs::exists(py) &&
                    std::system((py + " -c 'import transformers, tokenizers' 2>/dev/null").c_str()) == 0;
  if (!have) {
    if (std::getenv("MIXDIFF_REQUIRE_TORCH2")) {
      FAIL() << "transformers is not installed in .venv (tools/setup.sh --tests --torch2)";
    }
    GTEST_SKIP() << "transformers not in .venv";
  }
  const std::string d = test::scratch_dir("hf_interchange");
  const std::string script = test::source_dir() + "/tests/interop/hf_reference.py";
  const std::string env = "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME='" + d + "/hf' ";
  ASSERT_EQ(std::system((env + "'" + py + "' '" + script + "' make '" + d + "' > '" + d +
                         "/make.log' 2>&1").c_str()), 0)
      << test::read_text(d + "/make.log");

  for (const char* fam : kFamilies) {
    SCOPED_TRACE(fam);
    const std::string src = d + "/" + fam;
    TensorMap ref = load_safetensors(d + "/" + fam + ".ref.safetensors");
    const at::Tensor ids = ref.at("input_ids").to(torch::kLong);
    // Causal import: transformers' logits.
    auto im = test::run_mixdiff({"import-hf", src, "--out", d + "/" + fam + ".run_causal",
                                 "--attention", "causal", "--recipe-out", d + "/" + fam + ".yaml"});
    ASSERT_EQ(im.status, 0) << im.err;
    at::Tensor mine = logits_of(d + "/" + fam + ".run_causal", ids,
                                d + "/" + fam + ".causal.mixdiff.safetensors");
    const double err = (mine - ref.at("logits")).abs().max().item<double>();
    EXPECT_LT(err, 1e-4) << "MixDiff (causal) vs transformers";
    std::cout << "[ MEASURE  ] " << fam << ": import (causal) vs transformers, max |logit diff| "
              << err << "\n";
    // The tokenizer came along and encodes as the source's.
    auto probe = nlohmann::json::parse(test::read_text(d + "/" + fam + ".probe.json"));
    Tokenizer tok = Tokenizer::load(resolve_checkpoint(d + "/" + fam + ".run_causal") + "/tokenizer");
    EXPECT_EQ(tok.encode(probe["text"].get<std::string>()), probe["ids"].get<std::vector<int32_t>>());
    // The adaptation recipe names the imported checkpoint; for the MoE family it trains.
    const std::string recipe = test::read_text(d + "/" + fam + ".yaml");
    EXPECT_NE(recipe.find("init: {checkpoint:"), std::string::npos) << recipe;
    EXPECT_NE(recipe.find("\"attention\":\"full\""), std::string::npos) << recipe;  // diffusion
    if (std::string(fam) == "qwen3_moe") {
      const std::vector<std::string> set = {"--set", "data.path=" + d + "/a2d_data",
                                            "--set", "data.prepare.corpora=[{kind: fortunes}]"};
      std::vector<std::string> prep = {"data", "prepare", d + "/" + fam + ".yaml"};
      prep.insert(prep.end(), set.begin(), set.end());
      auto pr = test::run_mixdiff(prep);
      ASSERT_EQ(pr.status, 0) << pr.err;
      std::vector<std::string> tr = {"train", d + "/" + fam + ".yaml", "--out", d + "/a2d_run",
                                     "--set", "train.steps=2", "--set", "eval.every=0",
                                     "--set", "train.ckpt_every=0", "--set", "eval.sequences=8"};
      tr.insert(tr.end(), set.begin(), set.end());
      auto t = test::run_mixdiff(tr);
      ASSERT_EQ(t.status, 0) << t.err;
      EXPECT_NE((t.out + t.err).find("init: "), std::string::npos) << t.out << t.err;
    }
    // Export back as the family's architecture.
    auto ex = test::run_mixdiff({"export-hf", "--ckpt", d + "/" + fam + ".run_causal", "--out",
                                 d + "/" + fam + ".causal"});
    ASSERT_EQ(ex.status, 0) << ex.err;
    EXPECT_NE(ex.out.find("ForCausalLM"), std::string::npos) << ex.out;
    // Diffusion import (full attention), exported with modeling_mixdiff.py, imported again.
    auto imd = test::run_mixdiff({"import-hf", src, "--out", d + "/" + fam + ".run_dlm"});
    ASSERT_EQ(imd.status, 0) << imd.err;
    logits_of(d + "/" + fam + ".run_dlm", ids, d + "/" + fam + ".dlm.mixdiff.safetensors");
    auto exd = test::run_mixdiff({"export-hf", "--ckpt", d + "/" + fam + ".run_dlm", "--out",
                                  d + "/" + fam + ".dlm"});
    ASSERT_EQ(exd.status, 0) << exd.err;
    EXPECT_NE(exd.out.find("MixDiffForMaskedLM"), std::string::npos) << exd.out;
    auto re = test::run_mixdiff({"import-hf", d + "/" + fam + ".dlm", "--out", d + "/" + fam + ".run_back"});
    ASSERT_EQ(re.status, 0) << re.err;
    TensorMap a = load_safetensors(resolve_checkpoint(d + "/" + fam + ".run_dlm") + "/model.safetensors");
    TensorMap b = load_safetensors(resolve_checkpoint(d + "/" + fam + ".run_back") + "/model.safetensors");
    ASSERT_EQ(a.size(), b.size());
    for (const auto& [name, t] : a) {
      ASSERT_TRUE(b.count(name)) << name;
      EXPECT_TRUE(t.dtype() == b.at(name).dtype() && t.sizes() == b.at(name).sizes() &&
                  torch::equal(t, b.at(name)))
          << "MixDiff -> HF -> MixDiff changed " << name;
    }
  }
  // A MixDiff model that no transformers architecture computes: block-causal attention, sigmoid
  // scores, group-limited selection with an aux-free bias, a null expert, a scaling factor, an
  // ungated shared expert, QK-norm over the projection and a q/k/v bias: modeling_mixdiff.py.
  {
    torch::NoGradGuard ng;
    const std::string model_yaml =
        "model:\n  kind: moe_dlm\n  vocab_size: 300\n  d_model: 64\n  n_layer: 3\n  n_head: 4\n"
        "  n_kv_head: 2\n  d_ff: 96\n  max_seq_len: 64\n  attention: block_causal\n"
        "  block_size: 4\n  qk_norm: projection\n  qkv_bias: true\n  tie_embeddings: false\n"
        "  moe:\n    n_expert: 8\n    d_expert: 24\n    n_shared: 1\n    first_k_dense: 1\n"
        "    router: {kind: token_choice, top_k: 3, score: sigmoid, scaling: 2.5, n_group: 3,\n"
        "             topk_group: 2, n_null: 1, balancer: {kind: aux_free}}\n";
    ConfigNode recipe = ConfigNode::from_string(model_yaml, "custom.yaml");
    torch::manual_seed(3);
    auto model = build_model(recipe.at("model"));
    for (auto& kv : model_state(*model)) {
      if (kv.second.dim() == 1 && kv.second.is_floating_point() && kv.second.size(0) > 1) {
        kv.second.uniform_(kv.first.find("balancer") != std::string::npos ? -0.3 : 0.5, 1.0);
      }
    }
    CheckpointContent c;
    c.model = model.get();
    c.recipe_yaml = recipe.to_yaml();
    c.tokenizer_dir = resolve_checkpoint(d + "/llama.run_dlm") + "/tokenizer";
    c.trainer_state = {{"tokens", 0}, {"seed", 0}};
    save_checkpoint(d + "/custom.run", 0, c, 0);
    const at::Tensor ids = load_safetensors(d + "/llama.ref.safetensors").at("input_ids").to(torch::kLong);
    logits_of(d + "/custom.run", ids, d + "/custom.dlm.mixdiff.safetensors");
    auto ex = test::run_mixdiff({"export-hf", "--ckpt", d + "/custom.run", "--out", d + "/custom.dlm"});
    ASSERT_EQ(ex.status, 0) << ex.err;
    auto causal = test::run_mixdiff({"export-hf", "--ckpt", d + "/custom.run", "--out",
                                     d + "/custom.causal", "--as", "causal"});
    EXPECT_NE(causal.status, 0);
    EXPECT_NE(causal.err.find("--as causal: model.attention is block_causal"), std::string::npos)
        << causal.err;
    // An export whose config.json was edited away from its recorded model section is refused.
    fs::create_directories(d + "/custom.edited");
    for (const char* f : {"model.safetensors", "tokenizer.json", "tokenizer_config.json"}) {
      fs::copy_file(d + "/custom.dlm/" + f, d + "/custom.edited/" + f);
    }
    auto cfg = nlohmann::json::parse(test::read_text(d + "/custom.dlm/config.json"));
    cfg["block_size"] = 8;
    test::write_text(d + "/custom.edited/config.json", cfg.dump());
    auto ed = test::run_mixdiff({"import-hf", d + "/custom.edited", "--out", d + "/custom.edited.run/"});
    EXPECT_NE(ed.status, 0);
    EXPECT_NE(ed.err.find("block_size: 8 differs from mixdiff_model.block_size 4"), std::string::npos)
        << ed.err;
  }
  // transformers loads every export and agrees; the causal export is bit-equal to the source.
  ASSERT_EQ(std::system((env + "'" + py + "' '" + script + "' check '" + d + "' > '" + d +
                         "/check.log' 2>&1").c_str()), 0)
      << test::read_text(d + "/check.log");
  int ok = 0;
  for (const auto& l : test::lines(test::read_text(d + "/check.log"))) ok += l.rfind("OK ", 0) == 0;
  EXPECT_EQ(ok, 22) << test::read_text(d + "/check.log");

  // Refused, with the field named.
  const std::pair<const char*, const char*> bad[] = {
      {"bad_deepseek_v3", "model_type: deepseek_v3: kv_lora_rank"},
      {"bad_clip", "clip_qkv: 8.0"},
      {"bad_rope", "rope_parameters.rope_type: \"linear\""},
      {"bad_sliding", "sliding_window: 16"},
      {"bad_bias", "attention_bias: attention biases"},
      {"bad_unknown", "some_new_option: not understood by the llama importer"},
  };
  for (const auto& [dir, want] : bad) {
    auto r = test::run_mixdiff({"import-hf", d + "/" + dir, "--out", d + "/" + dir + ".run"});
    EXPECT_NE(r.status, 0) << dir;
    EXPECT_NE(r.err.find(want), std::string::npos) << dir << ": " << r.err;
    EXPECT_EQ(test::lines(r.err).size(), 1u) << r.err;
    EXPECT_FALSE(fs::exists(d + "/" + dir + ".run/checkpoints")) << dir;
  }
}

}  // namespace
}  // namespace mixdiff
