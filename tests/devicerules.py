"""CUDA's device rules on a CPU: every tensor carries a logical device (cpu, cuda:0, cuda:1) while its data stays in
CPU memory, and every aten op is checked the way CUDA kernels check their arguments.

    with CudaRules(devices=2) as rules:
        search.main(["--ckpt", tiny, "--devices", "cuda:0,cuda:1", ...])
    assert rules.violations == []

The logical device of a tensor is kept per storage (views, detach and Parameters share it) and shown by
`tensor.device`, so code that asks `x.device` or moves `x.to(layer.device)` runs as it would on a GPU. Under the
mode:
- factories (`torch.zeros(..., device="cuda:1")`) and copies (`.to`, `.cuda`, `.cpu`, `copy_`) may cross devices;
- every other op must have all its tensor arguments on one device, except 0-dim CPU tensors (scalars) and CPU
  index tensors of indexing ops, which CUDA accepts; a CPU generator for a CUDA random op is an error too;
- the host synchronisations a CUDA run would make are counted: `.item()`, `float()`, `.tolist()`, `nonzero`
  (and what calls it: boolean masks, one-argument `torch.where`), and blocking copies from a GPU to the CPU.
torch.cuda's queries (is_available, device_count, mem_get_info, synchronize, peak statistics) answer as a machine
with `devices` GPUs of `memory` bytes would. The arithmetic is the CPU's, so results are the CPU's to the bit.
"""
import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
REAL_DEVICE = torch._C.TensorBase.device  # the attribute torch.Tensor.device is patched over
# ops that may move data between devices (their output device is their own argument's or the requested one)
CROSSING = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default,
            aten.set_.source_Tensor, aten.set_.source_Storage, aten.set_.source_Storage_storage_offset}
# ops whose CPU index tensors CUDA accepts (the op copies them to the device)
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
SYNCING = {aten._local_scalar_dense.default: "item", aten.nonzero.default: "nonzero",
           aten.is_nonzero.default: "item", aten.equal.default: "item"}
INDEX_DTYPES = (torch.long, torch.int, torch.bool, torch.uint8)


def key(t):
    """What identifies a tensor's memory: its storage's address (views, detach and Parameters share it)."""
    return t.untyped_storage().data_ptr() if t.numel() else None


class CudaRules(TorchDispatchMode):
    def __init__(self, devices=2, memory=80 * 2**30):
        super().__init__()
        self.n, self.memory = devices, memory
        self.violations, self.syncs, self.where = [], {}, {}

    def device_of(self, t):
        real = REAL_DEVICE.__get__(t)
        return self.where.get(key(t), real) if real.type == "cpu" else real

    def logical(self, device):
        d = torch.device(device)
        if d.type != "cuda":
            return d
        if (d.index or 0) >= self.n:
            raise RuntimeError(f"CUDA error: invalid device ordinal ({d} of {self.n} devices)")
        return torch.device("cuda", d.index or 0)

    def put(self, t, device):
        """Record `device` as the logical device of a result (a CPU tensor in fact)."""
        if isinstance(t, torch.Tensor) and REAL_DEVICE.__get__(t).type == "cpu" and t.numel():
            self.where[key(t)] = device
        return t

    def sync(self, what):
        self.syncs[what] = self.syncs.get(what, 0) + 1

    # ------------------------------------------------------------ the rules
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is aten._fused_sdp_choice.default:  # SDPA picks its kernel by device: the math one runs anywhere
            return 0
        if func in (aten._pin_memory.default,):
            return args[0]
        if func is aten.is_pinned.default:
            return False
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        devices = [self.device_of(t) for t in tensors]
        target = kwargs.get("device")
        if func in CROSSING:
            src = devices[-1] if func is aten.copy_.default else devices[0] if devices else None
            out = self.logical(target) if target is not None else devices[0] if devices else torch.device("cpu")
            if src is not None and src.type == "cuda" and out.type == "cpu" and not kwargs.get("non_blocking"):
                self.sync("copy to cpu")
        else:
            if func in INDEXING and tensors:
                main = devices[0]
                if any(d != main and (d.type != "cpu" or t.dtype not in INDEX_DTYPES)
                       for t, d in zip(tensors[1:], devices[1:])):
                    self.violations.append(f"{func}: arguments on {sorted(set(map(str, devices)))}")
                considered = {main}
            else:
                considered = {d for t, d in zip(tensors, devices) if not (t.dim() == 0 and d.type == "cpu")}
                if len(considered) > 1:
                    self.violations.append(f"{func}: arguments on {sorted(map(str, considered))}")
            if considered:
                out = sorted(considered, key=str)[-1]
            elif target is not None:
                out = self.logical(target)
            else:
                out = devices[0] if devices else torch.device("cpu")
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type != out.type:
                self.violations.append(f"{func}: a {gen.device.type} generator for a tensor on {out}")
            if func in SYNCING and any(d.type == "cuda" for d in devices):
                self.sync(SYNCING[func])
                out = torch.device("cpu")
        if target is not None:
            kwargs["device"] = torch.device("cpu")
        result = func(*args, **kwargs)
        return tree_map(lambda t: self.put(t, out), result)

    # ------------------------------------------------------------ a machine with GPUs
    def __enter__(self):
        self.stack = contextlib.ExitStack()
        answers = {
            "is_available": lambda: True, "device_count": lambda: self.n, "current_device": lambda: 0,
            "synchronize": lambda device=None: self.sync("synchronize"),
            "mem_get_info": lambda device=None: (self.memory, self.memory),
            "max_memory_allocated": lambda device=None: 0, "memory_allocated": lambda device=None: 0,
            "reset_peak_memory_stats": lambda device=None: None, "empty_cache": lambda: None,
            "get_device_name": lambda device=None: "logical GPU (tests/devicerules.py)",
            "manual_seed_all": lambda seed: None, "manual_seed": lambda seed: None,
            "_lazy_init": lambda: None, "is_initialized": lambda: True,
        }
        for name, fn in answers.items():
            self.stack.enter_context(mock.patch.object(torch.cuda, name, fn))
        self.stack.enter_context(mock.patch.object(torch.Tensor, "device", property(self.device_of)))
        self.stack.enter_context(mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: self.device_of(t).type == "cuda")))
        self.stack.enter_context(mock.patch.object(torch.Tensor, "pin_memory", lambda t, *a, **k: t))
        super().__enter__()
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.stack.close()

    # ------------------------------------------------------------ for tests and messages
    def on(self, t, device):
        """A copy of CPU tensor `t` on a logical device (for planted cases)."""
        return t.to(device)

    def report(self, n=5):
        seen = list(dict.fromkeys(self.violations))
        return "\n".join(seen[:n]) + (f"\n... {len(seen) - n} more" if len(seen) > n else "")
