# MixDiff masked-diffusion language model for Hugging Face transformers (trust_remote_code).
# Written by `mixdiff export-hf`; computes the logits MixDiff computes for the same tokens.
#
#   from transformers import AutoModelForMaskedLM, AutoTokenizer
#   model = AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)
#   logits = model(input_ids).logits    # [B, L, V]: V real tokens; config.mask_token_id = V is
#                                       # [MASK]; config.vocab_size = V + 1 (embedding rows)
#
# The backbone: token embedding with a [MASK] row (the last), pre-norm blocks (RMSNorm,
# rotary attention with grouped KV heads, an optional q/k/v bias and optional QK-norm per head or
# over the whole projection, SwiGLU or MoE), final
# RMSNorm, tied or untied head over the vocab_size - 1 real tokens. Attention: full (bidirectional),
# causal, or block_causal (a token sees its own block and earlier ones; blocks start at 0).
# MoE: token-choice routing (softmax or sigmoid scores, softmax before or after top-k, renormalised
# gates, a scaling factor, group-limited selection, an auxiliary-loss-free selection bias, null
# experts that output zero) over stacked SwiGLU experts, plus shared experts (optionally scaled by
# a learned sigmoid gate).
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class MixDiffConfig(PretrainedConfig):
    model_type = "mixdiff"

    def __init__(self, vocab_size=2, d_model=64, n_layer=1, n_head=1, n_kv_head=1, head_dim=64,
                 d_ff=64, max_seq_len=64, rope_theta=10000.0, qk_norm=False, tie_embeddings=True,
                 attention="full", block_size=32, norm_eps=1e-6, layer_pattern="", moe=None,
                 mask_token_id=None, qkv_bias=False, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim
        self.d_ff = d_ff
        self.max_seq_len = max_seq_len
        self.rope_theta = rope_theta
        self.qk_norm = qk_norm  # False, True / "head" (per head) or "projection"
        self.qkv_bias = qkv_bias
        self.tie_embeddings = tie_embeddings
        self.attention = attention
        self.block_size = block_size
        self.norm_eps = norm_eps
        self.layer_pattern = layer_pattern or "D" * n_layer
        self.moe = moe
        self.mask_token_id = vocab_size - 1 if mask_token_id is None else mask_token_id
        kwargs["tie_word_embeddings"] = False  # MixDiff ties by using embed[:V] as the head
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.hk, self.hd = c.n_head, c.n_kv_head, c.head_dim
        self.wqkv = nn.Parameter(torch.empty((self.h + 2 * self.hk) * self.hd, c.d_model))
        self.bqkv = nn.Parameter(torch.zeros((self.h + 2 * self.hk) * self.hd)) if c.qkv_bias else None
        self.wo = nn.Parameter(torch.empty(c.d_model, self.h * self.hd))
        self.projection = c.qk_norm == "projection"
        if c.qk_norm:
            self.q_norm = RMSNorm(self.h * self.hd if self.projection else self.hd, c.norm_eps)
            self.k_norm = RMSNorm(self.hk * self.hd if self.projection else self.hd, c.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, bias):
        B, L, _ = x.shape
        h, hk, hd = self.h, self.hk, self.hd
        qkv = F.linear(x, self.wqkv, self.bqkv)
        q, k = qkv[..., : h * hd], qkv[..., h * hd: (h + hk) * hd]
        if self.q_norm is not None and self.projection:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.reshape(B, L, h, hd), k.reshape(B, L, hk, hd)
        v = qkv[..., (h + hk) * hd:].reshape(B, L, hk, hd).transpose(1, 2)
        if self.q_norm is not None and not self.projection:
            q, k = self.q_norm(q), self.k_norm(k)
        q = (q * cos + rotate_half(q) * sin).transpose(1, 2)
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)
        if hk != h:
            k = k.repeat_interleave(h // hk, dim=1)
            v = v.repeat_interleave(h // hk, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return F.linear(o.transpose(1, 2).reshape(B, L, h * hd), self.wo)


class SwiGLU(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(d_ff, d_model))
        self.w_up = nn.Parameter(torch.empty(d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(d_model, d_ff))

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


class Experts(nn.Module):
    def __init__(self, n, d_model, d_expert):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n, d_expert, d_model))
        self.w_up = nn.Parameter(torch.empty(n, d_expert, d_model))
        self.w_down = nn.Parameter(torch.empty(n, d_model, d_expert))


class Balancer(nn.Module):
    def __init__(self, slots):
        super().__init__()
        self.register_buffer("bias", torch.zeros(slots))
        self.register_buffer("updates", torch.zeros(1, dtype=torch.float64))


class Router(nn.Module):
    def __init__(self, c, m):
        super().__init__()
        r = m["router"]
        self.E = m["n_expert"]
        self.S = self.E + r.get("n_null", 0)
        self.k = r["top_k"]
        self.sigmoid = r.get("score", "softmax") == "sigmoid"
        self.after = r.get("softmax", "before_topk") == "after_topk"
        self.normalize = r.get("normalize", self.sigmoid)
        self.scaling = r.get("scaling", 1.0)
        self.n_group = r.get("n_group", 1)
        self.topk_group = r.get("topk_group", self.n_group)
        self.group_top2 = r.get("group_score", "top2_sum") == "top2_sum"
        self.weight = nn.Parameter(torch.empty(self.S, c.d_model))
        bal = r.get("balancer", {}).get("kind", "none") if r.get("balancer") else "none"
        self.balancer = Balancer(self.S) if bal == "aux_free" else None

    def forward(self, x):  # x [T, D] -> idx [T, K], gates [T, K]
        logits = F.linear(x.float(), self.weight.float())
        if self.sigmoid:
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, -1)
        sel = logits if self.after else scores
        if self.balancer is not None:
            sel = sel + self.balancer.bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            T, G = sel.shape[0], self.n_group
            grouped = sel.view(T, G, -1)
            if self.group_top2 and grouped.shape[-1] >= 2:
                gs = grouped.topk(2, -1).values.sum(-1)
            else:
                gs = grouped.max(-1).values
            keep = torch.zeros(T, G, dtype=torch.bool, device=sel.device).scatter_(
                1, gs.topk(self.topk_group, -1).indices, True)
            sel = sel.masked_fill(~keep.unsqueeze(-1).expand_as(grouped).reshape(T, -1), float("-inf"))
        idx = sel.topk(self.k, -1).indices
        if self.after:
            gates = torch.softmax(logits.gather(1, idx), -1)
        else:
            gates = scores.gather(1, idx)
            if self.normalize:
                gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
        return idx, gates * self.scaling


class MoE(nn.Module):
    def __init__(self, c, m):
        super().__init__()
        self.router = Router(c, m)
        self.experts = Experts(m["n_expert"], c.d_model, m["d_expert"])
        d_shared = m.get("d_shared", m.get("n_shared", 0) * m["d_expert"])
        self.shared = SwiGLU(c.d_model, d_shared) if m.get("n_shared", 0) > 0 else None
        self.shared_gate = nn.Parameter(torch.empty(1, c.d_model)) if m.get("shared_gate") else None

    def forward(self, x):
        B, L, D = x.shape
        xt = x.reshape(-1, D)
        idx, gates = self.router(xt)
        y = torch.zeros_like(xt)
        ex = self.experts
        for e in range(ex.w_gate.shape[0]):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = F.silu(xt[tok] @ ex.w_gate[e].t()) * (xt[tok] @ ex.w_up[e].t())
            y.index_add_(0, tok, (h @ ex.w_down[e].t()) * gates[tok, slot].unsqueeze(-1).to(x.dtype))
        if self.shared is not None:
            s = self.shared(xt)
            if self.shared_gate is not None:
                s = s * torch.sigmoid(F.linear(xt, self.shared_gate))
            y = y + s
        return y.view(B, L, D)


class Block(nn.Module):
    def __init__(self, c, moe):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c)
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.ffn = MoE(c, c.moe) if moe else SwiGLU(c.d_model, c.d_ff)

    def forward(self, x, cos, sin, bias):
        x = x + self.attn(self.attn_norm(x), cos, sin, bias)
        return x + self.ffn(self.ffn_norm(x))


class MixDiffForMaskedLM(PreTrainedModel):
    config_class = MixDiffConfig
    base_model_prefix = "mixdiff"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        c = config
        V = c.vocab_size - 1  # real tokens; row V of the embedding is [MASK]
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.d_model))
        self.layers = nn.ModuleList(Block(c, p == "M") for p in c.layer_pattern)
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.head = None if c.tie_embeddings else nn.Parameter(torch.empty(V, c.d_model))
        self.post_init()

    def _init_weights(self, module):
        for p in module.parameters(recurse=False):
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """attention_mask [B, L] (1 real, 0 padding): padding positions are hidden from every
        query, as MixDiff hides them."""
        c = self.config
        B, L = input_ids.shape
        x = F.embedding(input_ids, self.embed)
        inv = 1.0 / torch.pow(torch.tensor(c.rope_theta, dtype=torch.float64),
                              torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
        ang = torch.outer(torch.arange(L, dtype=torch.float64), inv)
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.device, x.dtype)[None, :, None, :]
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.device, x.dtype)[None, :, None, :]
        bias = None
        if c.attention != "full":
            size = 1 if c.attention == "causal" else c.block_size
            blk = torch.arange(L, device=x.device) // size
            bias = torch.zeros(L, L, device=x.device, dtype=x.dtype).masked_fill(
                blk[None, :] > blk[:, None], float("-inf"))
        if attention_mask is not None:
            pad = torch.zeros(B, 1, 1, L, device=x.device, dtype=x.dtype).masked_fill(
                ~attention_mask.bool()[:, None, None, :], float("-inf"))
            bias = pad if bias is None else bias + pad
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        x = self.norm(x)
        w = self.head if self.head is not None else self.embed[: c.vocab_size - 1]
        logits = F.linear(x, w).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
