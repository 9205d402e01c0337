"""Errors a user can cause end a CLI with one line naming the file or flag, and exit status 2.

    @cli(memory="--batch-size or --kl-chunk")
    def main(argv=None): ...

What counts as a user error: `UserError` (the project raises it for every bad input: a flag value,
config.json, a report, a task file...); a file that cannot be read or written (OSError); a corrupt
safetensors file; a loss or Hessian that is NaN or Inf (FloatingPointError); running out of memory, with the
flags that would help; a device this machine lacks. Everything else -- a TypeError, an IndexError, any
other ValueError -- is a bug and keeps its traceback, whichever file raised it.
"""
import functools
import json
import sys
from pathlib import Path

import torch

EXIT_USAGE = 2  # argparse's status for bad usage; ours for every user error
# messages torch gives when a device is asked for that this machine does not have
DEVICE_MESSAGES = ("Torch not compiled with CUDA", "no NVIDIA driver", "No CUDA GPUs", "invalid device ordinal",
                   "device type at start of device string", "Invalid device string")


class UserError(ValueError):
    """Bad input the user can fix; the message names the file or flag."""


def read_json(path, what="JSON file"):
    """The object in a JSON file; a missing file or bad JSON is a UserError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): not a {what}") from None


def parses(what):
    """Decorate a function that interprets a file given as its first argument: a TypeError, AttributeError,
    KeyError or IndexError inside it comes from the file's unexpected structure, and is reported naming the file."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(path, *args, **kwargs):
            try:
                return fn(path, *args, **kwargs)
            except (TypeError, AttributeError, KeyError, IndexError) as e:
                raise UserError(f"{path}: not a valid {what} ({type(e).__name__}: {e})") from None
        return run
    return wrap


def at_least(minimum, **flags):
    """One line naming the first flag below `minimum` (flags by their keyword names: batch_size -> --batch-size)."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least {minimum}")


def check_finite(t, where):
    """Stop on NaN or Inf in a floating-point tensor, naming where it came from."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    # min and max are NaN when any value is, and infinite when any value is: one fast pass for the usual case
    if not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FloatingPointError(f"{where}: {bad:,} of {t.numel():,} values are NaN or Inf; nothing was written")


def check_device(device):
    """A clear error for a device string torch cannot parse or this machine does not have."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:0, mps)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                        f"use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return d


def is_out_of_memory(e):
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def user_message(e, memory=""):
    """The one-line message for a user error, or None for a programming error (which must keep its traceback)."""
    from safetensors import SafetensorError

    first = str(e.args[0]) if e.args else type(e).__name__
    if is_out_of_memory(e):
        detail = str(e).split("\n")[0].split("DefaultCPUAllocator: ")[-1][:160]
        return f"out of memory ({detail}); try a smaller {memory}" if memory else f"out of memory ({detail})"
    if isinstance(e, (AssertionError, RuntimeError)) and any(m in str(e) for m in DEVICE_MESSAGES):
        return f"{str(e).splitlines()[0]}: check --device"
    if isinstance(e, OSError):
        # for a rename, the destination (filename2) is the path the user named
        name = e.filename2 or e.filename
        return f"{name}: {e.strerror}" if name and e.strerror else first
    if isinstance(e, (UserError, FloatingPointError, SafetensorError)):
        return first
    return None


EXIT_INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)


def cli(memory="", resume=""):
    """Decorate a CLI's main(argv=None): user errors print `prog: error: message` on one line and exit 2.

    `memory` names the flags that lower the memory a run needs (said when it runs out); `resume` says what an
    interrupted run keeps and how to continue it (said on Ctrl-C, which exits 130 without a traceback: every
    output is written atomically, so an interruption leaves no half-written file to explain)."""
    def wrap(main):
        prog = Path(main.__code__.co_filename).name

        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"\n{prog}: interrupted; {resume or 'no output was written or changed'}", file=sys.stderr)
                raise SystemExit(EXIT_INTERRUPTED) from None
            except Exception as e:  # MemoryError included; SystemExit passes
                msg = user_message(e, memory)
                if msg is None:
                    raise
                print(f"{prog}: error: {' '.join(msg.split())}", file=sys.stderr)
                raise SystemExit(EXIT_USAGE) from None
        return run
    return wrap


def old_spelling(parser, old, new):
    """Accept `old`, a flag's former name, as a hidden alias of `new`: users' scripts keep working, while --help
    and the docs show only `new` (tests/test_docs.py refuses a hidden flag in a documented command)."""
    import argparse

    action = parser._option_string_actions[new]
    if not isinstance(action, argparse._StoreAction):
        raise TypeError(f"{new}: only a flag that takes a value can have an old spelling here")
    parser.add_argument(old, dest=action.dest, type=action.type, choices=action.choices, nargs=action.nargs,
                        metavar=action.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
