"""The transformers side of E2EHuggingFace (tests/interop/hf_test.cpp); PyTorch 2.x .venv only.

  hf_reference.py make OUT   tiny random models of every supported family, made and saved by
                             transformers (no hub), each with a byte-level BPE tokenizer.json made
                             by `tokenizers`; their logits on fixed tokens (OUT/<family>.ref.safetensors);
                             folders that must be refused (OUT/bad_*)
  hf_reference.py check OUT  loads what `mixdiff export-hf` wrote (OUT/<family>.causal: the family's
                             own architecture; OUT/<family>.dlm: modeling_mixdiff.py with
                             trust_remote_code) and compares its logits with MixDiff's
                             (OUT/<family>.*.mixdiff.safetensors) to 1e-4; the causal export's
                             tensors must equal the original's bit for bit; the exported
                             tokenizer.json must encode as the original
Prints one line per check; exits non-zero at the first failure.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

TEXT = ["In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "A fortune: you will be fine-tuned 123 times, 4.5% faster!", "naïve café déjà vu"]
PROBE = "And God said, Let there be light: and there was light. 42 naïve"
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_tokenizer(path, split_regex):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.save(path)
    return tok


FAMILIES = {
    # family: (config class, model class, extra config, tied, Qwen-style split regex)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, True, False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, True, True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}, False, True),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}, False, False),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                   "shared_expert_intermediate_size": 40, "mlp_only_layers": [1]}, False, True),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                   "norm_topk_prob": True, "mlp_only_layers": [0], "head_dim": 16}, False, True),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}, False, False),
}


def make(out):
    import transformers
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 12))
    for fam, (cc, mc, extra, tied, split) in FAMILIES.items():
        d = os.path.join(out, fam)
        os.makedirs(d, exist_ok=True)
        tok = make_tokenizer(os.path.join(d, "tokenizer.json"), split)
        V = tok.get_vocab_size()
        cfg = getattr(transformers, cc)(
            vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=tied, eos_token_id=tok.token_to_id("<|endoftext|>"),
            bos_token_id=None, pad_token_id=None, **extra)
        model = getattr(transformers, mc)(cfg).eval()
        with torch.no_grad():  # norms start at one: make them random too, so that a swap shows
            for n, p in model.named_parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(d)
        x = ids % V
        with torch.no_grad():
            logits = model(input_ids=x).logits.float()
        save_file({"input_ids": x, "logits": logits.contiguous()}, os.path.join(out, fam + ".ref.safetensors"))
        with open(os.path.join(out, fam + ".probe.json"), "w") as f:
            json.dump({"text": PROBE, "ids": tok.encode(PROBE).ids}, f)
    # Folders that must be refused, each with the field named in the error.
    bad = {
        "bad_deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                            {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                             "n_group": 2, "topk_group": 1}),
    }
    for name, (cc, mc, extra) in bad.items():
        cfg = getattr(transformers, cc)(vocab_size=300, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, **extra)
        getattr(transformers, mc)(cfg).save_pretrained(os.path.join(out, name))
    # A supported family with one unsupported field each (config edited as a user might find it).
    import shutil
    for name, edit in {
        "bad_rope": lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        "bad_sliding": lambda c: c.update(sliding_window=16),
        "bad_bias": lambda c: c.update(attention_bias=True),
        "bad_unknown": lambda c: c.update(some_new_option=1),
        "bad_clip": lambda c: c.update(clip_qkv=8.0),
    }.items():
        base = {"bad_sliding": "mixtral", "bad_clip": "olmoe"}.get(name, "llama")
        src, dst = os.path.join(out, base), os.path.join(out, name)
        shutil.copytree(src, dst, dirs_exist_ok=True)
        with open(os.path.join(dst, "config.json")) as f:
            c = json.load(f)
        edit(c)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(c, f)
    print("made", ", ".join(FAMILIES))


def fail(msg):
    print("FAIL", msg)
    sys.exit(1)


def check(out):
    import transformers
    from tokenizers import Tokenizer
    for fam in FAMILIES:
        ref = load_file(os.path.join(out, fam + ".ref.safetensors"))
        x = ref["input_ids"]
        # 1. The causal export: the family's own class, tensors bit-equal to the source's.
        d = os.path.join(out, fam + ".causal")
        model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        if type(model).__name__ != FAMILIES[fam][1]:
            fail(f"{fam}: export loads as {type(model).__name__}")
        with torch.no_grad():
            got = model(input_ids=x).logits.float()
        mix = load_file(os.path.join(out, fam + ".causal.mixdiff.safetensors"))["logits"]
        err = (got - mix).abs().max().item()
        if err > 1e-4:
            fail(f"{fam}: causal export vs MixDiff logits differ by {err}")
        a, b = load_file(os.path.join(out, fam, "model.safetensors")), load_file(os.path.join(d, "model.safetensors"))
        if sorted(a) != sorted(b):
            fail(f"{fam}: round trip tensor names differ: {sorted(set(a) ^ set(b))[:5]}")
        for n in a:
            if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or not torch.equal(a[n], b[n]):
                fail(f"{fam}: round trip changed tensor {n}")
        print(f"OK {fam}: causal export max |logit diff| {err:.2e}, {len(a)} tensors bit-equal")
        # 2. The diffusion export: modeling_mixdiff.py through trust_remote_code.
        d = os.path.join(out, fam + ".dlm")
        model = transformers.AutoModelForMaskedLM.from_pretrained(d, trust_remote_code=True).eval()
        with torch.no_grad():
            got = model(input_ids=x).logits.float()
        mix = load_file(os.path.join(out, fam + ".dlm.mixdiff.safetensors"))["logits"]
        err = (got - mix).abs().max().item()
        if err > 1e-4:
            fail(f"{fam}: diffusion export vs MixDiff logits differ by {err}")
        print(f"OK {fam}: diffusion export (trust_remote_code) max |logit diff| {err:.2e}")
        # 3. Tokenizers: the exported tokenizer.json encodes as the source's.
        probe = json.load(open(os.path.join(out, fam + ".probe.json")))
        for sub in (".causal", ".dlm"):
            ids = Tokenizer.from_file(os.path.join(out, fam + sub, "tokenizer.json")).encode(probe["text"]).ids
            if ids != probe["ids"]:
                fail(f"{fam}{sub}: exported tokenizer encodes {ids[:8]}..., source {probe['ids'][:8]}...")
        print(f"OK {fam}: exported tokenizers encode as the source's")
    # A MixDiff model beyond every transformers architecture (made by hf_test.cpp).
    x = load_file(os.path.join(out, "llama.ref.safetensors"))["input_ids"]
    model = transformers.AutoModelForMaskedLM.from_pretrained(os.path.join(out, "custom.dlm"),
                                                              trust_remote_code=True).eval()
    with torch.no_grad():
        got = model(input_ids=x).logits.float()
    mix = load_file(os.path.join(out, "custom.dlm.mixdiff.safetensors"))["logits"]
    err = (got - mix).abs().max().item()
    if err > 1e-4:
        fail(f"custom: diffusion export vs MixDiff logits differ by {err}")
    print(f"OK custom (block-causal, sigmoid, groups, aux-free bias, null expert): max |logit diff| {err:.2e}")


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](sys.argv[2])
