"""GPTQ (Frantar et al., 2022, Algorithm 1) and round-to-nearest on one weight matrix, with the grids they share.

Grids (per output row and group): min-max over the group with 0 included; asymmetric: scale = (max - min) /
(2^b - 1), zero = round(-min / scale), kept >= 1 so the v1 format can store it (gptq_format); symmetric:
scale = 2 max|w| / (2^b - 1), zero = 2^(b-1). Scales are rounded to fp16 before use, so the stored checkpoint
reproduces exactly the Q that GPTQ's error feedback saw. quantize.py runs these through a whole model.
"""
from dataclasses import dataclass

import torch

from machinery.errors import UserError, check_finite
from gptq_format import n_groups

@dataclass
class Quantized:
    """One quantized weight: integer codes (O, I), scales and zero points (G, O), g_idx (I,)."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def __post_init__(self):
        # codes are < 2^bits <= 256: one byte each while every layer's results wait for the save
        self.codes = self.codes.to(torch.uint8)

    def cpu(self):
        return Quantized(self.codes.cpu(), self.scales.cpu(), self.zeros.cpu(), self.g_idx.cpu())

    def dequantize(self):
        g = self.g_idx.long()
        return self.scales[g].t() * (self.codes - self.zeros[g].t())  # (O, I), in the scales' dtype


# ---------------------------------------------------------------- grids and round-to-nearest

def grid(W, bits, sym):
    """Min-max grid per row of W (O, n): scale, zero (O,) with W ~ scale * (code - zero), code in 0..2^b-1."""
    maxq = 2**bits - 1
    xmin = W.min(1).values.clamp(max=0)
    xmax = W.max(1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = xmax == xmin  # an all-zero row: any grid will do
    xmin[flat], xmax[flat] = -1.0, 1.0
    # the checkpoint stores scales in fp16: quantize against exactly that value
    scale = ((xmax - xmin) / maxq).clamp(min=1e-7).half().to(W.dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def quantize_codes(w, scale, zero, bits):
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn(W, bits, group_size=-1, sym=False):
    """Round-to-nearest on the same grids as GPTQ (the paper's RTN baseline)."""
    O, I = W.shape
    gs = I if group_size == -1 else group_size
    scales, zeros, codes = [], [], torch.empty_like(W)
    for g0 in range(0, I, gs):
        s, z = grid(W[:, g0:g0 + gs], bits, sym)
        codes[:, g0:g0 + gs] = quantize_codes(W[:, g0:g0 + gs], s[:, None], z[:, None], bits)
        scales.append(s)
        zeros.append(z)
    g_idx = torch.arange(I, device=W.device) // gs
    return Quantized(codes.long(), torch.stack(scales), torch.stack(zeros).long(), g_idx)


# ---------------------------------------------------------------- GPTQ

def inverse_cholesky(H, percdamp):
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = percdamp * mean(diag H) (paper, Section 4, step 3)."""
    damp = percdamp * H.diagonal().mean()
    H = H + damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if info:
        raise UserError(f"H + {percdamp} * mean(diag H) * I is not positive definite: raise --percdamp "
                         f"or add calibration data")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    check_finite(Hinv, "the inverse Cholesky factor of H (GPTQ)")
    return Hinv


def current_columns(W, Err, Hinv, i, j, i2, n):
    """W[:, j:j+n] as unbatched GPTQ would see it: columns past the block i:i2 still owe its lazy update."""
    cols = W[:, j:j + n].clone()
    if j + n > i2:
        cols[:, i2 - j:] -= Err[:, : j - i] @ Hinv[i:j, i2:j + n]
    return cols


def gptq(W, H, bits, group_size=-1, sym=False, act_order=False, blocksize=128, percdamp=0.01):
    """GPTQ, Algorithm 1 of Frantar et al. (2022), for one weight W (O, I) and its Hessian H = 2 X X^T / n (I, I).

    Columns are quantized one at a time; each one's error, scaled by 1/[Hinv]_jj, is spread over the columns
    not yet quantized (OBS update). Updates inside a block of `blocksize` columns are applied at once, the
    rest lazily at the end of the block, which is exact. Grids: per-channel, or per group of `group_size`
    columns fixed when the group's first column is reached; with act_order (columns by decreasing diag H)
    the groups are static, fixed from W before any update, so g_idx stays i // group_size.
    """
    W, H = W.clone(), H.clone().to(W.dtype)
    O, I = W.shape
    gs = I if group_size == -1 else group_size
    # a column no calibration token touched: quantize it to zero, keep H invertible
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scales = torch.zeros(n_groups(I, group_size), O, dtype=W.dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    static = group_size == -1 or act_order
    if static:
        for g, g0 in enumerate(range(0, I, gs)):
            scales[g], zeros[g] = grid(W[:, g0:g0 + gs], bits, sym)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(I, device=W.device)
    order = perm.tolist()  # column indices read on the host: no device sync per column on a GPU
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_cholesky(H, percdamp)
    codes = torch.zeros(O, I, dtype=torch.long, device=W.device)
    for i in range(0, I, blocksize):
        i2 = min(i + blocksize, I)
        Err = torch.zeros(O, i2 - i, dtype=W.dtype, device=W.device)
        for j in range(i, i2):
            g = order[j] // gs
            if not static and order[j] % gs == 0:
                scales[g], zeros[g] = grid(current_columns(W, Err, Hinv, i, j, i2, gs), bits, sym)
            w, d = W[:, j], Hinv[j, j]
            c = quantize_codes(w, scales[g], zeros[g], bits)
            q = scales[g] * (c - zeros[g])
            codes[:, j] = c.long()
            Err[:, j - i] = (w - q) / d
            # OBS update of the rest of the block: W[:, j:i2] -= Err_j * Hinv[j, j:i2]
            W[:, j:i2] -= Err[:, j - i, None] @ Hinv[None, j, j:i2]
        # lazy batch update of every later column at once
        W[:, i2:] -= Err @ Hinv[i:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return Quantized(codes, scales, zeros.long(), torch.arange(I, device=W.device) // gs)


def proxy_error(W, Q, H):
    """||W X - Q X||_F^2 / n = trace((W - Q) H (W - Q)^T) / 2, with H = 2 X X^T / n undamped."""
    D = (W - Q).to(H.dtype)
    return float(((D @ H) * D).sum() / 2)
