"""CUDA's device rules on a CPU: every tensor carries a logical device (cpu, cuda:0, cuda:1) while its data stays in
CPU memory, and every aten op is checked the way CUDA kernels check their arguments.

    with CudaRules(devices=2) as rules:
        search.main(["--ckpt", tiny, "--devices", "cuda:0,cuda:1", ...])
    assert rules.violations == []

The logical device of a tensor is kept per storage (views, detach and Parameters share it; a storage on a logical
GPU is kept alive while the rules are in force, so that no CPU tensor inherits its address) and shown by
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
FACTORIES = ("empty", "zeros", "ones", "full", "rand", "randn", "randint", "randperm", "arange", "eye", "linspace")


def key(t):
    """What identifies a tensor's memory: its storage's address (views, detach and Parameters share it)."""
    return t.untyped_storage().data_ptr() if t.numel() else None


class CudaRules(TorchDispatchMode):
    def __init__(self, devices=2, memory=80 * 2**30):
        super().__init__()
        self.n, self.memory = devices, memory
        self.violations, self.syncs, self.where, self.alive = [], {}, {}, {}
        self.backward_device = torch.device("cpu")
        self.anywhere = set()  # storages made by a factory inside an op (device = the real one): placed by first use
        self.from_python = 0  # > 0 while a torch factory called from Python runs: its CPU tensors are really there
        self.first = None  # where the first violation happened (a Python stack), for the failure message

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

    def put(self, t, device, anywhere=False):
        """Record `device` as the logical device of a result (a CPU tensor in fact); returns the result."""
        if isinstance(t, torch.Tensor) and REAL_DEVICE.__get__(t).type == "cpu" and t.numel():
            self.where[key(t)] = device
            (self.anywhere.add if anywhere else self.anywhere.discard)(key(t))
            if device.type != "cpu":  # keep the memory: a later CPU tensor at its address would look like it
                self.alive[key(t)] = t.untyped_storage()
        return t

    def sync(self, what):
        self.syncs[what] = self.syncs.get(what, 0) + 1

    def violation(self, text):
        if self.first is None:
            import traceback
            self.first = "".join(traceback.format_stack(limit=14)[:-2])
        self.violations.append(text)

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
        everything = [a for a in flat if isinstance(a, torch.Tensor)]
        # a tensor an op made with its input's real options (cpu), or an empty one (no storage to keep a device
        # by), takes the device of what it meets
        placed = [t for t in everything if t.numel() and key(t) not in self.anywhere]
        tensors = placed or everything
        wild = bool(everything) and not placed
        devices = [self.device_of(t) for t in tensors]
        target = kwargs.get("device")
        node = torch._C._current_autograd_node()
        if node is not None and target is not None and torch.device(target).type == "cpu":
            # autograd passes the tensors' real options (cpu): a dtype cast stays where its input is, a device move
            # goes back where its forward came from (moved() noted it), and a factory goes where backward runs
            if func is aten._to_copy.default:
                target = node.metadata.get("from_device")
            else:
                target = self.backward_device
            kwargs["device"] = target
        if func in CROSSING:
            src = devices[-1] if func is aten.copy_.default else devices[0] if devices else None
            out = self.logical(target) if target is not None else devices[0] if devices else torch.device("cpu")
            if src is not None and src.type == "cuda" and out.type == "cpu" and not kwargs.get("non_blocking"):
                self.sync("copy to cpu")
        else:
            if func.overloadpacket.__name__.startswith("_foreach_"):
                considered = self.foreach(func, args)
            elif func in INDEXING and tensors:
                main = devices[0]
                if any(d != main and (d.type != "cpu" or (t.dtype not in INDEX_DTYPES and t.dim() > 0))
                       for t, d in zip(tensors[1:], devices[1:])):
                    self.violation(f"{func}: arguments on {sorted(set(map(str, devices)))}")
                considered = {main}
            else:
                considered = {d for t, d in zip(tensors, devices) if not (t.dim() == 0 and d.type == "cpu")}
                if len(considered) > 1:
                    self.violation(f"{func}: arguments on {sorted(map(str, considered))}")
            if considered:
                out = sorted(considered, key=str)[-1]
            elif target is not None:
                out = self.logical(target)
            else:
                out = devices[0] if devices else torch.device("cpu")
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type != out.type:
                self.violation(f"{func}: a {gen.device.type} generator for a tensor on {out}")
            if func in SYNCING and any(d.type == "cuda" for d in devices):
                self.sync(SYNCING[func])
                out = torch.device("cpu")
        if node is not None and tensors:
            self.backward_device = out
        # a factory asked for the real device by name (what composite ops do with their input's options)
        wild = (wild and not (func in CROSSING and target is not None)) or (
            not everything and target is not None and torch.device(target).type == "cpu" and not self.from_python)
        if kwargs.get("device") is not None:
            kwargs["device"] = torch.device("cpu")
        elif "device" in kwargs:
            del kwargs["device"]
        result = func(*args, **kwargs)
        if func.overloadpacket.__name__.startswith("_foreach_") and isinstance(result, (list, tuple)):
            first = next(a for a in args if isinstance(a, (list, tuple)))
            return type(result)(self.put(r, self.device_of(t)) for r, t in zip(result, first))
        return tree_map(lambda t: self.put(t, out, wild), result)

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
        for name in FACTORIES:
            self.stack.enter_context(mock.patch.object(torch, name, self.asked(getattr(torch, name))))
        for name in ("tensor", "as_tensor"):  # they would build on the real device before any op is dispatched
            self.stack.enter_context(mock.patch.object(torch, name, self.built(getattr(torch, name))))
        for name in ("to", "cuda", "cpu"):
            self.stack.enter_context(mock.patch.object(torch.Tensor, name, self.moved(getattr(torch.Tensor, name))))
        super().__enter__()
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.stack.close()

    def foreach(self, func, args):
        """A _foreach_ op works on lists index by index (torch groups its lists by device): each position's tensors
        must share a device; the devices of the first list's tensors."""
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        for row in zip(*lists):
            here = {self.device_of(t) for t in row}
            if len(here) > 1:
                self.violation(f"{func}: arguments on {sorted(map(str, here))}")
        return {self.device_of(t) for t in lists[0]} if lists else set()

    def asked(self, make):
        """A torch factory called from Python: a CPU tensor it makes is on the CPU (not an op's own temporary)."""
        def factory(*args, **kwargs):
            self.from_python += 1
            try:
                return make(*args, **kwargs)
            finally:
                self.from_python -= 1
        return factory

    def built(self, make):
        """torch.tensor / torch.as_tensor: made on the CPU, then copied to the device asked for."""
        def build(data, *args, device=None, **kwargs):
            t = make(data, *args, **kwargs)
            return t if device is None else t.to(device)
        return build

    def moved(self, method):
        """Tensor.to / .cuda / .cpu that note on the result's backward node where the data came from."""
        def move(t, *args, **kwargs):
            out = method(t, *args, **kwargs)
            if out is t:  # the real devices agree (both are the CPU): copy if the logical ones do not
                asked = torch.device("cpu") if method.__name__ == "cpu" else \
                    torch._C._nn._parse_to(*args, **kwargs)[0] if method.__name__ == "to" else None
                if asked is not None and self.logical(asked) != self.device_of(t):
                    out = torch.Tensor.to(t, self.logical(asked), copy=True)
            fn = getattr(out, "grad_fn", None)
            if out is not t and fn is not None and fn.name().startswith("ToCopyBackward"):
                src = self.device_of(t)
                fn.metadata.setdefault("from_device", src)
                if src != self.device_of(out):  # a copy between devices of the same dtype is no op for autograd
                    out.register_hook(lambda g: self.put(g.clone(), src))  # here, so its gradient goes back
            return out
        return move

    # ------------------------------------------------------------ for tests and messages
    def report(self, n=5):
        seen = list(dict.fromkeys(self.violations))
        more = f"\n... {len(seen) - n} more" if len(seen) > n else ""
        return "\n".join(seen[:n]) + more + (f"\nthe first, at:\n{self.first}" if self.first else "")
