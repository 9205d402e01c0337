"""Where and in what precision the tools compute: the --device, --dtype, --devices and --offload flags.

Every CLI adds these flags with `add_arguments(parser)` and turns them into a list of torch devices and a
dtype with `from_flags(...)`. Defaults: CUDA when it is visible, else the CPU; bfloat16 on a GPU, float32 on
the CPU. The gate, the KL and GPTQ's Hessian stay in float32 whatever the weights' dtype (the callers cast).
"""
from pathlib import Path

import torch

from machinery.errors import UserError, check_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stored_dtype(config):
    """The dtype a checkpoint is stored in (config.json torch_dtype, or dtype in newer configs); fp32 if unsaid."""
    return DTYPES.get(config.get("torch_dtype") or config.get("dtype"), torch.float32)


def add_arguments(p, several=True, offload=True):
    """The device flags of one CLI: --device, --dtype (the compute dtype, in every tool), --devices, --offload."""
    p.add_argument("--device", default=None, help="device to compute on (cpu, cuda, cuda:1); None: cuda when visible, else cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="dtype of the weights and activations; None: bfloat16 on a GPU, float32 on the CPU")
    if several:
        p.add_argument("--devices", default=None,
                       help="several devices, e.g. cuda:0,cuda:1, or auto (every visible GPU): contiguous slices of layers "
                            "on each, balanced by memory")
    if offload:
        p.add_argument("--offload", action="store_true",
                       help="keep the weights in CPU memory and bring one layer at a time to the device")


def parse_device(name):
    """A torch.device for `name`, or a one-line error when this machine lacks it (errors.check_device)."""
    dev = check_device(name)
    if dev.type == "cuda":
        return torch.device("cuda", dev.index or 0)
    if dev.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return dev


def names(device=None, devices=None):
    """The device names the flags ask for: --devices (a comma list, or auto = every visible GPU), else --device,
    else cuda when visible, else cpu. Not checked against this machine: the memory plan may be for another."""
    if devices == "auto":
        if not torch.cuda.is_available():
            raise UserError("--devices auto: CUDA is not available on this machine; use --device cpu")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if devices is not None:
        listed = [d.strip() for d in devices.split(",") if d.strip()]
        if not listed:
            raise UserError(f"--devices {devices!r} names no device")
        return listed
    return [device or ("cuda" if torch.cuda.is_available() else "cpu")]


def from_flags(device=None, dtype=None, devices=None, offload=False):
    """(list of devices, dtype) from the flags; one device unless --devices names several."""
    if devices is not None and device is not None:
        raise UserError("give --device or --devices, not both")
    devs = [parse_device(d) for d in names(device, devices)]
    if offload and len(devs) > 1:
        raise UserError("--offload streams layers to one device: give one --device, not several --devices")
    if dtype is None:
        dtype = "bfloat16" if devs[0].type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return devs, DTYPES[dtype]


def describe(devs, dtype, offload=False):
    """'cuda:0,cuda:1 bfloat16' (+ ', weights streamed from CPU memory')."""
    text = ",".join(str(d) for d in devs) + " " + str(dtype).removeprefix("torch.")
    return text + (", weights streamed from CPU memory one layer at a time" if offload else "")


def reset_peak(device):
    """Restart the peak count of `device` (CUDA's allocator statistics, or the process's peak RSS on Linux)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: peak RSS (VmHWM) restarts from the current RSS


def peak_bytes(device):
    """(bytes, what was measured): CUDA peak allocation, or on CPU the process's peak resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024, "process peak RSS"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS since start"


def peak_memory(devs):
    """{device: peak bytes} over the devices of a run (peak_bytes of each; the CPU once, as the process's RSS)."""
    return {str(d) if d.type == "cuda" else "cpu (peak RSS)": peak_bytes(d)[0] for d in dict.fromkeys(devs)}
