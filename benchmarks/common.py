"""Shared by the benchmark scripts: each one rewrites its own section of BENCHMARKS.md, keeps its finished cells
in one results file (load_cells / store_cell), and may hold a machine-wide lock during heavy steps."""
import contextlib
import fcntl
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data import find_data_dir  # noqa: E402
from eval import text_metrics, text_windows  # noqa: E402
from machinery import atomic  # noqa: E402
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery figure below comes from the command printed beside it. Sections are rewritten by the scripts in `benchmarks/`.\n"


def machine():
    """One line naming the machine, CPU threads and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only, {torch.get_num_threads()} threads"
    return f"{cpu}; {os.cpu_count()} cores; {dev}; Python {platform.python_version()}, torch {torch.__version__}"


def command():
    return "python " + shlex.join(sys.argv)


def update_section(name, body, path=None, keep_stamp=False):
    """Replace (or append) the section between <!-- BEGIN name --> and <!-- END name --> of `path` (BENCHMARKS.md)
    atomically; the lock keeps two scripts that finish at once from each writing back a file without the other's
    section. keep_stamp: a rewrite that measured nothing keeps the section's "_Measured <date> on: <machine>._" line."""
    path = Path(path) if path is not None else BENCHMARKS
    stamp = f"_Measured {time.strftime('%Y-%m-%d')} on: {machine()}._"
    pat = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    with atomic.locked(path):
        text = path.read_text() if path.exists() else HEADER
        old = pat.search(text)
        if keep_stamp and old and (m := re.search(r"^_Measured .*\._$", old[0], re.M)):
            stamp = m[0]
        block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n\n{stamp}\n<!-- END {name} -->"
        text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
        atomic.write_text(path, text)


def load_cells(path):
    """A results JSON of finished cells ({} when there is none yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def store_cell(path, store, key, value):
    """Add one finished cell to `store` and to the file: under the file's lock, the cells other processes wrote
    since it was read are merged in first, so two runs sharing a results file lose nothing."""
    with atomic.locked(path):
        store.update({k: v for k, v in load_cells(path).items() if k not in store})
        store[key] = value
        atomic.write_text(path, json.dumps(store, indent=2) + "\n")
    return value


@contextlib.contextmanager
def heavy(lock):
    """Hold the machine-wide lock for one heavy step, so that others' jobs can run between our rows."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class PPL:
    """WikiText-2 test perplexity on a fixed subset of windows, tokenized once."""

    def __init__(self, tok, windows, seqlen, data_dir):
        (self.key, (w, self.desc)), = text_windows(tok, ["wikitext2"], seqlen, data_dir, bos=False).items()
        self.desc = self.desc.replace(str(find_data_dir(data_dir)), "$CLP_DATA")  # no path of this machine
        self.total = w.shape[0]
        self.windows = w[:windows]

    def __call__(self, model):
        return text_metrics(model, self.windows, label="ppl")["ppl"]
