"""A memory plan before loading anything: bytes per device and layer passes, from config.json alone.

    python search.py --ckpt llama2-70b --prune-ratio 0.3 --dry-run --devices cuda:0,cuda:1 --device-memory 80GB

Every CLI that computes (search, baselines, tune, quantize, eval) calls `add_args` and `check`, handing over a
function from its own flags to memory.py's plan of its task (the planner knows no CLI's flags): with --dry-run
it prints the plan (memory.py's formulas) and exits 0 when it fits; a run that cannot fit is refused (exit 2,
one line) before any weight is read, naming a flag that would make it fit (--offload, more --devices, fewer
--nsamples). Device memory: free GPU memory (torch.cuda.mem_get_info), available RAM for the CPU, or
--device-memory to plan for another machine.
"""
import argparse
import os
import re
import sys

from machinery.devices import names as devices_named
from machinery.errors import UserError
from machinery.memory import COLUMNS, DTYPE_BYTES, GiB, plan_search


# ---------------------------------------------------------------- devices and their memory

def parse_bytes(text):
    """'80GB', '80GiB', '24g', '512MB' -> bytes (GB and GiB both mean 2^30: what GPU makers call 80 GB is 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 80GB or 512MB")
    return float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")


def available_ram():
    """MemAvailable from /proc/meminfo (what a new allocation can use without swapping); total RAM elsewhere."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def capacity_fn(device_memory, devices):
    """Bytes a device can use: --device-memory for each device (the host then unchecked unless it is the only
    device), else free GPU memory (torch.cuda.mem_get_info) or available RAM."""
    import torch

    def capacity(d):
        if device_memory is not None:
            return device_memory if d != "cpu" or devices == ["cpu"] else None
        if d == "cpu":
            return available_ram()
        if not torch.cuda.is_available():
            raise UserError(f"{d}: no CUDA device here; plan for another machine with --device-memory (e.g. 80GB)")
        return torch.cuda.mem_get_info(torch.device(d))[0]
    return capacity


def config(ckpt):
    import load_weights
    path = load_weights.config_dir(ckpt)
    return load_weights.config_from_dict(load_weights.read_config_dict(path), str(path / "config.json")), path


def shipped_only(ckpt):
    """True when only the shipped architecture of `ckpt` is here: a real run then reports the missing weights."""
    import load_weights
    return not str(ckpt).startswith("random:") and load_weights.config_dir(ckpt).parent == load_weights.CONFIGS \
        and str(ckpt) != load_weights.DEFAULT


# ---------------------------------------------------------------- a CLI's flags -> Plan (through its planner)

def weight_bytes(dtype, devices):
    """b: the compute dtype's bytes; by default bf16 on a GPU, fp32 on the CPU."""
    if dtype is None or dtype not in DTYPE_BYTES:
        return 4 if devices == ["cpu"] else 2
    return DTYPE_BYTES[dtype]


def plan_for(task, planner, a, **override):
    """The Plan of `task` for a CLI's flags `a` (a dict, with `override` applied): the placement is read here,
    the task's memory from planner(a, cfg, path, placed), which each CLI supplies (its flags are its own).
    placed = (cfg, b, devices, capacity, offload), the first arguments of memory.py's plan_* functions."""
    a = {**a, **override}
    cfg, path = config(a["ckpt"])
    devices = devices_named(a.get("device"), a.get("devices"))
    dtype = a.get("dtype")  # the compute dtype in every tool (quantize.py's stored one is --save-dtype)
    placed = (cfg, weight_bytes(dtype, devices), devices, capacity_fn(a.get("device_memory"), devices),
              bool(a.get("offload")))
    p = planner(a, cfg, path, placed)
    p.bytes_per_weight = placed[1]
    return p


def search_plan(placed, prune_layers, prune_ratio, nsamples, seqlen, **settings):
    """memory.plan_search for a budget of prune_layers or prune_ratio. Memory does not depend on the budget, only
    the layer passes do, so a dry-run may leave it out: then k is 30% of the layers, and a note says so."""
    from gates import budget

    given = prune_layers is not None or prune_ratio is not None
    k = budget(placed[0].num_layers, prune_layers, prune_ratio if given else 0.3)
    p = plan_search(*placed, nsamples, seqlen, k, **settings)
    p.notes += [] if given else ["no budget given: layer passes counted for 30% of the layers"]
    return p


# ---------------------------------------------------------------- the CLI hook and the table

def add_args(p):
    """The plan's own flags; the placement flags it reads (--device, --devices, --dtype,
    --offload, --cache-on-cpu) are each CLI's, from devices.add_arguments."""
    g = p.add_argument_group("memory plan")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory plan from config.json alone and exit (0: it fits, 2: it does not)")
    g.add_argument("--device-memory", type=parse_bytes, default=None,
                   help="memory per device to plan for, e.g. 80GB; None: free GPU memory, or available RAM on CPU")


def check(args, task, planner):
    """Plan `task` from the parsed flags (planner: see plan_for) before anything is loaded: print it and exit 0
    under --dry-run; refuse a run that cannot fit (exit 2, one line naming a flag that fits). Then drop the plan's
    own flags."""
    a = vars(args)
    try:
        p = None if not a["dry_run"] and shipped_only(a["ckpt"]) else plan_for(task, planner, a)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if a["dry_run"]:
            raise UserError(f"plan: {str(e).splitlines()[0]}") from None
        p = None  # the run reports a bad checkpoint or setting itself, with its full message
    if a["dry_run"]:
        print_plan(p, a)
    if p is not None and not p.fits:
        raise UserError(refusal(task, p, a, planner))  # errors.cli: one line, exit status 2
    if a["dry_run"]:
        sys.exit(0)
    del args.dry_run, args.device_memory


def refusal(task, p, a, planner):
    """One line: which device overflows by how much, and the flags that would make the plan fit."""
    worst = max((r for r in p.rows if not r.fits), key=lambda r: r.peak / r.capacity)
    line = f"plan: {task} does not fit: {worst.device} needs {gib(worst.peak)} of {gib(worst.capacity)}"
    devices = devices_named(a.get("device"), a.get("devices"))
    per_device = capacity_fn(a.get("device_memory"), devices)(devices[0])
    # only the flags this CLI has (tune.py has no --offload, only search and baselines have --cache-on-cpu)
    streams = "offload" in a and not a["offload"] and len(devices) == 1  # the runtime streams to one device
    tries = [("--offload", {"offload": True})] if streams else []
    if a.get("cache_on_cpu") is False:  # the CLI has the flag and it is off
        tries += [("--cache-on-cpu", {"cache_on_cpu": True})]
        tries += [("--offload --cache-on-cpu", {"offload": True, "cache_on_cpu": True})] if streams else []
    if devices[0] != "cpu" and "devices" in a:
        tries += [(f"--devices {names}", {"devices": names, "device_memory": per_device})
                  for names in (",".join(f"cuda:{i}" for i in range(n)) for n in range(len(devices) + 1, 17))]
    if a.get("nsamples"):
        tries += [(f"--nsamples {n}", {"nsamples": n}) for n in (a["nsamples"] // 2 ** j for j in range(1, 12)) if n >= 1]
    if streams and a.get("nsamples"):  # weights and cache both too big: stream and shrink
        tries += [(f"--offload --nsamples {n}", {"offload": True, "nsamples": n})
                  for n in (a["nsamples"] // 2 ** j for j in range(1, 12)) if n >= 1]
    fixes = []
    for flag, override in tries:
        kind = flag.split()[0]
        if kind not in (f.split()[0] for f in fixes) and plan_for(task, planner, a, **override).fits:
            fixes.append(flag)
    return line + (f"; it fits with {' or '.join(fixes)}" if fixes else "; no single flag makes it fit (see --dry-run)")


def gib(n):
    return "-" if n is None else f"{n / GiB:,.1f} GiB"


def print_plan(p, a):
    """The table: one row per device, bytes at the peak phase per column, then the layer passes."""
    cfg, _ = config(a["ckpt"])
    print(f"plan: {p.task}, {a['ckpt']} ({cfg.num_layers} layers, C {cfg.hidden_size}, V {cfg.vocab_size:,}), "
          f"{'offload, ' if a.get('offload') else ''}{p.bytes_per_weight} bytes per weight")
    head = ["device", "capacity"] + [c.replace("_", " ") for c in COLUMNS] + ["runtime", "peak", "peak phase", "fits"]
    table = [[r.device, gib(r.capacity)] + [gib(r.parts[c]) for c in COLUMNS] +
             [gib(r.runtime), gib(r.peak), r.phase or "-", "yes" if r.fits else "NO"] for r in p.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    for line in [head] + table:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
    print(f"layer passes (one layer over one window): {p.forward:,} forward, {p.backward:,} backward")
    for note in p.notes:
        print(f"note: {note}")
