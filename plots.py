"""Pictures from the runs' own JSON: the gate sliding over the layers, the KL landscape, the tuning curves.

    python plots.py --search-report runs/demo/report.json --tuning runs/demo/tuned/tuning.json --out runs/demo
    python plots.py --search-report runs/clp/report.json --exhaustive runs/exhaustive/report.json --out runs/clp

- gate.png: the soft removal mask m_i = 1 - keep_i over layers (x) at every step (y), one panel per start,
  recomputed from the trajectory's mu and tau with gates.py (the report stores no mask).
- landscape.png: calibration KL of removing the block that starts at each layer: every start from an
  exhaustive report, the blocks the gate's read-off scored from a search report; the chosen block marked.
- tuning.png: the per-step KL of each tuning run (tuning.json), with a running mean.

matplotlib is an optional extra (requirements-plots.txt); without it this says how to get it and exits 0.
"""
import argparse
import sys
from pathlib import Path

import torch

from gates import ContiguousGate
from machinery import atomic
from machinery.errors import UserError, cli, old_spelling, read_json

HOW = "plots need matplotlib: pip install -r requirements-plots.txt (make demo installs it)"


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------- numbers (no matplotlib needed)

def gate_masks(report):
    """{start: (steps, L) removal mask, NaN after the start stopped} from a search report's trajectory."""
    traj = report.get("trajectory")
    if not traj:
        raise UserError("the report has no gate trajectory: not a search.py report")
    L, k = report["model"]["fingerprint"]["num_layers"], report["budget"]["layers"]
    segments = report.get("settings", {}).get("segments", 1)
    starts = sorted({int(r) for t in traj for r in t["mu"]})
    masks = {r: torch.full((len(traj), L), float("nan")) for r in starts}
    for t in traj:
        for r, mu in t["mu"].items():
            gate = ContiguousGate(L, k, segments, mu)
            with torch.no_grad():
                masks[int(r)][t["step"]] = 1 - gate.keep(t["tau"])
    return masks


def block_kls(report):
    """[(first layer of the block, kl)] sorted by layer: an exhaustive report's scores or a search's candidates."""
    rows = report.get("candidates") or (report["scores"] if report.get("method") == "exhaustive" else None)
    if not rows:
        raise UserError(f"the report of method {report.get('method')!r} scores no blocks")
    return sorted((r["removed_layers"][0], r["kl"]) for r in rows if is_block(r["removed_layers"]))


def is_block(layers):
    return list(layers) == list(range(layers[0], layers[0] + len(layers)))


def running_mean(xs, n):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


def tuning_label(t):
    layers = t.get("layers")
    what = "endpoints" if layers == "endpoints" else f"layers {layers}"
    return f"{what} ({t['method']}): held-out KL {t['heldout_kl']['before']:.3f} -> {t['heldout_kl']['after']:.3f}"


# ---------------------------------------------------------------- pictures

def plot_gate(plt, report, path):
    masks = gate_masks(report)
    fig, axes = plt.subplots(1, len(masks), figsize=(2.4 * len(masks) + 1.2, 3.8), sharey=True, squeeze=False)
    for ax, (r, m) in zip(axes[0], masks.items()):
        im = ax.imshow(m.numpy(), aspect="auto", origin="upper", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        alive = int((~m[:, 0].isnan()).sum())
        ax.set_title(f"start {r}\n" + ("survived" if alive == len(m) else f"stopped after {alive} steps"), fontsize=9)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("step")
    fig.colorbar(im, ax=axes[0].tolist(), label="removal mask m (1 = removed)")
    fig.suptitle(f"CLP gate, {report['budget']['layers']} of {report['model']['fingerprint']['num_layers']} layers: "
                 f"chosen {report['block']}", fontsize=10, y=1.06)
    return save(plt, fig, path)


def plot_landscape(plt, report, path, exhaustive=None):
    k = report["budget"]["layers"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if exhaustive is not None and block_kls(exhaustive):
        xs, ys = zip(*block_kls(exhaustive))
        ax.plot(xs, ys, "o-", color="0.55", ms=3, label="exhaustive: every block")
    if report.get("candidates") and block_kls(report):
        xs, ys = zip(*block_kls(report))
        ax.plot(xs, ys, "o", color="tab:blue", ms=6, mfc="none", label="scored by the gate's read-off")
    chosen = report["removed_layers"]
    ax.plot([chosen[0]], [report["kl"]], "*", color="tab:red", ms=14,
            label=f"{'gate' if report.get('method') == 'clp-gate' else report.get('method')} choice: {report['block']}")
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if min(ys) > 0 and max(ys) / min(ys) > 20:  # the worst blocks cost orders of magnitude more than the best
        ax.set_yscale("log")
    L = report["model"]["fingerprint"]["num_layers"]
    ax.set_xlim(-0.5, L - k + 0.5)  # every possible start, also when only a few were scored
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(f"first layer of the removed block of {k}")
    ax.set_ylabel("calibration KL (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(plt, fig, path)


def plot_tuning(plt, runs, path, smooth=5):
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for (name, t), color in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        steps = range(1, len(t["losses"]) + 1)
        ax.plot(steps, t["losses"], color=color, alpha=0.25, lw=1)
        ax.plot(steps, running_mean(t["losses"], smooth), color=color, lw=2, label=tuning_label(t))
    ax.set_xlabel("step")
    ax.set_ylabel("training KL (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(plt, fig, path)


def save(plt, fig, path):
    try:
        return atomic.write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def make_plots(out, search_report=None, exhaustive=None, tuning=()):
    """Write every picture the given JSON files allow into `out`; returns their paths ([] without matplotlib)."""
    # the inputs are read first, so a bad file is an error with or without matplotlib
    rep = read_json(search_report, "report") if search_report else None
    exh = read_json(exhaustive, "exhaustive report") if exhaustive else None
    runs = [(str(p), read_json(Path(p) / "tuning.json" if Path(p).is_dir() else p, "tuning file")) for p in tuning]
    plt = pyplot()
    if plt is None:
        print(HOW)
        return []
    written = []
    if rep is not None and rep.get("trajectory"):
        written.append(plot_gate(plt, rep, Path(out) / "gate.png"))
    if rep is not None or exh is not None:
        main_rep = rep if rep is not None else exh
        written.append(plot_landscape(plt, main_rep, Path(out) / "landscape.png", exh if rep is not None else None))
    if runs:
        written.append(plot_tuning(plt, runs, Path(out) / "tuning.png"))
    return written


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="Draw the gate, the KL landscape and the tuning curves from the runs' JSON.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--search-report", default=None, help="report.json of search.py (or of baselines.py)")
    old_spelling(p, "--report", "--search-report")
    p.add_argument("--exhaustive", default=None, help="report.json of baselines.py --method exhaustive")
    p.add_argument("--tuning", nargs="+", default=[], help="tuning.json files (or tuned checkpoint directories)")
    p.add_argument("--out", type=Path, default=None, help="directory for the PNGs; None: beside the first JSON given")
    return p


@cli()
def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if not (a.search_report or a.exhaustive or a.tuning):
        p.error("give at least one of --search-report, --exhaustive, --tuning")
    out = a.out or Path(a.search_report or a.exhaustive or a.tuning[0]).parent
    for path in make_plots(out, a.search_report, a.exhaustive, a.tuning):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
