"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel layout): packing, unpacking, the config entry.

Only the format: the Linear that runs from it is quant_paths.QuantLinear, loading is load_weights.py.

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

from machinery.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> offset added to stored zero points
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


# ---------------------------------------------------------------- bit packing

def pack_rows(values, bits):
    """(n, m) ints in [0, 2^bits) -> (n*bits/32, m) int32: each 32 rows become `bits` words (see module doc)."""
    n, m = values.shape
    if n % 32:
        raise UserError(f"cannot pack {n} rows: the GPTQ layout needs a multiple of 32")
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
        raise UserError("checkpoint_format 'gptq' stores zero - 1: a zero point of 0 cannot be written")
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
            raise UserError(f"{name}: {what} = {n} is not a multiple of 32; the GPTQ layout packs values "
                             f"32 at a time into int32 words, so this checkpoint cannot be stored in it")


# ---------------------------------------------------------------- quantization_config

def quantization_config(bits, group_size, sym, act_order, percdamp, method):
    """The config.json entry HF-compatible GPTQ readers expect (AutoGPTQ names), plus how it was made."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
            "static_groups": act_order, "sym": sym, "true_sequential": True, "damp_percent": percdamp,
            "checkpoint_format": "gptq", "meta": {"quantizer": "clp quantize.py", "method": method}}


def check_quantization_config(qc, source="config.json"):
    """Validate a checkpoint's quantization_config; returns (bits, group_size, zero_offset)."""
    if qc.get("quant_method") != "gptq":
        raise UserError(f"{source}: quant_method {qc.get('quant_method')!r} is not supported (only 'gptq')")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise UserError(f"{source}: checkpoint_format {fmt!r} is not supported ({', '.join(FORMATS)})")
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise UserError(f"{source}: bits = {bits!r} is not supported (supported: {SUPPORTED_BITS})")
    if not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise UserError(f"{source}: group_size = {group_size!r} must be -1 (per-channel) or a positive integer")
    return bits, group_size, FORMATS[fmt]
