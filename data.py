"""Reading calibration and evaluation text: WikiText-2 raw, any text file, or an embedded fallback.

Data directory: `data_dir` argument, then $CLP_DATA, then ./data, then $CLP_CACHE/data, which is
filled on first need (or by `python data.py --fetch`) from pinned public files whose sha256 is checked
(fetch.py). The WikiText-2 protocol (the one lm-eval-harness and the GPTQ/SparseGPT scripts use): rows
are the lines of the .raw file with their trailing newline, whitespace-only lines become "", and the
rows are joined with "\\n\\n".
"""
import argparse
import os
from pathlib import Path

import torch

from machinery import fetch as fetcher
from machinery.errors import UserError, cli
from machinery.paths import ROOT, shown

WIKITEXT_FILES = {"test": "wiki.test.raw", "valid": "wiki.valid.raw", "validation": "wiki.valid.raw"}


def find_data_dir(data_dir=None, fetch=True):
    """The first existing data directory among the argument, $CLP_DATA, ./data and $CLP_CACHE/data, or None.

    With nothing found, the pinned files are downloaded into $CLP_CACHE/data once (unless `fetch` is
    False or $CLP_OFFLINE is set); where that is impossible, one line says so and None comes back."""
    for cand in (data_dir, os.environ.get("CLP_DATA"), ROOT / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    if data_dir:
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    return fetcher.cached_data(download=fetch)


def wikitext_path(split, data_dir=None):
    root = find_data_dir(data_dir)
    if root is None:
        return None
    p = root / "wikitext-2-raw" / WIKITEXT_FILES[split]
    return p if p.is_file() else None


def wikitext_text(path):
    rows = ["" if line.strip() == "" else line for line in Path(path).read_text(encoding="utf-8").splitlines(keepends=True)]
    return "\n\n".join(rows)


def fallback_text(part):
    """English text of Python's reference manual, split into disjoint 'calib' and 'eval' halves."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    half = len(text) // 2
    return text[:half] if part == "calib" else text[half:]


def load_text(source, split="test", data_dir=None, quiet=False):
    """Text for `source`: "wikitext2" (split test|valid; falls back to the embedded text), "pydoc", or a file path.

    Returns (text, description) so reports can say which text was really used.
    """
    if source == "wikitext2":
        p = wikitext_path(split, data_dir)
        if p is not None:
            return wikitext_text(p), f"wikitext2-{'test' if split == 'test' else 'valid'} ({shown(p)})"
        part = "eval" if split == "test" else "calib"
        if not quiet:
            print(f"note: WikiText-2 not found (set CLP_DATA or --data-dir, or run python data.py --fetch); "
                  f"using the {part} half of Python's reference manual text instead")
        return fallback_text(part), f"pydoc-{part} (WikiText-2 not found)"
    if source in ("pydoc", "pydoc-calib", "pydoc-eval"):
        part = "eval" if source == "pydoc-eval" or (source == "pydoc" and split == "test") else "calib"
        return fallback_text(part), f"pydoc-{part}"
    p = Path(source)
    if not p.is_file():
        raise FileNotFoundError(f"text source {source!r} is neither 'wikitext2', 'pydoc' nor an existing file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"text file {p} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise UserError(f"text file {p} is empty")
    if p.suffix == ".raw":
        text = wikitext_text(p)
    return text, shown(p)


def eval_windows(ids, seqlen):
    """Non-overlapping windows of `seqlen` tokens, tail dropped: (n, seqlen)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"text has {ids.numel():,} tokens, fewer than one window of {seqlen:,}")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_batch(ids, nsamples, seqlen, seed=0):
    """`nsamples` random windows of `seqlen` tokens (seeded, reproducible): (nsamples, seqlen)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() <= seqlen:
        raise UserError(f"calibration text has {ids.numel():,} tokens, need more than seqlen={seqlen:,}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="Where the evaluation data is found; --fetch downloads it into "
                                            "$CLP_CACHE/data from pinned public sources (sha256-checked).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fetch", action="store_true", help="download every missing file now")
    p.add_argument("--dest", type=Path, default=None, help="directory to fetch into; None: $CLP_CACHE/data")
    return p


def calibration_windows(tokenizer, source, nsamples, seqlen, seed=0, vocab_size=None, held_out=0, data_dir=None):
    """(windows (nsamples, seqlen), held-out windows (held_out, seqlen) or None, description): seeded random
    windows of the calibration text `source` (wikitext2 = its validation split, pydoc, or a text file). With
    held_out, the windows come from the first 90% of its tokens and the held-out ones (seed + 1) from the last
    10%. A checkpoint without a tokenizer (None) calibrates on uniformly random ids of `vocab_size`."""
    if tokenizer is None:
        print("note: this checkpoint has no tokenizer: calibrating on uniformly random token ids")
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (nsamples + held_out, seqlen), generator=g)
        return ids[:nsamples], ids[nsamples:] if held_out else None, f"random ids {nsamples}x{seqlen}"
    text, desc = load_text(source, split="valid", data_dir=data_dir)
    ids = tokenizer.encode(text, bos=False)
    cut = int(0.9 * len(ids)) if held_out else len(ids)
    if cut < nsamples * seqlen:
        print(f"warning: the calibration text has only {cut:,} tokens for {nsamples * seqlen:,} requested: "
              f"windows overlap")
    windows = calibration_batch(ids[:cut], nsamples, seqlen, seed=seed)
    if not held_out:
        return windows, None, f"{desc}, {nsamples} random windows x {seqlen} tokens (seed {seed}, of {len(ids):,})"
    return windows, calibration_batch(ids[cut:], held_out, seqlen, seed=seed + 1), (
        f"{desc}: {nsamples} random windows x {seqlen} tokens from the first 90% (seed {seed}), {held_out} held out "
        f"from the last 10%")


@cli()
def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.fetch:
        ok, failed = fetcher.fetch(a.dest)
        raise SystemExit(1 if failed else 0)
    root = find_data_dir(fetch=False)
    print(f"data directory: {shown(root) if root else 'none (python data.py --fetch downloads it)'}")
    if root is not None:
        for rel in fetcher.FILES:
            print(f"  {'ok     ' if (root / rel).is_file() else 'missing'}  {rel}")


if __name__ == "__main__":
    main()
