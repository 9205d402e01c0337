"""Writes that appear whole or not at all, and the lock that serialises the writers of one path.

A file is written under a temporary name beside it, flushed to disk (fsync) and renamed over the
target. A directory (a checkpoint) is built beside its target and swapped in by one atomic exchange
(Linux renameat2 with RENAME_EXCHANGE), so a process killed at any instant leaves either the old
directory or the complete new one. Writers of one directory hold an flock on `.NAME.lock` beside it;
temporaries carry their writer's pid (`.NAME.tmp-PID-*`), and the next writer removes those whose
writer is gone. Readers take no lock.
"""
import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import fcntl

from machinery.errors import UserError

_held = set()  # lock files this process holds: a writer may re-enter its own lock


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_prefix(target):
    return f".{Path(target).name}.tmp-{os.getpid()}-"


def write_file(path, write):
    """Replace the file at `path` atomically by what write(tmp) puts into a temporary beside it: unique
    temporary, fsync, rename over `path`, fsync of the directory. Every file the project writes goes here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_text(path, text):
    return write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path, data):
    return write_file(path, lambda tmp: Path(tmp).write_bytes(data))


@contextlib.contextmanager
def locked(target):
    """Hold an exclusive flock on `.NAME.lock` beside `target` (waiting, with a note, while another process has it).

    The lock file is removed on release; a waiter that then finds its file unlinked takes the new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = (target.parent / f".{target.name}.lock").resolve()
    if lock in _held:
        yield
        return
    fd = acquire(lock, target)
    try:
        _held.add(lock)
        yield
    finally:
        _held.discard(lock)
        lock.unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor releases the flock


def acquire(lock, target):
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            print(f"waiting for another process (pid {holder}) that is writing {target}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder removed this file on release: lock the new one


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target):
    """Clean up after a killed writer of `target` (its pid no longer runs): remove its temporaries, and put back
    an old version it had parked (`.NAME.old-PID-*`, only where the system has no atomic exchange)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for kind in ("old", "tmp"):
        for leftover in target.parent.glob(f".{glob_escape(target.name)}.{kind}-*"):
            pid = leftover.name[len(f".{target.name}.{kind}-"):].split("-")[0]
            if not pid.isdigit() or int(pid) == os.getpid() or alive(int(pid)):
                continue
            if kind == "old" and not target.exists():
                os.rename(leftover, target)
            elif leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def glob_escape(name):
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def check_replaceable(out_dir, flag="--out"):
    """Only a checkpoint (a directory with config.json) or an empty directory may be replaced by a new one."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"{out_dir} exists and is not a directory: refusing to replace it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise UserError(f"{out_dir} is a non-empty directory that is not a checkpoint: refusing to replace it; "
                        f"choose another {flag}")


def check_out(out, inputs, flag="--out", kind="checkpoint", inside_ok=()):
    """Refuse, before any work, an output that would destroy an input or that the write would refuse at the end.

    `out` may not be, lie inside or contain one of the input checkpoint directories `inputs` ({flag: directory};
    None entries are skipped); for the flags in `inside_ok` (a directory of files the run adds to, such as search's
    --out) lying inside is fine. `kind` is what is written there: a "checkpoint" (replaced whole:
    check_replaceable), a "directory" of files (must not be a file), or a "file" (must not be a directory)."""
    if out is None:
        return
    out = Path(out).expanduser()
    where = out.resolve()
    for name, directory in inputs.items():
        if directory is None:
            continue
        d = Path(directory).expanduser().resolve()
        how = ("is" if where == d else "lies inside" if where.is_relative_to(d) and name not in inside_ok else
               "contains" if d.is_relative_to(where) else None)
        if how:
            raise UserError(f"{flag} {out} {how} the directory of {name} ({directory}): writing there would destroy "
                            f"that input; choose another {flag}")
    if kind == "checkpoint":
        check_replaceable(out, flag)
    elif kind == "directory" and out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a directory")
    elif kind == "file" and out.is_dir():
        raise UserError(f"{flag} {out} is a directory; give the path of a file")


@contextlib.contextmanager
def new_dir(out_dir):
    """Yield an empty directory beside `out_dir`; when the block ends normally it replaces `out_dir` atomically.

    The whole write holds the lock of `out_dir`. On an exception the temporary is removed and `out_dir`
    is untouched."""
    out_dir = Path(out_dir)
    with locked(out_dir):
        remove_stale(out_dir)
        check_replaceable(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir), dir=out_dir.parent))
        try:
            yield tmp
            readable_by_umask(tmp)
            for f in tmp.iterdir():
                fsync_path(f)
            fsync_path(tmp)
            swap_in(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def readable_by_umask(directory):
    """mkdtemp (and safetensors) create owner-only files; give the result the permissions of a normal write."""
    mask = umask()
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~mask)


def exchange(a, b):
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(tmp, out_dir):
    """Put the finished directory `tmp` at `out_dir`; the old one is removed only once the new one is in place."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
    elif exchange(tmp, out_dir):
        shutil.rmtree(tmp)  # it now holds the old directory
    else:
        # no atomic exchange here: for an instant out_dir is absent, its old version parked beside it
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
        os.replace(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    fsync_path(out_dir.parent)


def write_json(path, obj):
    """Write JSON atomically (write_text): the old file or the complete new one, never half of one."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def provenance(seed=None):
    """What every report records about how it was made: the command line, the versions, when, and the seed."""
    import platform

    import torch

    return {"command": " ".join(["python"] + sys.argv), "seed": seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__}}
