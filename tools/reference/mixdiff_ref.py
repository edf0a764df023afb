#!/usr/bin/python3
"""An independent, plain PyTorch reference of MixDiff's model, loss, router and sampler.

It reads a MixDiff recipe (YAML) and model.safetensors and recomputes what MixDiff computes,
written the obvious way (a loop over experts, full-sequence logits when sampling), so that the
C++ implementation can be checked against it (tests/reference/parity_test.cpp) and timed against
it (tools/bench_reference.sh), the way a researcher would write it from LLaDA's reference code
(`bench-train` computes the logits of every position and then takes the masked ones; the sampler
recomputes the whole sequence's logits at every step). Covered: dense_dlm and moe_dlm (token_choice routers with
softmax or sigmoid scores, renormalisation, scaling, the aux-free bias as a selection offset,
shared experts, first_k_dense), RMSNorm, rotary attention with grouped KV heads and QK-norm,
the masked-diffusion ELBO, the micro-batch load-balancing loss and the z-loss, AdamW with decay
on matrices only, and LLaDA's low-confidence sampler.

Runs only under Debian's /usr/bin/python3 (python3-torch).

  mixdiff_ref.py step  --ckpt CKPT --batch BATCH.safetensors --out OUT.safetensors
  mixdiff_ref.py bench-train --recipe RECIPE [--steps N] [--warmup N]
  mixdiff_ref.py bench-generate --ckpt CKPT [--repeats N]
"""
import argparse
import json
import math
import os
import re
import struct
import sys
import time

import torch
import torch.nn.functional as F
import yaml

class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: MixDiff writes 1e-06 and 1e+04, which YAML 1.1 would read as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(path):
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
          "BOOL": torch.bool, "U8": torch.uint8}
NAMES = {v: k for k, v in DTYPES.items()}


def load_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        a, b = spec["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        t = torch.frombuffer(buf, dtype=DTYPES[spec["dtype"]]) if b > a else \
            torch.empty(0, dtype=DTYPES[spec["dtype"]])
        out[name] = t.reshape(spec["shape"]).clone()
    return out


def save_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        data = t.numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# ---- model -------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotary(max_len, hd, theta):
    inv = 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64),
                          torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], -1).float(), torch.cat([-sin, sin], -1).float()


def apply_rotary(x, cos, sin):
    L, half = x.shape[2], x.shape[3] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], -1)
    return x * cos[:L] + swapped * sin[:L]


def swiglu(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def stable_topk(s, k):
    return torch.sort(s, dim=-1, descending=True, stable=True)[1][..., :k]


class Model:
    """Parameters are plain tensors named as in MixDiff's model.safetensors."""

    def __init__(self, recipe, state):
        m = recipe["model"]
        self.kind = m["kind"]
        self.V, self.D, self.n_layer = m["vocab_size"], m["d_model"], m["n_layer"]
        self.H = m["n_head"]
        self.Hk = m.get("n_kv_head", self.H)
        self.hd = m.get("head_dim", self.D // self.H)
        self.eps = m.get("norm_eps", 1e-6)
        self.qk_norm = m.get("qk_norm", False)
        assert self.qk_norm in (False, True, "head"), "the reference covers per-head QK-norm only"
        assert not m.get("qkv_bias", False), "the reference has no q/k/v bias"
        assert not (m.get("moe") or {}).get("shared_gate", False), "the reference has no shared gate"
        self.tied = m.get("tie_embeddings", True)
        assert m.get("attention", "full") == "full", "the reference covers full attention"
        self.cos, self.sin = rotary(m["max_seq_len"], self.hd, m.get("rope_theta", 10000.0))
        self.moe = m.get("moe")
        if self.moe is not None:
            r = self.moe["router"]
            assert r["kind"] == "token_choice", "the reference covers token_choice routers"
            self.K = r["top_k"]
            self.sigmoid = r.get("score", "softmax") == "sigmoid"
            self.normalize = r.get("normalize", self.sigmoid)
            self.scaling = r.get("scaling", 1.0)
            assert r.get("n_group", 1) == 1 and r.get("n_null", 0) == 0
            assert r.get("softmax", "before_topk") == "before_topk"
            assert self.moe.get("capacity_factor", 0) == 0
            first = self.moe.get("first_k_dense", 0)
            pattern = self.moe.get("layer_pattern") or ("D" * first + "M" * (self.n_layer - first))
            self.pattern = pattern
        else:
            self.pattern = "D" * self.n_layer
        self.p = {k: v.clone().requires_grad_(v.dtype == torch.float32 and "balancer" not in k)
                  for k, v in state.items()}
        self.routing = []  # per MoE layer: (topk idx, gates, probs, logits)

    def params(self):
        return [t for t in self.p.values() if t.requires_grad]

    def attention(self, i, x):
        B, L, _ = x.shape
        H, Hk, hd = self.H, self.Hk, self.hd
        qkv = F.linear(x, self.p[f"layers.{i}.attn.wqkv"])
        q = qkv[..., :H * hd].view(B, L, H, hd).transpose(1, 2)
        k = qkv[..., H * hd:(H + Hk) * hd].view(B, L, Hk, hd).transpose(1, 2)
        v = qkv[..., (H + Hk) * hd:].view(B, L, Hk, hd).transpose(1, 2)
        if self.qk_norm:
            q = rms_norm(q, self.p[f"layers.{i}.attn.q_norm.weight"], self.eps)
            k = rms_norm(k, self.p[f"layers.{i}.attn.k_norm.weight"], self.eps)
        q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        if Hk != H:
            k = k.unsqueeze(2).expand(B, Hk, H // Hk, L, hd).reshape(B, H, L, hd)
            v = v.unsqueeze(2).expand(B, Hk, H // Hk, L, hd).reshape(B, H, L, hd)
        a = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(hd)), -1) @ v
        return F.linear(a.transpose(1, 2).reshape(B, L, H * hd), self.p[f"layers.{i}.attn.wo"])

    def moe_ffn(self, i, x):
        B, L, D = x.shape
        x = x.reshape(B * L, D)
        pre = f"layers.{i}.ffn."
        logits = F.linear(x.float(), self.p[pre + "router.weight"].float())
        if self.sigmoid:
            scores = torch.sigmoid(logits)
            probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        else:
            probs = torch.softmax(logits, -1)
            scores = probs
        sel = scores.detach()
        if pre + "router.balancer.bias" in self.p:
            sel = sel + self.p[pre + "router.balancer.bias"]
        idx = stable_topk(sel, self.K)
        gate = scores.gather(1, idx)
        if self.normalize:
            gate = gate / (gate.sum(-1, keepdim=True) + 1e-20)
        gate = gate * self.scaling
        y = torch.zeros_like(x)
        E = self.p[pre + "experts.w_gate"].shape[0]
        for e in range(E):  # the obvious loop over experts
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            h = swiglu(x[rows], self.p[pre + "experts.w_gate"][e], self.p[pre + "experts.w_up"][e],
                       self.p[pre + "experts.w_down"][e])
            y = y.index_add(0, rows, h * gate[rows, slot].unsqueeze(1))
        if pre + "shared.w_gate" in self.p:
            y = y + swiglu(x, self.p[pre + "shared.w_gate"], self.p[pre + "shared.w_up"],
                           self.p[pre + "shared.w_down"])
        self.routing.append((idx, gate, probs, logits))
        return y.view(B, L, D)

    def forward(self, tokens, index=None):
        self.routing = []
        x = self.p["embed"][tokens]
        for i in range(self.n_layer):
            h = x + self.attention(i, rms_norm(x, self.p[f"layers.{i}.attn_norm.weight"], self.eps))
            n = rms_norm(h, self.p[f"layers.{i}.ffn_norm.weight"], self.eps)
            if self.pattern[i] == "M":
                x = h + self.moe_ffn(i, n)
            else:
                pre = f"layers.{i}.ffn."
                x = h + swiglu(n, self.p[pre + "w_gate"], self.p[pre + "w_up"], self.p[pre + "w_down"])
        x = rms_norm(x, self.p["norm.weight"], self.eps)
        if index is not None:
            x = x.reshape(-1, self.D)[index]
        w = self.p["embed"][:self.V] if self.tied else self.p["head"]
        return F.linear(x, w)


def load_lbl(probs, idx, K):
    S = probs.shape[1]
    counts = torch.zeros(S, device=probs.device).index_add_(
        0, idx.reshape(-1), torch.ones(idx.numel(), device=probs.device))
    f = counts / counts.sum().clamp_min(1.0)
    return (f * probs.mean(0)).sum() * S


def z_loss(logits):
    return logits.logsumexp(-1).pow(2).mean()


def losses(recipe, model, out, target, weight, n_slots):
    ce = F.cross_entropy(out.float(), target, reduction="none")
    elbo = (ce * weight).sum() / n_slots
    total, aux = elbo, {}
    for term in recipe["losses"]:
        kind, w = term["kind"], term.get("weight", 1.0)
        if kind == "masked_diffusion_elbo":
            continue
        vals = []
        for idx, gate, probs, logits in model.routing:
            if kind == "load_balance":
                assert term.get("scope", "micro") in ("micro", "global")  # one micro-batch
                vals.append(load_lbl(probs, stable_topk(probs.detach(), model.K), model.K))
            elif kind == "z_loss":
                vals.append(z_loss(logits))
            else:
                raise SystemExit(f"reference: loss {kind} is not covered")
        total = total + w * sum(vals)
        aux[kind] = sum(v.item() for v in vals) / len(vals)
    return elbo, total, aux


def adamw(recipe, params):
    o = recipe["optim"]
    b1, b2 = o.get("betas", [0.9, 0.95])
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.get("weight_decay", 0.1)}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=o["lr"], betas=(b1, b2), eps=o.get("eps", 1e-8))


def read_ckpt(ckpt):
    recipe = load_yaml(os.path.join(ckpt, "recipe.yaml"))
    return recipe, load_safetensors(os.path.join(ckpt, "model.safetensors"))


# ---- commands ----------------------------------------------------------------------------------

def cmd_step(a):
    torch.set_num_threads(1)
    recipe, state = read_ckpt(a.ckpt)
    model = Model(recipe, state)
    b = load_safetensors(a.batch)
    out = model.forward(b["xt"], b["index"])
    elbo, total, aux = losses(recipe, model, out, b["target"], b["weight"], float(b["n_slots"].item()))
    res = {"logits": out.detach(), "elbo": elbo.detach().reshape(1)}
    for i, (idx, gate, probs, logits) in enumerate(model.routing):
        res[f"route.{i}.experts"] = idx
        res[f"route.{i}.gates"] = gate.detach()
    for k, v in aux.items():
        res[f"aux.{k}"] = torch.tensor([v])
    opt = adamw(recipe, model.params())
    total.backward()
    clip = recipe.get("train", {}).get("grad_clip", 1.0)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.params(), clip)
    for k, p in model.p.items():
        if p.requires_grad:
            res["grad." + k] = p.grad.detach().clone()
    opt.step()
    for k, p in model.p.items():
        if p.requires_grad:
            res["after." + k] = p.detach()
    save_safetensors(a.out, res)


def token_batches(recipe, B, L, seed):
    g = torch.Generator().manual_seed(seed)
    V = recipe["model"]["vocab_size"]
    while True:
        yield torch.randint(0, V, (B, L), generator=g)


def cmd_bench_train(a):
    """Training steps on random tokens of the recipe's shape: tokens/s (forward/backward split).
    --device cuda [--dtype bf16] runs on the GPU (bf16 autocast around the forward, fp32
    weights, as MixDiff's runtime.dtype); --compile wraps the forward in torch.compile."""
    torch.set_num_threads(1)
    recipe = load_yaml(a.recipe)
    recipe["model"].setdefault("vocab_size", a.vocab)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    state = {k: v.to(dev) for k, v in init_state(recipe).items()}
    model = Model(recipe, state)
    model.cos, model.sin = model.cos.to(dev), model.sin.to(dev)
    opt = adamw(recipe, model.params())
    forward = torch.compile(model.forward) if a.compile else model.forward
    cuda = dev.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and a.dtype == "bf16" else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    B, L = recipe["train"]["batch_size"], recipe["data"]["seq_len"]
    mask_id = model.V
    g = torch.Generator().manual_seed(1)
    fwd = bwd = 0.0
    timed = 0
    for s in range(a.warmup + a.steps):
        x0 = torch.randint(0, model.V, (B, L), generator=g)
        t = torch.rand(B, generator=g)
        p = (1 - 1e-3) * t + 1e-3
        masked = torch.rand(B, L, generator=g) < p[:, None]
        idx = masked.reshape(-1).nonzero().squeeze(1)
        x0, masked, idx, p = x0.to(dev), masked.to(dev), idx.to(dev), p.to(dev)
        sync()
        t0 = time.perf_counter()
        # As LLaDA's reference training code: logits of every position, then the masked ones.
        if amp is not None:
            with amp:
                out = forward(x0.masked_fill(masked, mask_id))
        else:
            out = forward(x0.masked_fill(masked, mask_id))
        out = out.reshape(B * L, -1)[idx]
        _, total, _ = losses(recipe, model, out, x0.reshape(-1)[idx], (1 / p)[idx // L], B * L)
        sync()
        t1 = time.perf_counter()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.params(), 1.0)
        opt.step()
        opt.zero_grad()
        sync()
        t2 = time.perf_counter()
        if s >= a.warmup:
            fwd += t1 - t0
            bwd += t2 - t1
            timed += 1
    tokens = timed * B * L
    print(json.dumps({"impl": "reference" + ("+compile" if a.compile else ""), "what": "train",
                      "device": str(dev), "dtype": a.dtype,
                      "tokens_per_s": tokens / (fwd + bwd),
                      "forward_s_per_step": fwd / timed, "backward_optimizer_s_per_step": bwd / timed,
                      "peak_rss_mb": peak_rss_mb(),
                      "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0}))


def init_state(recipe):
    """Random parameters with MixDiff's names and shapes (for timing only)."""
    m = recipe["model"]
    V, D, n_layer, H = m["vocab_size"], m["d_model"], m["n_layer"], m["n_head"]
    Hk, hd = m.get("n_kv_head", H), m.get("head_dim", D // H)
    F_ = m.get("d_ff", (8 * D // 3 + 63) // 64 * 64)
    s = {"embed": torch.randn(V + 1, D) * 0.02, "norm.weight": torch.ones(D)}
    moe = m.get("moe")
    first = moe.get("first_k_dense", 0) if moe else n_layer
    for i in range(n_layer):
        p = f"layers.{i}."
        s[p + "attn_norm.weight"] = torch.ones(D)
        s[p + "ffn_norm.weight"] = torch.ones(D)
        s[p + "attn.wqkv"] = torch.randn((H + 2 * Hk) * hd, D) * 0.02
        s[p + "attn.wo"] = torch.randn(D, H * hd) * 0.02
        if m.get("qk_norm"):
            s[p + "attn.q_norm.weight"] = torch.ones(hd)
            s[p + "attn.k_norm.weight"] = torch.ones(hd)
        if moe and i >= first:
            E, Fe = moe["n_expert"], moe["d_expert"]
            s[p + "ffn.router.weight"] = torch.randn(E, D) * 0.02
            s[p + "ffn.experts.w_gate"] = torch.randn(E, Fe, D) * 0.02
            s[p + "ffn.experts.w_up"] = torch.randn(E, Fe, D) * 0.02
            s[p + "ffn.experts.w_down"] = torch.randn(E, D, Fe) * 0.02
            n_shared = moe.get("n_shared", 0)
            if n_shared:
                Fs = moe.get("d_shared", n_shared * Fe)
                s[p + "ffn.shared.w_gate"] = torch.randn(Fs, D) * 0.02
                s[p + "ffn.shared.w_up"] = torch.randn(Fs, D) * 0.02
                s[p + "ffn.shared.w_down"] = torch.randn(D, Fs) * 0.02
        else:
            s[p + "ffn.w_gate"] = torch.randn(F_, D) * 0.02
            s[p + "ffn.w_up"] = torch.randn(F_, D) * 0.02
            s[p + "ffn.w_down"] = torch.randn(D, F_) * 0.02
    return s


def llada_generate(model, prompt, gen_length, steps, block_length):
    """LLaDA's generate.py, plainly: full-sequence logits at every step, greedy, low confidence."""
    mask_id = model.V
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id)], 1)
    n_blocks = gen_length // block_length
    per = steps // n_blocks
    forwards = 0
    for j in range(n_blocks):
        s0 = P + j * block_length
        m = (x[:, s0:s0 + block_length] == mask_id).sum(1)
        for i in range(per):
            logits = model.forward(x)
            forwards += 1
            pred = logits.argmax(-1)
            conf = torch.softmax(logits.double(), -1).gather(-1, pred.unsqueeze(-1)).squeeze(-1)
            conf[:, s0 + block_length:] = -math.inf
            conf[x != mask_id] = -math.inf
            for b in range(B):
                k = int(m[b] // per + (1 if i < m[b] % per else 0))
                if k:
                    sel = conf[b].topk(k).indices
                    x[b, sel] = pred[b, sel]
    return x, forwards


def cmd_bench_generate(a):
    torch.set_num_threads(1)
    recipe, state = read_ckpt(a.ckpt)
    model = Model(recipe, state)
    if a.compile:  # one shape (prompt + generation): compiled during the first, untimed, run
        model.forward = torch.compile(model.forward)
    g = recipe.get("generate", {}).get("sampler", {})
    G, steps, blk = g.get("gen_length", 64), g.get("steps", 64), g.get("block_length", 32)
    prompt = torch.randint(0, model.V, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    best = []
    with torch.no_grad():
        for r in range(a.repeats + 1):
            t0 = time.perf_counter()
            _, forwards = llada_generate(model, prompt, G, steps, blk)
            if r:
                best.append(time.perf_counter() - t0)
    secs = sorted(best)[len(best) // 2]
    print(json.dumps({"impl": "reference" + ("+compile" if a.compile else ""), "what": "generate",
                      "tokens_per_s": G / secs,
                      "forwards_per_token": forwards / G, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--batch", required=True)
    s.add_argument("--out", required=True)
    t = sub.add_parser("bench-train")
    t.add_argument("--recipe", required=True)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--vocab", type=int, default=4096)
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    t.add_argument("--compile", action="store_true")
    g = sub.add_parser("bench-generate")
    g.add_argument("--ckpt", required=True)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--prompt-len", type=int, default=8)
    g.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    {"step": cmd_step, "bench-train": cmd_bench_train, "bench-generate": cmd_bench_generate}[a.cmd](a)


if __name__ == "__main__":
    main()
