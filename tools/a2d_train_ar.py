"""Trains the autoregressive source model of the AR-to-diffusion experiment (README, "Starting
from a Hugging Face checkpoint"; recipes/experiments/a2d.yaml) with transformers, on the same
prepared data and tokenizer as the quickstart, and saves it as a Hugging Face folder that
`mixdiff import-hf` reads.

  .venv/bin/python tools/a2d_train_ar.py --data datasets/default --out runs/a2d_ar_hf

The model is Qwen3ForCausalLM at the quickstart's shape (d_model 256, 4 layers of 4 heads of 64,
per-head QK-norm, SwiGLU 704, tied embeddings, 128 positions), trained with the quickstart's
optimizer and schedule (AdamW 3e-3, betas 0.9/0.95, weight decay 0.1, 100 warm-up steps, cosine
to 0.1) on random 128-token windows of the training shards, 16 per step. The tokenizer travels as
GPT-2 style vocab.json + merges.txt (the dataset's own files). The held-out next-token loss is
written to OUT/ar_metrics.json.
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch


def read_shards(folder, split):
    """Token shards of one split (data/shards.h), concatenated."""
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(".bin") and not name.endswith(".tok"):
            continue
        with open(path, "rb") as f:
            if f.read(8) != b"MIXDTOKS":
                continue
            f.read(4)
            hlen = int.from_bytes(f.read(4), "little")
            head = json.loads(f.read(hlen).decode())
            if head["split"] != split:
                continue
            dt = np.uint16 if head["dtype"] == "uint16" else np.uint32
            out.append(np.frombuffer(f.read(), dtype=dt).astype(np.int64))
    if not out:
        raise SystemExit(f"error: {folder}: no {split} token shards (run mixdiff data prepare)")
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="datasets/default")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok_dir = os.path.join(a.data, "tokenizer")
    vocab = json.load(open(os.path.join(tok_dir, "encoder.json")))
    V = len(vocab)
    eos = vocab["<|endoftext|>"]
    shard_dir = a.data if any(n.endswith((".bin", ".tok")) for n in os.listdir(a.data)) \
        else os.path.join(a.data, "shards")
    train, val = read_shards(shard_dir, "train"), read_shards(shard_dir, "val")
    cfg = Qwen3Config(vocab_size=V, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                      max_position_embeddings=a.seq, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      eos_token_id=eos, bos_token_id=None, pad_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))
    warm = 100

    def lr_at(s):
        if s < warm:
            return a.lr * (s + 1) / warm
        p = (s - warm) / max(1, a.steps - warm)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    model.train()
    for s in range(a.steps):
        starts = rng.integers(0, len(train) - a.seq, a.batch)
        x = torch.from_numpy(np.stack([train[i:i + a.seq] for i in starts]))
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s % 100 == 0 or s == a.steps - 1:
            print(f"step {s} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    losses = []
    with torch.no_grad():
        n = (len(val) // a.seq) * a.seq
        windows = torch.from_numpy(val[:n].reshape(-1, a.seq))
        for i in range(0, len(windows), 32):
            losses.append(model(input_ids=windows[i:i + 32], labels=windows[i:i + 32]).loss.item()
                          * len(windows[i:i + 32]))
    val_loss = sum(losses) / len(windows)
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out)
    shutil.copy(os.path.join(tok_dir, "encoder.json"), os.path.join(a.out, "vocab.json"))
    shutil.copy(os.path.join(tok_dir, "vocab.bpe"), os.path.join(a.out, "merges.txt"))
    metrics = {"steps": a.steps, "tokens": a.steps * a.batch * a.seq, "seed": a.seed,
               "val_next_token_loss": val_loss, "val_windows": len(windows),
               "train_seconds": time.time() - t0, "torch": torch.__version__}
    json.dump(metrics, open(os.path.join(a.out, "ar_metrics.json"), "w"), indent=2)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
