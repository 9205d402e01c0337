"""bench_compare.py's report: the stored cells read back into the table, the sentences on where CLP stands,
the check of whether the repair keeps the order of the sets, the whole-test-set rows and the picture.
Nothing here computes a cell: every lookup is read-only (a missing cell reads as None)."""
import math
import statistics

import gates
from benchmarks.compare_cells import Missing, choose, evaluate, repaired, variants
from gates import budget
from tasks import PRIMARY

def lookup(b, f, *args):
    """f(b, *args) from the stored cells only; None when a cell is missing."""
    b.readonly = True
    try:
        return f(b, *args)
    except Missing:
        return None
    finally:
        b.readonly = False


# score of a uniform guess per task: a ratio to a dense score at or below it measures noise, not retention
CHANCE = {"piqa": 0.5, "winogrande": 0.5, "boolq": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "openbookqa": 0.25,
          "hellaswag": 0.25}


def informative(b):
    """The tasks on which the dense model scores above chance (on the evaluated items)."""
    dense = lookup(b, evaluate, [])
    return [t for t in b.tasks if dense and dense["tasks"][t][PRIMARY[t]] > CHANCE.get(t, 0)]


def retention(b, row, tasks=None):
    """Mean over tasks of pruned / dense primary metric, and its standard error from the pruned scores' binomial errors."""
    dense = lookup(b, evaluate, [])
    tasks = b.tasks if tasks is None else tasks
    if row is None or dense is None or not tasks:
        return None, None
    ret, var = [], 0.0
    for t in tasks:
        p, d, n = row["tasks"][t][PRIMARY[t]], dense["tasks"][t][PRIMARY[t]], row["tasks"][t]["n"]
        ret.append(p / d)
        var += p * (1 - p) / max(n - 1, 1) / d ** 2
    return statistics.mean(ret), math.sqrt(var) / len(ret)


def results(b):
    """{(ratio, method): {"choice", "untuned", "tuned": {variant: row}, "best_tuned"}} for every stored cell."""
    out = {}
    for r in b.a.ratios:
        k = budget(b.L, prune_ratio=r)
        for method in b.a.methods:
            ch = lookup(b, choose, method, k)
            if ch is None:
                continue
            rem = ch["removed_layers"]
            tuned = {v: x for v in variants(rem) if (x := lookup(b, repaired, rem, v)) is not None}
            best = min(tuned.values(), key=lambda x: x["tune"]["heldout_kl"]["after"]) if tuned else None
            out[r, method] = {"choice": ch, "untuned": lookup(b, evaluate, rem), "tuned": tuned, "best_tuned": best}
    return out


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def row_cells(b, row, tasks):
    if row is None:
        return ["not run"] + [""] * (len(tasks) + 3)
    m, se = retention(b, row)
    m2, se2 = retention(b, row, informative(b))
    return [f"{row['ppl']:,.2f}", fmt(row.get("kl"), ".3f")] + \
           [f"{100 * row['tasks'][t][PRIMARY[t]]:.0f}" for t in tasks] + \
           [f"{100 * m:.1f} ± {100 * se:.1f}" if m is not None else "-", f"{100 * m2:.1f} ± {100 * se2:.1f}" if m2 is not None else "-"]


def summary_of(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def table(b, res):
    tasks = b.tasks
    head = ("| ratio | method | removed layers | calib. KL | search s | repair | ppl | KL | "
            + " | ".join(tasks) + " | mean retention % | retention % above chance |")
    lines = [head, "|---|---|---|---:|---:|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    dense = lookup(b, evaluate, [])
    if dense:
        lines.append(f"| 0 | dense | - | 0 | - | - | {dense['ppl']:,.2f} | 0 | "
                     + " | ".join(f"{100 * dense['tasks'][t][PRIMARY[t]]:.0f}" for t in tasks) + " | 100 | 100 |")
    for (r, method), x in res.items():
        ch = x["choice"]
        first = [f"{r:.0%}", method, gates.span(ch["removed_layers"]), f"{ch['kl']:.3f}", f"{ch['seconds']:,.0f}"]
        lines.append("| " + " | ".join(first + ["none"] + row_cells(b, x["untuned"], tasks)) + " |")
        for v, t in x["tuned"].items():
            what = "endpoints" if v == "endpoints" else f"LoRA r{t['tune']['rank']} all"
            rep = f"{what}, {t['tune']['trainable'] / 1e6:.1f}M, lr {t['lr']:g}"
            lines.append("| " + " | ".join(["", "", "", "", "", rep] + row_cells(b, t, tasks)) + " |")
        if method == [m for (rr, m) in res if rr == r][-1]:
            lines += random_summary(b, res, r, len(tasks))
    return lines


def random_summary(b, res, r, n_tasks):
    """Mean ± spread (sample standard deviation) of the random seeds' rows at ratio r, untuned and repaired."""
    out = []
    for stage, label in (("untuned", "none"), ("best_tuned", "best repair")):
        rows = [x[stage] for (rr, m), x in res.items() if rr == r and m.startswith("random-") and x[stage] is not None]
        if len(rows) < 2:
            continue
        p, sp = summary_of([x["ppl"] for x in rows])
        q, sq = summary_of([retention(b, x)[0] for x in rows])
        cells = [f"{r:.0%}", f"random, mean ± sd of {len(rows)} seeds", "", "", "", label, f"{p:,.2f} ± {sp:,.2f}", ""]
        q2, sq2 = summary_of([retention(b, x, informative(b))[0] for x in rows])
        cells += [""] * n_tasks + ["-" if q is None else f"{100 * q:.1f} ± {100 * sq:.1f}",
                                   "-" if q2 is None else f"{100 * q2:.1f} ± {100 * sq2:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


# CLP's own rows: the gate with one and two segments and the exact optima of its objective
OURS = ("clp-gate", "exhaustive", "clp-gate-s2", "exhaustive-s2")


def margins(b, res):
    """One sentence per ratio and stage: CLP against the best other method on ppl and on mean retention."""
    out = []
    for r in b.a.ratios:
        for stage in ("untuned", "best_tuned"):
            val = {}
            for m in b.a.methods:
                row = res.get((r, m), {}).get(stage)
                if row is not None:
                    val[m] = (row["ppl"], retention(b, row, informative(b))[0])
            rnd = [val.pop(m) for m in list(val) if m.startswith("random-")]
            if len(rnd) >= 2:  # a mean of one seed is that seed's block, not "random"
                val["random (mean)"] = (statistics.mean(v[0] for v in rnd), summary_of([v[1] for v in rnd])[0])
            others = {m: v for m, v in val.items() if m not in OURS}
            if "clp-gate" not in val or not others:
                continue
            (p, q), name = val["clp-gate"], "untuned" if stage == "untuned" else "tuned (each method's repair with the lower held-out KL)"
            bp = min(others, key=lambda m: others[m][0])
            rel, diff = p / others[bp][0] - 1, None
            txt = (f"- {r:.0%}, {name}: CLP ppl {p:,.2f}, best other ({bp}) {others[bp][0]:,.2f}: "
                   + ("the same" if abs(rel) < 5e-4 else f"CLP {100 * abs(rel):.1f}% {'higher (worse)' if rel > 0 else 'lower (better)'}"))
            if q is not None and any(v[1] is not None for v in others.values()):
                br = max((m for m in others if others[m][1] is not None), key=lambda m: others[m][1])
                diff = 100 * (q - others[br][1])
                txt += (f"; mean retention {100 * q:.1f}%, best other ({br}) {100 * others[br][1]:.1f}%: "
                        + ("the same" if abs(diff) < 0.05 else f"CLP {abs(diff):.1f} points {'higher' if diff > 0 else 'lower'}"))
            out.append(txt + ".")
            if "clp-gate-s2" in val:
                (p2, q2), c1, c2 = val["clp-gate-s2"], res[r, "clp-gate"]["choice"], res[r, "clp-gate-s2"]["choice"]
                txt = (f"  Two segments: {gates.span(c2['removed_layers'])} against {gates.span(c1['removed_layers'])}, "
                       f"calib. KL {c2['kl']:.3f} vs {c1['kl']:.3f}, ppl {p2:,.2f} vs {p:,.2f}")
                if q is not None and q2 is not None:
                    txt += f", retention {100 * q2:.1f}% vs {100 * q:.1f}%"
                out.append(txt + ".")
    return out


def speed_lines(b, s):
    if s is None:
        return ["(not measured yet)"]
    d = s[str(b.L)]
    lines = ["| ratio | layers | prefill tok/s | decode tok/s | prefill speedup (range over rounds) | "
             "decode speedup (range over rounds) | ideal L/(L-k) |", "|---|---:|---:|---:|---:|---:|---:|"]

    def ratio(kind, x):  # ratio of the medians, and the range of the ratios of the same round
        per_round = [a / c for a, c in zip(d[f"{kind}_s"]["runs"], x[f"{kind}_s"]["runs"])]
        return f"{d[f'{kind}_s']['median'] / x[f'{kind}_s']['median']:.2f} ({min(per_round):.2f}-{max(per_round):.2f})"
    for r in [0.0, *b.a.ratios]:
        n = b.L - budget(b.L, prune_ratio=r) if r else b.L
        x = s[str(n)]
        lines.append(f"| {r:.0%} | {n} | {x['prefill_tok_s']:,.0f} | {x['decode_tok_s']:,.1f} | {ratio('prefill', x)} | "
                     f"{ratio('decode', x)} | {b.L / n:.2f} |")
    return lines


def ranks(xs):
    """Ranks 1..n of xs, ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out, i = [0.0] * len(xs), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in order[i:j + 1]:
            out[t] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs, ys):
    """Spearman's rank correlation: Pearson's on the ranks."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return sxy / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def repair_ranking(b, res):
    """Does the order of the removed sets by calibration KL (what every method chooses on) survive the repair?
    Per ratio, over every distinct set with an endpoint repair: Spearman's rho of calib. KL against the repaired
    held-out KL, and of the repaired held-out KL against the repaired test ppl (subset)."""
    lines = []
    for r in b.a.ratios:
        sets = {}
        for (rr, m), x in res.items():
            t = x["tuned"].get("endpoints")
            if rr == r and t is not None:
                sets[gates.span(x["choice"]["removed_layers"])] = (x["choice"]["kl"], t["tune"]["heldout_kl"]["after"], t["ppl"])
        if len(sets) < 3:
            continue
        calib, held, ppl = zip(*sets.values())
        first = min(sets, key=lambda s: sets[s][0])
        clp = gates.span(res[r, "clp-gate"]["choice"]["removed_layers"]) if (r, "clp-gate") in res else None
        place = lambda s, i: "-" if s not in sets else 1 + sum(v[i] < sets[s][i] for v in sets.values())  # noqa: E731
        lines.append(f"| {r:.0%} | {len(sets)} | {spearman(calib, held):.2f} | {spearman(held, ppl):.2f} | {first} | "
                     f"{place(first, 1)} / {place(first, 2)} | {clp or '-'} | {place(clp, 1)} / {place(clp, 2)} |")
    if not lines:
        return []
    return ["Does the repair keep the order? Over the distinct removed sets of a ratio that have an endpoint repair: "
            "Spearman's rho of the calibration KL (before) against the repaired held-out KL (8 windows of WikiText-2 valid), "
            f"and of that against the repaired ppl (first {b.a.ppl_windows} test windows); the set with the lowest calibration "
            "KL, and one-block CLP's set, with their places among the sets after the repair (1 = best), by held-out KL / by ppl.", "",
            "| ratio | sets | rho(calib. KL, repaired held-out KL) | rho(repaired held-out KL, repaired ppl) | "
            "lowest calib. KL | its place | CLP | its place |", "|---|---:|---:|---:|---|---:|---|---:|", *lines, ""]


def whole_test_set(b, res):
    """The rows measured again on every WikiText-2 test window (--full-ppl), beside their subset figure; methods
    that chose the same layers share a row."""
    rows = {}
    for (r, method), x in res.items():
        rem = x["choice"]["removed_layers"]
        for tag, sub in [(None, x["untuned"])] + [(f"{v}@{t['lr']:g}", t) for v, t in x["tuned"].items()]:
            f = lookup(b, evaluate, rem, tag, True)
            if f is not None and sub is not None:
                rows.setdefault((r, gates.span(rem), tag), ([], sub, f))[0].append(method)
    lines = []
    for (r, span, tag), (methods, sub, f) in rows.items():
        what = "none" if tag is None else f"{sub['variant']}, lr {sub['lr']:g}"
        check = "" if tag is None else f"{sub['tune']['heldout_kl']['after']:.4f}"
        if "retuned_heldout_kl" in f:
            check += f" / {f['retuned_heldout_kl']:.4f}"
        lines.append(f"| {r:.0%} | {' = '.join(methods)} | {span} | {what} | {sub['ppl']:,.2f} | {f['ppl']:,.2f} | {check} |")
    if not lines:
        return []
    dense = lookup(b, evaluate, [], None, True)
    n = getattr(b, "ppl_total", "?")
    return [f"Whole test set (all {n} windows of {b.a.ppl_seqlen} tokens, perplexity only; `--full-ppl` with the same "
            "command and the rows' --methods, --ratios and --stages). A repair's checkpoint is deleted once evaluated, so "
            "it was tuned again with the same seed and data; *held-out KL*: the stored run's, then the new run's.", "",
            "| ratio | method | removed layers | repair | ppl, first " f"{b.a.ppl_windows} windows | ppl, all {n} windows | held-out KL |",
            "|---|---|---|---|---:|---:|---:|",
            *([f"| 0 | dense | - | - | {lookup(b, evaluate, [])['ppl']:,.2f} | {dense['ppl']:,.2f} | |"] if dense else []),
            *lines, ""]


def plot(b, res, path):
    """The headline table as a picture: per method family its best repaired member (family_best, which member it is
    may change with the ratio), perplexity on the test subset and mean retention above chance against the ratio;
    CLP's two columns drawn thick and bright."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("no picture: matplotlib is missing (pip install matplotlib)")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    others = iter(["#8c6d31", "#7b7b7b", "#9467bd", "#17becf", "#bcbd22"])
    for i, (fam, members) in enumerate(families(b) or [(m, [m]) for m in b.a.methods[:1]]):
        pts = [(r, c) for r in b.a.ratios if (c := family_best(b, res, r, members)) is not None]
        if not pts:
            continue
        ours = fam in (FAMILIES[0][0], FAMILIES[1][0])
        one = fam == FAMILIES[0][0]  # drawn over two segments, thinner: where both chose the same set both show
        style = dict(color="#d62728" if one else "#1f77b4" if ours else next(others), lw=2.5 if one else 5 if ours else 1.3,
                     ms=7 if one else 10 if ours else 5, marker="o", zorder=4 if one else 3 if ours else 2, label=fam)
        xs = [r for r, _ in pts]
        ax1.plot(xs, [c[1] for _, c in pts], **style)
        ax2.plot(xs, [100 * c[3] if c[3] is not None else float("nan") for _, c in pts], **style)
    ax1.set(yscale="log", xlabel="pruning ratio", ylabel=f"WikiText-2 ppl, first {b.a.ppl_windows} test windows",
            title="repaired perplexity (lower is better)")
    ax2.set(xlabel="pruning ratio", ylabel="mean zero-shot retention above chance, %",
            title="repaired retention (higher is better; s.e. about 9 points)")
    for ax in (ax1, ax2):
        ax.set_xticks(b.a.ratios, [f"{r:.0%}" for r in b.a.ratios])
        ax.grid(alpha=0.3)
    lo, hi = ax1.get_ylim()
    ticks = [t for t in (1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 70, 100, 150, 200, 300, 500, 700, 1000) if lo <= t <= hi]
    if len(ticks) >= 2:
        ax1.set_yticks(ticks, [str(t) for t in ticks])
        ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"Best of each method family after the same repair ({b.a.ckpt}, {b.L} layers)", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    print(f"picture: {path}")


# ---------------------------------------------------------------- the headline table (README's copy)

# the columns of the headline table: one per method family, its members (random: the mean of its seeds)
FAMILIES = [("CLP, one block", ["clp-gate"]), ("CLP, two segments", ["clp-gate-s2"]),
            ("Block Influence / angular", ["block-influence", "angular"]), ("SLEB", ["sleb"]),
            ("Shortened-LLaMA (PPL / Taylor)", ["shortened-ppl", "shortened-taylor"]), ("tail / random", ["tail", "random"])]
SHORT = {"block-influence": "BI", "angular": "angular", "shortened-ppl": "PPL", "shortened-taylor": "Taylor", "tail": "tail"}


def family_best(b, res, r, members):
    """The family's member with the lowest repaired subset ppl at ratio r (each member's repair: the one with the
    lower held-out KL, as in the table): (name, subset ppl, whole-test-set ppl or None, retention above chance)."""
    cands = []
    for m in members:
        if m == "random":
            rows = [x["best_tuned"] for (rr, mm), x in res.items() if rr == r and mm.startswith("random-") and x["best_tuned"]]
            if len(rows) >= 2:  # one seed is that seed's block, not "random"
                cands.append((f"random, mean of {len(rows)}", statistics.mean(x["ppl"] for x in rows), None,
                              summary_of([retention(b, x, informative(b))[0] for x in rows])[0]))
            continue
        x = res.get((r, m))
        t = x and x["best_tuned"]
        if t:
            full = lookup(b, evaluate, x["choice"]["removed_layers"], f"{t['variant']}@{t['lr']:g}", True)
            cands.append((m, t["ppl"], full and full["ppl"], retention(b, t, informative(b))[0]))
    return min(cands, key=lambda c: c[1]) if cands else None


def families(b):
    """The families with a member among --methods (random: at least two seeds)."""
    asked = set(b.a.methods) | ({"random"} if sum(m.startswith("random-") for m in b.a.methods) >= 2 else set())
    return [(f, members) for f, members in FAMILIES if asked & set(members)]


def headline(b, res):
    """One row per ratio, one column per method family: the repaired perplexity (on the whole test set where it was
    measured, else the subset, marked) and mean zero-shot retention of the family's best member, and CLP's place."""
    rows, fams = [], families(b)
    if not fams or fams[0][0] != FAMILIES[0][0]:
        return []
    for r in b.a.ratios:
        best = [family_best(b, res, r, members) for _, members in fams]
        if best[0] is None:
            continue
        cells = []
        for (_, members), c in zip(fams, best):
            if c is None:
                cells.append("not run")
                continue
            name, sub, full, ret = c
            who = f"{SHORT.get(name, name)}: " if len(members) > 1 else ""
            ppl = f"**{full:.1f}** ({sub:.1f}†)" if full is not None else f"{sub:.1f}†"
            cells.append(f"{who}{ppl} · {'-' if ret is None else f'{100 * ret:.0f}%'}")
        subs = [c[1] for c in best if c is not None]
        place = lambda i: "-" if best[i] is None else f"{1 + sum(s < best[i][1] for s in subs)}"  # noqa: E731
        two = f" / {place(1)}" if len(fams) > 1 and fams[1][0] == FAMILIES[1][0] else ""
        rows.append(f"| {r:.0%} ({budget(b.L, prune_ratio=r)} of {b.L}) | " + " | ".join(cells) + f" | {place(0)}{two} of {len(subs)} |")
    if not rows:
        return []
    return ["At a glance: the repaired models, the best member of each family of methods (the member with the lowest "
            f"repaired perplexity on the first {b.a.ppl_windows} test windows; each method's repair is the one with the "
            "lower held-out KL, as in the table below). Cell: WikiText-2 test perplexity · mean zero-shot retention "
            f"above chance (one standard error about ±9 points). **Bold**: the whole test set ({getattr(b, 'ppl_total', '?')} "
            f"windows), where it was measured; †: the first {b.a.ppl_windows} test windows only. *Place*: rank of one-block "
            f"CLP / two-segment CLP among the families by the {b.a.ppl_windows}-window perplexity (1 = lowest; ties share "
            "the better place). Random: the mean of its seeds.", "",
            "| ratio (layers removed) | " + " | ".join(f for f, _ in fams) + " | CLP's place (one block / two segments) |",
            "|---|" + "---|" * len(fams) + "---|", *rows, ""]
