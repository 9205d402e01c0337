"""Resumable runs: what an interrupted gate search, GPTQ run or exhaustive scoring keeps, and how it continues.

- Gate search (search.py --save-every N, --resume): every N steps OUT/search_state.safetensors holds each start's
  centres, the Adam state, the step, the RNG state, the surviving starts and the step of the last halving,
  the trajectory so far, and the read-off's scored blocks. Resuming restores all of it, so the steps that
  follow see the same numbers: same block, trajectory and report (wall times aside).
- GPTQ (quantize.py): each finished layer's codes, scales, zero points and report rows go to
  OUT.partial/layer-NNNNN.safetensors. A rerun with the same settings reloads them, sets those layers to their
  dequantized weights (what the uninterrupted run held at that point) and quantizes from the first layer not
  written. The checkpoint itself appears only when every layer is done; the work directory is then removed.
- Exhaustive and the other baselines (baselines.py): finished block scores in OUT/scores.json; the
  two-segment enumeration of benchmarks/bench_gate.py keeps its finished placements the same way.
Each file records the settings it was made with; a mismatch is an error, never a silent mix of two runs.
Every write is atomic (a temporary file, then a rename).
"""
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from machinery import atomic
from machinery.atomic import write_json
from machinery.errors import UserError


def check_same(saved, settings, what, path):
    """A clear error when a saved run was made with other settings than this one."""
    diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if diff:
        k = diff[0]
        raise UserError(f"{path} was made by a {what} with {k}={saved.get(k)!r}, this one has {settings.get(k)!r}: "
                         f"rerun with the same settings, or remove it to start over")


# ---------------------------------------------------------------- gate search

def encode_trajectory(trajectory):
    """JSON keeps only string keys: the per-start dicts {start: value} become [[start, value], ...]."""
    return [dict(t, kl=list(t["kl"].items()), mu=list(t["mu"].items())) for t in trajectory]


def decode_trajectory(rows):
    return [dict(t, kl={int(r): v for r, v in t["kl"]}, mu={int(r): v for r, v in t["mu"]}) for t in rows]


class Off:
    """The resume state of a run that keeps nothing (the default): each method does what a fresh run does and
    saves nothing, so the loops of search, baselines and quantize read the same with and without one."""
    scores, seconds = {}, 0.0

    def restore(self, gates, opt):  # GateState: (next step, active starts, step of the last halving, trajectory)
        return 0, list(range(len(gates))), 0, []

    def after_step(self, *args):
        pass

    def score(self, key, compute):  # GateState.score and Scores.get
        return compute()

    get = score

    def put(self, key, value, seconds):  # Scores
        pass

    def has(self, i):  # LayerStore
        return False

    def save(self, i, results, rows):
        pass

    def remove(self):
        pass


OFF = Off()


class GateState:
    """Saves and restores train_gates' loop state; `every` steps (0: never), into `path` (safetensors: the
    tensors, plus the loop's counters, trajectory and scored blocks as JSON metadata; nothing is unpickled)."""

    def __init__(self, path, every, settings, resume=False):
        self.path, self.every, self.settings = Path(path), every, settings
        self.saved, self.tensors, self.scored = None, {}, {}
        if resume:
            if not self.path.is_file():
                raise FileNotFoundError(f"--resume: no saved search state {self.path}")
            with safe_open(self.path, "pt") as f:
                self.saved = json.loads(f.metadata()["state"])
                self.tensors = {k: f.get_tensor(k) for k in f.keys()}
            check_same(self.saved["settings"], settings, "search", self.path)
            self.scored = {tuple(tuple(b) for b in blocks): kl for blocks, kl in self.saved["scored"]}
            print(f"resuming the gate search from step {self.saved['step']} ({self.path})")

    def restore(self, gates, opt):
        """(next step, active starts, step of the last halving, trajectory) from the saved state, or a fresh start."""
        if self.saved is None:
            return 0, list(range(len(gates))), 0, []
        s, t = self.saved, self.tensors
        with torch.no_grad():
            for r, g in enumerate(gates):
                g.mu.copy_(t[f"mu.{r}"])
        # the optimizer is rebuilt with the same settings: only its per-parameter moments are restored
        state = {int(k.split(".")[1]): {} for k in t if k.startswith("adam.")}
        for k, v in t.items():
            if k.startswith("adam."):
                state[int(k.split(".")[1])][k.split(".")[2]] = v
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        torch.set_rng_state(t["rng"])
        return s["step"], s["active"], s["since"], decode_trajectory(s["trajectory"])

    def after_step(self, step, steps, gates, opt, active, since, trajectory):
        """Save after step `step` (0-based) every `every` steps and after the last one."""
        if self.every and ((step + 1) % self.every == 0 or step + 1 == steps):
            self.tensors = {f"mu.{r}": g.mu.detach().clone() for r, g in enumerate(gates)} | {"rng": torch.get_rng_state()}
            for i, st in opt.state_dict()["state"].items():
                self.tensors |= {f"adam.{i}.{k}": v.detach().clone() for k, v in st.items()}
            self.saved = {"settings": self.settings, "step": step + 1, "active": list(active), "since": since,
                          "trajectory": encode_trajectory(trajectory)}
            self.write()

    def write(self):
        meta = dict(self.saved, scored=[[list(map(list, b)), kl] for b, kl in self.scored.items()])
        atomic.write_file(self.path, lambda tmp: save_file(self.tensors, tmp, metadata={"state": json.dumps(meta)}))

    def score(self, blocks, compute):
        """The read-off's exact KL of `blocks`, from the saved state when it was already scored."""
        if blocks not in self.scored:
            self.scored[blocks] = compute()
            if self.every and self.saved is not None:
                self.write()
        return self.scored[blocks]


# ---------------------------------------------------------------- GPTQ, layer by layer

def gptq_work_dir(out):
    return Path(out).with_name(f"{Path(out).name}.partial")


class LayerStore:
    """Finished GPTQ layers in OUT.partial: one safetensors file per layer plus the settings they were made with."""

    def __init__(self, work, settings):
        self.work, self.settings = Path(work), settings
        f = self.work / "settings.json"
        if f.is_file():
            check_same(json.loads(f.read_text()), settings, "GPTQ run", self.work)
            done = self.done()
            if done:
                print(f"resuming GPTQ from {self.work}: layers 0..{done[-1]} already quantized")

    def file(self, i):
        return self.work / f"layer-{i:05d}.safetensors"

    def done(self):
        return sorted(int(f.stem.split("-")[1]) for f in self.work.glob("layer-*.safetensors"))

    def has(self, i):
        return self.file(i).is_file()

    def save(self, i, results, rows):
        """results {linear name: Quantized}, rows: that layer's report rows."""
        if not (self.work / "settings.json").is_file():  # made with the first finished layer, not before
            write_json(self.work / "settings.json", self.settings)
        tensors = {f"{name}.{k}": getattr(res, k).contiguous() for name, res in results.items()
                   for k in ("codes", "scales", "zeros", "g_idx")}
        atomic.write_file(self.file(i), lambda tmp: save_file(tensors, tmp, metadata={"rows": json.dumps(rows)}))

    def load(self, i, make):
        """({linear name: make(codes, scales, zeros, g_idx)}, rows) of a finished layer."""
        with safe_open(self.file(i), "pt") as f:
            rows = json.loads(f.metadata()["rows"])
            names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
            return {n: make(*(f.get_tensor(f"{n}.{k}") for k in ("codes", "scales", "zeros", "g_idx")))
                    for n in names}, rows

    def remove(self):
        shutil.rmtree(self.work, ignore_errors=True)


# ---------------------------------------------------------------- baselines

class Scores:
    """Finished scores of a baseline in OUT/scores.json, keyed by block; reused when the settings match.
    `seconds` adds up the time spent computing them, over every run that contributed."""

    def __init__(self, path, settings):
        self.path, self.settings, self.scores, self.seconds = Path(path), settings, {}, 0.0
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            check_same(saved["settings"], settings, "baseline run", self.path)
            self.scores, self.seconds = saved["scores"], saved.get("seconds", 0.0)
            print(f"reusing {len(self.scores)} finished score(s) from {self.path}")

    def get(self, key, compute):
        if key not in self.scores:
            t0 = time.perf_counter()
            value = compute()
            self.put(key, value, time.perf_counter() - t0)
        return self.scores[key]

    def put(self, key, value, seconds):
        self.scores[key], self.seconds = value, self.seconds + seconds
        write_json(self.path, {"settings": self.settings, "scores": self.scores, "seconds": self.seconds})
