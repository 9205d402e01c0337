"""The concave gate of continuous layer pruning: a soft, contiguous removal window over layer positions.

Our design (the CLP paper does not publish its gate; see docs/design.md, "The gate"). Layers i = 0..L-1,
budget k. One segment has a learnable centre mu and a fixed width w (= k for one segment); with
a = mu - w/2, b = mu + w/2 and temperature tau, the soft removal mask is

    m_i = sigmoid((i + 0.5 - a) / tau) * sigmoid((b - i - 0.5) / tau)        keep_i = 1 - m_i

log m_i is a sum of two log-sigmoids of affine functions of i, hence concave in i: the mask rises,
peaks once and falls, so the removed set is one contiguous block by construction, for any mu and tau.
As tau -> 0, m_i -> 1 exactly for the w layers whose centres i + 0.5 lie in (a, b), 0 elsewhere.
S >= 1 segments (widths summing to k) multiply their keep weights: keep_i = prod_s (1 - m_i^s).

Read-off is exact: segment s starts at round(a_s), segments are pushed apart so they never overlap,
and the union holds exactly k layers whatever mu is.
"""
import itertools
import math
import re

import torch
import torch.nn as nn

from machinery.errors import UserError


def budget(num_layers, prune_layers=None, prune_ratio=None):
    """The number of layers k to remove: given directly, or round(ratio * L); 1 <= k < L."""
    if (prune_layers is None) == (prune_ratio is None):
        raise UserError("give exactly one of prune_layers and prune_ratio")
    k = prune_layers if prune_layers is not None else round(prune_ratio * num_layers)
    if not 1 <= k < num_layers:
        what = f"--prune-layers {prune_layers}" if prune_layers is not None else f"--prune-ratio {prune_ratio} (k = {k})"
        raise UserError(f"pruning budget {what} is out of range: need 1 <= k < L = {num_layers}")
    return k


def segment_widths(k, segments):
    """Split the budget k into `segments` widths as evenly as possible, wider ones first."""
    if not 1 <= segments <= k:
        raise UserError(f"segments={segments} must be between 1 and the budget k={k}")
    return [k // segments + (s < k % segments) for s in range(segments)]


def tau_at(step, steps, tau0=2.0, tau1=0.05):
    """Geometric annealing of the temperature from tau0 (step 0) to tau1 (last step)."""
    frac = step / max(steps - 1, 1)
    return tau0 * (tau1 / tau0) ** frac


def halving_cuts(steps, halving=True):
    """Successive halving: the steps after which the worse half of the starts stop (after each third)."""
    return {steps // 3, 2 * steps // 3} if halving else set()


def start_steps(starts, steps, halving=True):
    """Cumulative number of start-steps after each step, with the starts halved at the cuts (the search's work)."""
    cuts, n, done, out = halving_cuts(steps, halving), starts, 0, []
    for step in range(steps):
        n = (n + 1) // 2 if step in cuts else n
        done += n
        out.append(done)
    return out


def initial_centres(num_layers, widths, start, starts):
    """Centres mu of one start: segment s of start r sits at fraction (s + (r + 0.5)/R) / S of its valid range."""
    S = len(widths)
    mu = []
    for s, w in enumerate(widths):
        lo, hi = w / 2, num_layers - w / 2
        mu.append(lo + (hi - lo) * (s + (start + 0.5) / starts) / S)
    return mu


class ContiguousGate(nn.Module):
    """S soft contiguous windows of fixed widths over L layers; the learnable parameters are the centres mu."""

    def __init__(self, num_layers, k, segments=1, mu=None):
        super().__init__()
        self.L = num_layers
        self.widths = segment_widths(k, segments)
        if mu is None:
            mu = initial_centres(num_layers, self.widths, 0, 1)
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float32))
        self.register_buffer("w", torch.tensor(self.widths, dtype=torch.float32), persistent=False)

    def removal(self, tau):
        """Soft removal mask per segment, m (S, L): the formula of docs/design.md."""
        i = torch.arange(self.L, dtype=torch.float32, device=self.mu.device)
        a = (self.mu - self.w / 2)[:, None]  # (S, 1)
        b = (self.mu + self.w / 2)[:, None]
        return torch.sigmoid((i + 0.5 - a) / tau) * torch.sigmoid((b - i - 0.5) / tau)  # (S, L)

    def keep(self, tau):
        """Keep weight per layer, keep (L,) = prod_s (1 - m_s)."""
        return (1 - self.removal(tau)).prod(dim=0)

    @torch.no_grad()
    def clamp_(self):
        # a window that slides past either end would remove fewer than its width
        self.mu.copy_(torch.maximum(torch.minimum(self.mu, self.L - self.w / 2), self.w / 2))

    def starts(self):
        """The discrete start layer of each segment: round(mu - w/2)."""
        return [math.floor(float(m) - w / 2 + 0.5) for m, w in zip(self.mu.tolist(), self.widths)]

    def blocks(self):
        """The discrete (start, width) blocks: segment s starts at round(mu_s - w_s/2), segments never overlap."""
        return place_segments(self.starts(), self.widths, self.L)

    def read_off(self):
        """The removed layers, sorted: exactly k of them."""
        return blocks_to_layers(self.blocks())

    def describe(self):
        """The current soft block(s) as text, e.g. '17.3-23.3'."""
        return " ".join(f"{m - w / 2:.1f}-{m + w / 2:.1f}" for m, w in zip(self.mu.tolist(), self.widths))


def place_segments(starts, widths, L):
    """Non-overlapping (start, width) blocks inside [0, L), each as near its wanted start as possible."""
    order = sorted(range(len(starts)), key=lambda s: starts[s])
    blocks, end = [], 0
    for s in order:  # left to right: no block starts before 0 or inside the previous one
        blocks.append([max(starts[s], end), widths[s]])
        end = blocks[-1][0] + widths[s]
    limit = L
    for blk in reversed(blocks):  # right to left: no block ends past L or inside the next one
        blk[0] = min(blk[0], limit - blk[1])
        limit = blk[0]
    return tuple(tuple(b) for b in blocks)


def blocks_to_layers(blocks):
    return sorted(i for s, w in blocks for i in range(s, s + w))


def layers_to_blocks(layers):
    """The inverse: [(start, width), ...], one per run of consecutive layers, in the order given."""
    out = []
    for i in layers:
        if out and i == out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def neighbours(blocks, L, radius=1, merge=False):
    """Every placement with each block moved by up to `radius` layers (the blocks themselves included).

    merge: also every placement with one block moved to touch another, on either side. With several segments
    the walk can then reach a placement whose blocks touch (which is a wider block: the one-segment optima are
    placements too) from blocks that the gate left far apart."""
    starts, widths = [s for s, _ in blocks], [w for _, w in blocks]
    out = set()
    for shift in itertools.product(range(-radius, radius + 1), repeat=len(blocks)):
        out.add(place_segments([s + d for s, d in zip(starts, shift)], widths, L))
    for i, j in itertools.permutations(range(len(blocks)), 2) if merge else ():
        for at in (starts[j] - widths[i], starts[j] + widths[j]):  # just before block j, just after it
            if 0 <= at <= L - widths[i]:
                moved = list(starts)
                moved[i] = at
                out.add(place_segments(moved, widths, L))
    return out


def boundary_moves(layers, L, segments):
    """Every removed set of the same size made by moving one layer from an end of a block to just outside the
    end of a block (the same one or another), with at most `segments` blocks: shifts a block by one layer, or
    hands one layer from one block to another, so that the walk can change the widths (5 + 4 -> 6 + 3 -> 7 + 2),
    and a block of one layer can move away to grow another."""
    layers, out = set(layers), set()
    runs = [(s, s + w - 1) for s, w in layers_to_blocks(sorted(layers))]
    ends = {i for r in runs for i in r}
    outside = {i for a, b in runs for i in (a - 1, b + 1) if 0 <= i < L and i not in layers}
    for e in ends:
        for o in outside:
            moved = sorted(layers - {e} | {o})
            if len(layers_to_blocks(moved)) <= segments:
                out.add(tuple(moved))
    return out - {tuple(sorted(layers))}


def relocations(layers, L):
    """Every removed set made by moving one block (a run of consecutive layers) anywhere else inside [0, L) where it
    does not overlap another: S (L - w) sets at most. Touching another block merges with it, so the number of
    blocks never grows."""
    layers, out = set(layers), set()
    for s, w in layers_to_blocks(sorted(layers)):
        rest = layers - set(range(s, s + w))
        for t in range(L - w + 1):
            if t != s and not rest & set(range(t, t + w)):
                out.add(tuple(sorted(rest | set(range(t, t + w)))))
    return out


def swaps(layers, L, segments):
    """Every removed set made by putting back one removed layer and removing one kept layer instead, with at most
    `segments` blocks: k (L - k) sets before that filter. They contain the boundary moves, and they can also split
    a block (16-18 -> 13,17-18) or start a new one anywhere, which no boundary move or relocation can."""
    layers, out = set(layers), set()
    for e in layers:
        for o in set(range(L)) - layers:
            moved = tuple(sorted(layers - {e} | {o}))
            if len(layers_to_blocks(moved)) <= segments:
                out.add(moved)
    return out


STRIP = " .:-=+*#%@"


def strip(keep):
    """A one-line picture of the removal mask over layers: ' ' kept, '@' removed."""
    m = (1 - keep.detach().float()).clamp(0, 1).tolist()
    return "|" + "".join(STRIP[min(int(v * len(STRIP)), len(STRIP) - 1)] for v in m) + "|"


def span(layers):
    """'17-22' for a contiguous block, '3-5,20-22' otherwise (original indices, inclusive)."""
    return ",".join(f"{a}-{a + w - 1}" if w > 1 else f"{a}" for a, w in layers_to_blocks(layers))


def spec_indices(spec):
    """'3,5,10-12' -> [3, 5, 10, 11, 12], unchecked."""
    layers = []
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UserError(f"cannot read layer spec {part!r} in {spec!r}: use e.g. 17-22 or 3,5,10-12")
        a, b = int(m[1]), int(m[2] or m[1])
        if b < a:
            raise UserError(f"layer range {part!r} runs backwards")
        layers += range(a, b + 1)
    return layers


def check_layers(layers, num_layers):
    layers = sorted(layers)
    if len(set(layers)) != len(layers):
        raise UserError(f"layer {next(i for i in layers if layers.count(i) > 1)} is listed twice")
    unknown = [i for i in layers if not 0 <= i < num_layers]
    if unknown:
        raise UserError(f"unknown layer(s) {unknown}: the model has layers 0..{num_layers - 1}")
    if not 1 <= len(layers) < num_layers:
        raise UserError(f"removing {len(layers)} of {num_layers} layers: need at least one removed and one kept")
    return layers
