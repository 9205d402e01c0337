"""gptq.gptq against a direct transcription of Algorithm 1 of Frantar et al. (2022), weight for weight.

The transcription below follows the paper's pseudo-code line by line (blocks of B columns, the error
E_{:,j-i} = (W_{:,j} - Q_{:,j}) / [H^-1]_jj, the in-block update and the lazy update of the later columns),
with the grid gptq.py documents (per output row: min-max over the group with 0 included, scale rounded
to fp16 *before* use, zero = round(-min / scale) kept in [1, 2^b - 1]), found when a group's first column is
reached (from the original W for per-channel and act-order's static groups). It runs in float64, as does
gptq.gptq here, so that both produce the same codes, scales and zero points exactly.
"""
import math

import pytest
import torch

import gptq


def minmax_grid(cols, bits):
    """scale, zero (O,) of the asymmetric min-max grid of columns (O, n); the scale goes through fp16."""
    maxq = 2**bits - 1
    lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
    flat = lo == hi
    lo[flat], hi[flat] = -1.0, 1.0
    scale = ((hi - lo) / maxq).clamp(min=1e-7).half().double()
    return scale, torch.round(-lo / scale).clamp(1, maxq)


def algorithm1(W, H, bits, group_size, B, act_order=False, percdamp=0.01):
    """Algorithm 1 (GPTQ), with groups; returns codes (O, I), scales and zeros (G, O) in the original column order."""
    O, I = W.shape
    maxq = 2**bits - 1
    gs = I if group_size == -1 else group_size
    static = group_size == -1 or act_order
    grids = {g: minmax_grid(W[:, g * gs:(g + 1) * gs], bits) for g in range(math.ceil(I / gs))} if static else {}
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(I)
    W, H = W[:, perm].clone(), H[perm][:, perm]
    H = H + percdamp * torch.diag(H).mean() * torch.eye(I, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # H^-1 <- Cholesky(H^-1)^T
    codes = torch.zeros(O, I, dtype=torch.long)
    for i in range(0, I, B):
        E = torch.zeros(O, min(B, I - i), dtype=W.dtype)
        for j in range(i, min(i + B, I)):
            g = int(perm[j]) // gs
            if not static and int(perm[j]) % gs == 0:  # B == group size: the group is this block, fully updated
                grids[g] = minmax_grid(W[:, j:j + gs], bits)
            s, z = grids[g]
            c = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)  # Q_{:,j} <- quant(W_{:,j})
            codes[:, j] = c.long()
            E[:, j - i] = (W[:, j] - s * (c - z)) / Hinv[j, j]
            W[:, j:i + B] -= torch.outer(E[:, j - i], Hinv[j, j:i + B])
        W[:, i + B:] -= E @ Hinv[i:i + B, i + B:]
    scales = torch.stack([grids[g][0] for g in sorted(grids)])
    zeros = torch.stack([grids[g][1] for g in sorted(grids)])
    return codes[:, torch.argsort(perm)], scales, zeros


@pytest.mark.parametrize("bits,group_size,act_order", [(4, -1, False), (4, 32, False), (3, 32, False),
                                                       (4, 32, True), (2, 64, True)])
def test_gptq_equals_algorithm1_weight_for_weight(bits, group_size, act_order):
    g = torch.Generator().manual_seed(bits * 7 + group_size)
    O, I, n = 48, 128, 512
    W = torch.randn(O, I, generator=g, dtype=torch.float64) * 0.05
    X = torch.randn(I, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, I, dtype=torch.float64)[:, None]
    H = 2 * X @ X.t() / n
    B = I if group_size == -1 else group_size
    want_codes, want_scales, want_zeros = algorithm1(W, H, bits, group_size, B, act_order)
    got = gptq.gptq(W, H, bits, group_size, act_order=act_order, blocksize=128)
    assert torch.equal(got.codes, want_codes)
    assert torch.equal(got.scales, want_scales) and torch.equal(got.zeros.double(), want_zeros)
    assert torch.equal(got.scales.half().double(), got.scales)  # stored scales are exactly fp16 values
    # and the error feedback mattered: plain rounding on the same grids gives other codes
    s, z = want_scales[got.g_idx].t(), want_zeros[got.g_idx].t()
    assert not torch.equal(torch.clamp(torch.round(W / s) + z, 0, 2**bits - 1).long(), got.codes)
