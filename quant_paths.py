"""How a GPTQ-quantized Linear runs: its format tensors are converted ONCE, at load, into the form that
its forward reads. The checkpoint on disk never changes; only the in-memory form does.

    path          where            reads per weight       what a forward does
    int4-kernel   CUDA, 4 bits     0.5 byte               torch's int4 weight-only matmul (aten._weight_int4pack_mm)
    int8-kernel   CUDA, 8 bits,    1 byte                 torch's int8 weight-only matmul (aten._weight_int8pack_mm)
                  per-channel                             plus a zero-point correction
    unpacked      anywhere         1 byte (uint8 code)    dequantizes into a shared scratch matrix in 3 vectorised
                                                          ops, then one dense matmul
    dequantized   anywhere         4 bytes (fp32)         a dense matmul with the weight dequantized at load:
                                                          the dense model's speed and memory
    reference     anywhere         packed + temporaries   gptq_format.dequantize on every call (the test oracle)

`auto` takes a kernel where the device has one for the bits and group layout, else `unpacked`. On the 2-core
AVX-512 CPU of BENCHMARKS.md the CPU builds of the int4 and int8 ops (the `_for_cpu` variant) were several times
slower than an fp32 matrix-vector product, so auto never picks them on CPU (they can still be forced, as
`int4-kernel`, to measure them). docs/speed.md has the measurements.

Kernel form of the GPTQ grid: GPTQ stores W = s * (q - z) per group; the int4 kernel computes
W = (q - 8) * scale + zero, so scale = s and zero = s * (8 - z). Columns are first put in group order
(act-order checkpoints of other tools have a permuted g_idx; the input is permuted the same way per call),
and padded with zero columns to a multiple of the kernel's tile and group.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.errors import UserError
from gptq_format import SUPPORTED_BITS, dequantize, n_groups, pack, unpack_rows
from model import column_major

PATHS = ("auto", "int4-kernel", "int8-kernel", "unpacked", "dequantized", "reference")
KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes the int4 kernel accepts
_scratch = {}  # (device, dtype) -> one flat buffer shared by every unpacked Linear (they run one at a time)


# ---------------------------------------------------------------- the quantized Linear

class QuantLinear(nn.Module):
    """A Linear stored in the GPTQ layout. Buffers carry the format's own names, so a GPTQ state dict loads into
    it strictly. prepare() converts them once into the form of a faster forward path (below); until
    then, and on the `reference` path, the weight is dequantized on the fly in each forward.
    """

    def __init__(self, in_features, out_features, bits, group_size, bias=False, zero_offset=1):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise UserError(f"bits = {bits} is not supported (supported: {SUPPORTED_BITS})")
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
        for name in [n for n, _ in self.named_buffers(recurse=False) if n.startswith("rt_")]:
            delattr(self, name)
        tensors, self.rt_meta = FORMS[path](self, dtype)
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.path, self.rt_forward = path, FORWARDS[path]

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


def group_order(q):
    """(perm or None, group size) with g_idx[perm] non-decreasing in runs of `group size` columns, or None if the
    groups cannot be made contiguous and equal (then only the dequantized and reference paths apply)."""
    I, G = q.in_features, q.scales.shape[0]
    gs = I if G == 1 else q.group_size
    g = q.g_idx.long()
    want = torch.arange(I, device=g.device) // gs
    if torch.equal(g, want):
        return None, gs
    perm = torch.argsort(g, stable=True)
    return (perm, gs) if torch.equal(g[perm], want) else (False, gs)


def grouped_codes(q):
    """Integer codes (O, I) in group order, zero points (G, O) and the permutation (or None)."""
    codes = unpack_rows(q.qweight, q.bits).t()  # (O, I)
    zeros = unpack_rows(q.qzeros.t(), q.bits).t() + q.zero_offset  # (G, O)
    perm, gs = group_order(q)
    if perm is not None:
        codes = codes[:, perm]
    return codes, zeros, perm, gs


def padded(t, cols, value=0):
    return F.pad(t, (0, cols - t.shape[-1]), value=value) if cols > t.shape[-1] else t


def choose(path, q, device):
    """The path a Linear will run: `path` itself, or for auto the fastest one available here (see module doc)."""
    perm, gs = group_order(q)
    cuda = torch.device(device).type == "cuda"
    if path != "auto":
        if path in ("int4-kernel", "int8-kernel", "unpacked") and perm is False:
            raise UserError(f"--quant-path {path}: this checkpoint's g_idx has groups of unequal sizes")
        if path == "int4-kernel" and (q.bits != 4 or (q.scales.shape[0] > 1 and gs not in KERNEL_GROUPS)):
            raise UserError(f"--quant-path int4-kernel needs 4 bits and a group size in {KERNEL_GROUPS}")
        if path == "int8-kernel" and (q.bits != 8 or q.scales.shape[0] > 1):
            raise UserError("--quant-path int8-kernel needs 8 bits, per-channel (group size -1)")
        return path
    if perm is False:
        return "dequantized"
    if cuda and q.bits == 4 and (q.scales.shape[0] == 1 or gs in KERNEL_GROUPS) and kernel_runs("int4-kernel", device):
        return "int4-kernel"
    if cuda and q.bits == 8 and q.scales.shape[0] == 1 and kernel_runs("int8-kernel", device):
        return "int8-kernel"
    return "unpacked"


_runs = {}


def kernel_runs(path, device):
    """Whether this torch build runs the kernel on `device` (tried once on a tiny Linear, then remembered)."""
    key = (path, str(device))
    if key not in _runs:
        try:
            q = _tiny(4 if path == "int4-kernel" else 8, 32 if path == "int4-kernel" else -1, device)
            q.prepare(path)
            q(torch.zeros(1, q.in_features, device=device))
            _runs[key] = True
        except (RuntimeError, NotImplementedError) as e:
            print(f"note: {path} does not run on {device} with torch {torch.__version__} ({str(e).splitlines()[0]}); "
                  f"using the unpacked path")
            _runs[key] = False
    return _runs[key]


def _tiny(bits, gs, device, O=64, I=128, seed=0):
    """A QuantLinear with random codes, zero points and scales (for probes and checks)."""
    g = torch.Generator().manual_seed(seed)
    G = 1 if gs == -1 else -(-I // gs)
    q = QuantLinear(I, O, bits, gs)
    codes = torch.randint(0, 2**bits, (O, I), generator=g)
    zeros = torch.randint(1, 2**bits, (G, O), generator=g)
    scales = torch.rand(G, O, generator=g) * 0.02 + 0.001
    for k, v in pack(codes, scales, zeros, torch.arange(I) // (I if gs == -1 else gs), bits).items():
        getattr(q, k).copy_(v)
    return q.to(device)


# ---------------------------------------------------------------- conversion at load

def inner_k_tiles(cols):
    return next(k for k in (8, 4, 2) if cols % (16 * k) == 0)


def int4_form(q, dtype):
    """Packed int4 weight, (groups, O, 2) scales-and-zeros and the kernel's group size."""
    codes, zeros, perm, gs = grouped_codes(q)
    O, I = codes.shape
    kgs = 128 if q.scales.shape[0] == 1 else gs  # per-channel: one grid repeated over kernel groups
    cols = -(-I // max(kgs, 128)) * max(kgs, 128)  # a multiple of the group and of 16 * 8 inner tiles
    s = q.scales.float()  # (G, O)
    if q.scales.shape[0] == 1:
        s, zeros = s.expand(cols // kgs, O), zeros.expand(cols // kgs, O)
    n_pad = cols // kgs - s.shape[0]
    s = torch.cat([s, s.new_ones(n_pad, O)]) if n_pad > 0 else s
    z = torch.cat([zeros.float(), zeros.new_full((n_pad, O), 8).float()]) if n_pad > 0 else zeros.float()
    sz = torch.stack([s, s * (8 - z)], dim=-1)  # (cols/kgs, O, 2): W = (q - 8) * scale + zero
    w = padded(codes.to(torch.int32), cols, value=8).contiguous()  # (O, cols)
    if q.qweight.device.type == "cuda":
        w = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)  # CUDA op: two codes a byte, even column high
        packed = torch.ops.aten._convert_weight_to_int4pack(w.contiguous(), inner_k_tiles(cols))
        kdtype = torch.bfloat16  # the CUDA kernel takes bf16 activations and scales
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, inner_k_tiles(cols))
        kdtype = dtype
    return {"rt_w4": packed, "rt_sz": sz.to(kdtype).contiguous(), "rt_perm": perm}, {"kgs": kgs, "cols": cols}


def int8_form(q, dtype):
    """int8 codes (O, I) centred on 128, per-channel scales, and s * (z - 128) for the zero-point correction."""
    codes, zeros, _, _ = grouped_codes(q)
    s = q.scales[0].float()  # (O,)
    kdtype = torch.bfloat16 if q.qweight.device.type == "cuda" else dtype
    return {"rt_w8": (codes - 128).to(torch.int8).contiguous(), "rt_s": s.to(kdtype),
            "rt_sz0": (s * (zeros[0].float() - 128)).to(dtype)}, {}


def unpacked_form(q, dtype):
    """uint8 codes (O, G, gs) in group order, scales and zero points (O, G, 1) in the activation dtype."""
    codes, zeros, perm, gs = grouped_codes(q)
    O, I = codes.shape
    G = q.scales.shape[0]
    c = padded(codes, G * gs).to(torch.uint8).view(O, G, gs)
    return {"rt_codes": c.contiguous(), "rt_s": q.scales.t().to(dtype)[:, :, None].contiguous(),
            "rt_z": zeros.t().to(dtype)[:, :, None].contiguous(), "rt_perm": perm}, {}


def dequantized_form(q, dtype):
    W = dequantize(q.qweight, q.qzeros, q.scales, q.g_idx, q.bits, q.zero_offset, dtype)  # (O, I)
    return {"rt_w": column_major(W)}, {}  # the decode layout (load_weights.decode_layout)


FORMS = {"int4-kernel": int4_form, "int8-kernel": int8_form, "unpacked": unpacked_form,
         "dequantized": dequantized_form, "reference": lambda q, dtype: ({}, {})}


# ---------------------------------------------------------------- forwards

def scratch(numel, dtype, device):
    key = (torch.device(device), dtype)
    if key not in _scratch or _scratch[key].numel() < numel:
        _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return _scratch[key][:numel]


def permuted(q, x):
    return x if q.rt_perm is None else x.index_select(-1, q.rt_perm)


def forward_int4(q, x):
    x2 = padded(permuted(q, x.reshape(-1, q.in_features)), q.rt_meta["cols"])  # (N, cols)
    op = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    y = op(x2.to(q.rt_sz.dtype).contiguous(), q.rt_w4, q.rt_meta["kgs"], q.rt_sz).to(x.dtype)
    return y.view(*x.shape[:-1], q.out_features)


def forward_int8(q, x):
    x2 = x.reshape(-1, q.in_features)  # (N, I)
    y = torch.ops.aten._weight_int8pack_mm(x2.to(q.rt_s.dtype).contiguous(), q.rt_w8, q.rt_s).to(x.dtype)
    # W = s (q - z) = s (q8 + 128 - z) with q8 = q - 128: the kernel applies s q8, the rest scales sum(x)
    y = y - x2.sum(-1, keepdim=True) * q.rt_sz0
    return y.view(*x.shape[:-1], q.out_features)


def forward_unpacked(q, x):
    O, G, gs = q.rt_codes.shape
    if torch.is_grad_enabled() and x.requires_grad:  # autograd keeps W: no shared scratch then
        W = q.rt_codes.to(x.dtype)
    else:
        W = scratch(O * G * gs, x.dtype, x.device).view(O, G, gs).copy_(q.rt_codes)
    # (q - z) * s exactly as gptq_format.dequantize computes it: two in-place ops over the scratch
    W = W.sub_(q.rt_z).mul_(q.rt_s).view(O, G * gs)[:, :q.in_features]  # (O, I)
    return F.linear(permuted(q, x), W)


def forward_dequantized(q, x):
    return F.linear(x, q.rt_w)


def forward_reference(q, x):
    return F.linear(x, q.weight_dequantized(x.dtype))


FORWARDS = {"int4-kernel": forward_int4, "int8-kernel": forward_int8, "unpacked": forward_unpacked,
            "dequantized": forward_dequantized, "reference": forward_reference}


def prepare(model, path="auto", dtype=torch.float32):
    """Convert every QuantLinear of `model` once; returns {path: number of Linears} (what will run)."""
    used = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare(choose(path, m, m.qweight.device), dtype)
            used[m.path] = used.get(m.path, 0) + 1
    return used


# ---------------------------------------------------------------- the CUDA check

def check_cuda_kernels(device="cuda", O=256, I=576):
    """For tests/test_quant_paths.py on a CUDA machine: each CUDA kernel path against the reference path on a
    random GPTQ Linear (I = 576 as in SmolLM2: a ragged last group at g128, padding to the kernel tile).

    Returns [(path, bits, group size, max |error| / max |reference| or None, ok, note)]. The kernels take bf16
    activations, so the bar is 1% of the output scale. Raises RuntimeError when CUDA is missing."""
    if not torch.cuda.is_available():
        raise RuntimeError("check_cuda_kernels needs CUDA")
    out = []
    for bits, gs, path in ((4, 128, "int4-kernel"), (4, -1, "int4-kernel"), (4, 64, "int4-kernel"),
                           (8, -1, "int8-kernel")):
        q = _tiny(bits, gs, device, O, I, seed=bits + gs)
        x = torch.randn(3, I, generator=torch.Generator().manual_seed(1)).to(device)
        want = forward_reference(q, x)
        try:
            q.prepare(path, torch.float32)
            err = ((q(x) - want).abs().max() / want.abs().max()).item()
            out.append((path, bits, gs, err, err < 1e-2, ""))
        except (RuntimeError, NotImplementedError) as e:
            out.append((path, bits, gs, None, False, str(e).splitlines()[0]))
    return out
