"""A compact LLaMA / Mistral / Qwen2 / Qwen3 decoder, written from scratch.

Shape alphabet used in the trailing comments:
    B batch, T time (new tokens), S time incl. cached tokens, C channels (hidden_size),
    nh query heads, nkv key/value heads, hd head size, F mlp width, V vocab, L layers.

The decoder loop carries the per-layer gate used by continuous layer pruning:
    x = x + keep[i] * (layer(x) - x)
so keep[i] = 0 skips layer i exactly, keep = 1 is the dense model, and gradients flow into keep.
"""
import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.errors import UserError


@dataclass
class Config:
    model_type: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # only {"rope_type": "llama3", ...} changes the frequencies
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None = None  # Mistral: sequences longer than this are refused, not mis-attended

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.n_rep = self.num_heads // self.num_kv_heads  # query heads per key/value head


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like the reference implementations, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: Config):
    """Inverse frequencies theta^(-2j/hd), with LLaMA-3.1 style rescaling when configured."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def rotate_half(x):
    # HF layout: the head is split into two halves, not interleaved pairs
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys and values of past tokens, preallocated for `max_len` tokens and filled in place (a static cache).

    Growing the cache by concatenation copies every past key at every token; here a step writes only its
    own T positions. `length` counts the tokens stored; reset() readies the same memory for a new prompt.
    """

    def __init__(self, cfg: Config, batch=1, max_len=None, dtype=torch.float32, devices=("cpu",)):
        max_len = max_len or cfg.max_position_embeddings
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # (B, nkv, S_max, hd)
        # one tensor per layer, on the device that layer computes on (placement.py can spread layers out)
        devices = list(devices) * cfg.num_layers if len(devices) == 1 else devices
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.length = 0

    @property
    def max_len(self):
        return self.k[0].shape[2]

    def reset(self):
        self.length = 0

    def update(self, i, k, v):
        """Store layer i's new k, v (B, nkv, T, hd) after the cached tokens; return its keys and values so far."""
        s, T = self.length, k.shape[2]
        if s + T > self.max_len:
            raise UserError(f"KV cache full: {s} + {T} tokens exceed its {self.max_len} positions")
        self.k[i][:, :, s:s + T] = k
        self.v[i][:, :, s:s + T] = v
        return self.k[i][:, :, :s + T], self.v[i][:, :, :s + T]  # (B, nkv, S, hd)

    def advance(self, T):
        """Called once per forward, after every layer has stored its T new positions."""
        self.length += T

    def repeat_batch(self, n):
        """A cache of batch n holding n copies of this batch-1 cache's tokens (one prompt, n continuations)."""
        out = KVCache.__new__(KVCache)
        out.k = [k.repeat(n, 1, 1, 1) for k in self.k]  # (n, nkv, S_max, hd)
        out.v = [v.repeat(n, 1, 1, 1) for v in self.v]
        out.length = self.length
        return out


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        C, nh, nkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(C, nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, C, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, layer_idx=0):
        B, T, _ = x.shape
        nh, nkv, hd = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, nh, hd)
        k = self.k_proj(x).view(B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, nkv, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, nkv, S, hd)
        y = attend(q, k, v)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, nh*hd)
        return self.o_proj(y)


def attend(q, k, v):
    """Causal attention of q (B, nh, T, hd) over k, v (B, nkv, S, hd), the T new tokens being the last of S.

    Query head h reads key/value head h // (nh/nkv). SDPA's enable_gqa does that without materialising
    the repeated K and V (measured on CPU at nh=9, nkv=3, hd=64: as fast as repeating at T=S=2048, about
    twice as fast at T=1, S=256..2048).
    """
    T, S = q.shape[2], k.shape[2]
    if S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if T == 1:  # one new token sees every cached one: no mask
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    # causal mask aligned to the end: new token t sees every cached token and new tokens <= t
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, F) -> (B, T, C)


# the Linears of a Block, in the order they compute (our names = HF names minus "model."); GPTQ quantizes them
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.device = None  # where the layer computes, when placement.py has placed it; None: where x is

    def forward(self, x, cos, sin, cache=None, layer_idx=0):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx)
        return h + self.mlp(self.post_attention_layernorm(h))


def follow(x, layer):
    """The hidden state on the device its next layer computes on (placement.py); unplaced: x itself."""
    return x if layer.device is None else x.to(layer.device)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def rope(self, start, T):
        """cos, sin for positions start..start+T-1, shaped to broadcast over (B, nh, T, hd)."""
        pos = torch.arange(start, start + T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)  # (T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
        dtype = self.embed_tokens.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def without(self, removed):
        """This model with the layers in `removed` left out, sharing every weight (nothing is copied): what the
        pruned checkpoint computes, for measuring it before it is written."""
        view = copy.copy(self)
        view._modules = dict(self._modules)
        view.layers = nn.ModuleList(layer for i, layer in enumerate(self.layers) if i not in set(removed))
        view.cfg = dataclasses.replace(self.cfg, num_layers=len(view.layers))
        return view

    def make_cache(self, batch=1, max_len=None):
        """An empty static KV cache for `batch` sequences of up to `max_len` tokens, in the model's dtype."""
        w = self.embed_tokens.weight
        return KVCache(self.cfg, batch, max_len, w.dtype, [layer.device or w.device for layer in self.layers])

    def forward(self, tokens, keep=None, cache=None, last_only=False):
        """tokens (B, T) -> logits (B, T, V). `keep` (L,) weights each layer; `cache` continues decoding;
        `last_only` applies the head to the last position alone, logits (B, 1, V): all that generation needs."""
        B, T = tokens.shape
        start = 0 if cache is None else cache.length
        if self.cfg.sliding_window and start + T > self.cfg.sliding_window:
            raise UserError(f"{start + T} tokens exceed the sliding window of {self.cfg.sliding_window}, "
                             f"which this decoder does not implement")
        cos, sin = self.rope(start, T)
        x = self.embed_tokens(tokens)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = follow(x, layer)
            if keep is None:
                x = layer(x, cos, sin, cache, i)
            else:
                x = x + keep[i].to(x) * (layer(x, cos, sin, cache, i) - x)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(self.norm(x))  # (B, T or 1, V)

    @torch.no_grad()
    def greedy(self, tokens, cache, step=None):
        """Greedy decoding with a static KV cache (reset first): yields each next token (1, 1), on the device of
        `tokens`. The first is the prefill's; every later one costs one decode forward, run only when asked for.
        `step` replaces the model in the decode forwards (a torch.compile'd model)."""
        cache.reset()
        step = self if step is None else step
        logits = self(tokens, cache=cache, last_only=True)  # (1, 1, V)
        while True:
            nxt = logits[:, -1].argmax(-1, keepdim=True).to(tokens.device)  # (1, 1)
            yield nxt
            logits = step(nxt, cache=cache, last_only=True)

    def generate(self, tokens, max_new_tokens, eos_id=None, cache=None):
        """Greedy decoding; tokens (1, T) -> (1, T + new), stopping early at eos_id. A given cache is reused."""
        if cache is None:
            cache = self.make_cache(1, tokens.shape[1] + max_new_tokens)
        out = [tokens]
        for nxt in self.greedy(tokens, cache):
            out.append(nxt)
            if len(out) > max_new_tokens or (eos_id is not None and nxt.item() == eos_id):
                break
        return torch.cat(out, dim=1)


# ---------------------------------------------------------------- Hugging Face names

def name_table(cfg: Config):
    """HF tensor name -> (our parameter name, expected shape). A tied lm_head is the one expected absence."""
    C, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    t = {"model.embed_tokens.weight": ("embed_tokens.weight", (V, C)), "model.norm.weight": ("norm.weight", (C,))}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = ("lm_head.weight", (V, C))
    for i in range(cfg.num_layers):
        per_layer = {
            "input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
            "self_attn.q_proj.weight": (q, C), "self_attn.k_proj.weight": (kv, C),
            "self_attn.v_proj.weight": (kv, C), "self_attn.o_proj.weight": (C, q),
            "mlp.gate_proj.weight": (F, C), "mlp.up_proj.weight": (F, C), "mlp.down_proj.weight": (C, F),
        }
        if cfg.attention_bias:
            per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if cfg.qk_norm:
            per_layer.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
        for name, shape in per_layer.items():
            t[f"model.layers.{i}.{name}"] = (f"layers.{i}.{name}", shape)
    return t


def hf_state_dict(model):
    """Our parameters under their Hugging Face names (lm_head omitted when tied)."""
    ours = dict(model.named_parameters(remove_duplicate=False))
    return {hf: ours[name] for hf, (name, _) in name_table(model.cfg).items()}


def column_major(t):
    """The same values stored column-major on CPU (the decode layout: load_weights.decode_layout)."""
    return t.t().contiguous().t() if t.dim() == 2 and t.device.type == "cpu" else t
