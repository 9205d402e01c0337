"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel layout) and a Linear that runs from it.

Per quantized nn.Linear with in_features I, out_features O, b bits and G = ceil(I / group_size) groups
(G = 1 for per-channel, group_size -1):

    qweight  int32 (I*b/32, O)   codes packed along the input dimension, 32/b per word for b = 2, 4, 8
    qzeros   int32 (G, O*b/32)   zero points packed the same way along the output dimension
    scales   fp16  (G, O)
    g_idx    int32 (I,)          group of each input column (i // group_size, also with act-order: static groups)
    bias     (O,)                only where the Linear has one (Qwen2 q/k/v)

    W[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])

Packing: each column of 32 consecutive values is one little-endian bit stream of 32*b bits cut into
b words; value j occupies bits j*b .. j*b+b-1 of the stream. For b = 4 that is the familiar "8 nibbles,
value j at bits 4j..4j+3 of one word". For b = 3, 32 values fill 3 words: word 0 holds values 0-9 and
the two low bits of value 10, word 1 its high bit, values 11-20 and the low bit of value 21, word 2 the
two high bits of value 21 and values 22-31 -- the layout of AutoGPTQ's 3-bit `pack` (qlinear_cuda.py).
So I and O must be multiples of 32.

Zero points: checkpoint_format "gptq" (AutoGPTQ v1, what we write) stores zero - 1 and readers add 1
back; a zero point of 0 cannot be stored, so our asymmetric grid keeps zero >= 1 (gptq.grid).
"gptq_v2" (GPTQModel) stores the zero itself; we read both.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> offset added to stored zero points
# the Linears of a Block that GPTQ quantizes, in the order they compute (our names = HF names minus "model.")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


# ---------------------------------------------------------------- bit packing

def pack_rows(values, bits):
    """(n, m) ints in [0, 2^bits) -> (n*bits/32, m) int32: each 32 rows become `bits` words (see module doc)."""
    n, m = values.shape
    if n % 32:
        raise ValueError(f"cannot pack {n} rows: the GPTQ layout needs a multiple of 32")
    v = values.to(torch.int64).view(n // 32, 32, m)
    words = torch.zeros(n // 32, bits, m, dtype=torch.int64)
    for j in range(32):
        w, s = divmod(j * bits, 32)
        words[:, w] |= v[:, j] << s
        # 3-bit values 10 and 21 straddle two words: their high bits open the next word
        if s + bits > 32:
            words[:, w + 1] |= v[:, j] >> (32 - s)
    words &= 0xFFFFFFFF
    words -= (words >> 31) << 32  # unsigned 32-bit -> the int32 with the same bits
    return words.to(torch.int32).view(n // 32 * bits, m)


def unpack_rows(packed, bits):
    """Inverse of pack_rows: (n*bits/32, m) int32 -> (n, m) int64."""
    rows, m = packed.shape
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(rows // bits, bits, m)
    out = []
    for j in range(32):
        w, s = divmod(j * bits, 32)
        v = words[:, w] >> s
        if s + bits > 32:
            v = v | (words[:, w + 1] << (32 - s))
        out.append(v & (2**bits - 1))
    return torch.stack(out, 1).view(rows // bits * 32, m)


def pack(codes, scales, zeros, g_idx, bits):
    """Integer codes (O, I), scales / zero points (G, O), g_idx (I,) -> the four format tensors (v1 zeros)."""
    if int(zeros.min()) < 1:
        raise ValueError("checkpoint_format 'gptq' stores zero - 1: a zero point of 0 cannot be written")
    return {
        "qweight": pack_rows(codes.t(), bits),  # (I*b/32, O)
        "qzeros": pack_rows((zeros - 1).t(), bits).t().contiguous(),  # (G, O*b/32)
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset=1, dtype=torch.float32):
    """The weight (O, I) the format tensors stand for: scales[g] * (code - zero[g]) with g = g_idx[i]."""
    codes = unpack_rows(qweight, bits)  # (I, O)
    zeros = unpack_rows(qzeros.t(), bits).t() + zero_offset  # (G, O)
    g = g_idx.long()
    W = scales[g].float() * (codes - zeros[g]).float()  # (I, O)
    return W.t().to(dtype)


def n_groups(in_features, group_size):
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def check_packable(name, in_features, out_features):
    """Clear error for a Linear whose dimensions the packed layout cannot hold."""
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if n % 32:
            raise ValueError(f"{name}: {what} = {n} is not a multiple of 32; the GPTQ layout packs values "
                             f"32 at a time into int32 words, so this checkpoint cannot be stored in it")


# ---------------------------------------------------------------- the quantized Linear

class QuantLinear(nn.Module):
    """A Linear stored in the GPTQ layout. Buffers carry the format's own names, so a GPTQ state dict loads into
    it strictly. prepare() converts them once into the form of a faster forward path (quant_paths.py); until
    then, and on the `reference` path, the weight is dequantized on the fly in each forward.
    """

    def __init__(self, in_features, out_features, bits, group_size, bias=False, zero_offset=1):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits = {bits} is not supported (supported: {SUPPORTED_BITS})")
        self.in_features, self.out_features, self.bits, self.zero_offset = in_features, out_features, bits, zero_offset
        self.group_size, self.path, self.rt_meta, self.rt_forward = group_size, "reference", {}, None
        G = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(G, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def weight_dequantized(self, dtype=torch.float32):
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, dtype)

    def prepare(self, path, dtype=torch.float32):
        """Convert the format tensors once into the runtime form of `path` (non-persistent buffers rt_*)."""
        import quant_paths

        for name in [n for n, _ in self.named_buffers(recurse=False) if n.startswith("rt_")]:
            delattr(self, name)
        tensors, self.rt_meta = quant_paths.FORMS[path](self, dtype)
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.path, self.rt_forward = path, quant_paths.FORWARDS[path]

    def forward(self, x):
        if self.rt_forward is None:
            y = F.linear(x, self.weight_dequantized(x.dtype))  # (..., I) -> (..., O)
        else:
            y = self.rt_forward(self, x)
        return y if self.bias is None else y + self.bias

    def bytes_read(self):
        """Bytes of weights one forward reads from memory on its path (for the decode roofline)."""
        rt = [t for n, t in self.named_buffers(recurse=False) if n.startswith("rt_") and n != "rt_perm"]
        packed = [self.qweight, self.qzeros, self.scales, self.g_idx]
        extra = [] if self.bias is None else [self.bias]
        return sum(t.numel() * t.element_size() for t in (rt if self.path != "reference" else packed) + extra)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={self.scales.shape[0]}, "
                f"path={self.path}")


# ---------------------------------------------------------------- quantization_config

def quantization_config(bits, group_size, sym, act_order, percdamp, method):
    """The config.json entry HF-compatible GPTQ readers expect (AutoGPTQ names), plus how it was made."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
            "static_groups": act_order, "sym": sym, "true_sequential": True, "damp_percent": percdamp,
            "checkpoint_format": "gptq", "meta": {"quantizer": "clp quantize.py", "method": method}}


def check_quantization_config(qc, source="config.json"):
    """Validate a checkpoint's quantization_config; returns (bits, group_size, zero_offset)."""
    if qc.get("quant_method") != "gptq":
        raise ValueError(f"{source}: quant_method {qc.get('quant_method')!r} is not supported (only 'gptq')")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise ValueError(f"{source}: checkpoint_format {fmt!r} is not supported ({', '.join(FORMATS)})")
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{source}: bits = {bits!r} is not supported (supported: {SUPPORTED_BITS})")
    if not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ValueError(f"{source}: group_size = {group_size!r} must be -1 (per-channel) or a positive integer")
    return bits, group_size, FORMATS[fmt]


# ---------------------------------------------------------------- loading a GPTQ checkpoint

def quantized_name_table(cfg, bits, group_size):
    """load_weights.name_table with each quantized Linear's weight replaced by the four format tensors."""
    from load_weights import name_table

    table = {}
    for hf, (ours, shape) in name_table(cfg).items():
        mod = ours.rpartition(".")[0]
        if not (hf.endswith(".weight") and mod.split(".", 2)[-1] in LINEARS):
            table[hf] = (ours, shape)
            continue
        O, I = shape
        G, base = n_groups(I, group_size), hf[: -len(".weight")]
        table.update({f"{base}.qweight": (f"{mod}.qweight", (I * bits // 32, O)),
                      f"{base}.qzeros": (f"{mod}.qzeros", (G, O * bits // 32)),
                      f"{base}.scales": (f"{mod}.scales", (G, O)),
                      f"{base}.g_idx": (f"{mod}.g_idx", (I,))})
    return table


def swap_in_quant_linears(model, bits, group_size, zero_offset=1):
    """Replace every quantized nn.Linear of every Block by an (empty) QuantLinear of the same shape."""
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            parent_name, _, attr = name.rpartition(".")
            lin = layer.get_submodule(name)
            check_packable(f"layers.{i}.{name}", lin.in_features, lin.out_features)
            q = QuantLinear(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, zero_offset)
            setattr(layer.get_submodule(parent_name), attr, q)


def load_quantized_model(path, raw, cfg, dtype=torch.float32, device="cpu", quant_path="auto"):
    """A Transformer with QuantLinears from a GPTQ checkpoint directory, loaded strictly by name and shape.

    Called by load_weights.load when config.json has a quantization_config. Packed tensors keep their
    format dtypes (int32, fp16 scales); everything else is cast to `dtype`. The Linears are then converted
    once for `quant_path` (quant_paths.py; auto: the fastest path this device has), and the choice is printed.
    """
    import quant_paths

    from load_weights import checked_tensors
    from model import Transformer

    bits, group_size, zero_offset = check_quantization_config(raw["quantization_config"], f"{path}/config.json")
    with torch.device("meta"):
        model = Transformer(cfg)
        swap_in_quant_linears(model, bits, group_size, zero_offset)
    table = quantized_name_table(cfg, bits, group_size)
    for ours, t in checked_tensors(path, table, cfg.tie_word_embeddings):
        set_loaded(model, ours, t, dtype, device)
    check_g_idx(model)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    used = quant_paths.prepare(model, quant_path, dtype)
    print(f"{path}: {bits}-bit GPTQ Linears run through " + ", ".join(f"{k} ({n})" for k, n in used.items())
          + f" [--quant-path {quant_path}]")
    return model


def set_loaded(model, name, t, dtype, device):
    """Put a loaded tensor in place: format tensors as buffers in their own dtype, the rest as Parameters."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if isinstance(mod, QuantLinear):
        keep = attr in ("qweight", "qzeros", "g_idx", "scales")
        setattr(mod, attr, t.to(device) if keep else t.to(device=device, dtype=dtype))
    else:
        setattr(mod, attr, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))


def check_g_idx(model):
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            q = layer.get_submodule(name)
            if q.g_idx.numel() and (int(q.g_idx.min()) < 0 or int(q.g_idx.max()) >= q.scales.shape[0]):
                raise ValueError(f"layers.{i}.{name}: g_idx points outside the {q.scales.shape[0]} groups of scales")
