"""Fetching the evaluation data on a fresh machine: WikiText-2 raw and the zero-shot task files.

Every file comes from a public GitHub repository at a fixed commit and is stored only if its sha256
equals the digest pinned here, so a moved branch, a proxy's error page or a truncated download can
never pose as the data. Files are written atomically (temp file, then rename) under $CLP_CACHE/data
in the layout data.py and tasks.py read. $CLP_DATA_MIRROR replaces GitHub by a server holding a copy
of that layout (``$CLP_DATA_MIRROR/wikitext-2-raw/wiki.test.raw``); the digests still decide.

    python data.py --fetch            # everything missing, now
"""
import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from machinery import atomic
from machinery.errors import UserError
from machinery.paths import cache_root, shown

GITHUB = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Source:
    repo: str  # owner/name on GitHub
    commit: str
    path: str  # inside the repository
    sha256: str  # of the file as stored here
    blob: str = ""  # git blob id of the upstream file, checked before a derivation


FOUNDRY = ("mosaicml/llm-foundry", "8c8dd48f72168c5d51e2f7b151595892a8fba43d")
# local name -> where it comes from. Licenses: WikiText-2 CC BY-SA 3.0, PIQA AFL-3.0, WinoGrande CC-BY,
# BoolQ CC BY-SA 3.0, OpenBookQA AI2 (Apache-2.0 per its card), ARC CC BY-SA 4.0, HellaSwag MIT.
FILES = {
    "wikitext-2-raw/wiki.test.raw": Source(
        "pytorch/examples", "cf74c81ec00256a9511c054aaf0b3f62cd3aa62d", "word_language_model/data/wikitext-2/test.txt",
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
    "wikitext-2-raw/wiki.valid.raw": Source(
        "pytorch/examples", "cf74c81ec00256a9511c054aaf0b3f62cd3aa62d", "word_language_model/data/wikitext-2/valid.txt",
        "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
    "piqa/valid.jsonl": Source(
        "ybisk/ybisk.github.io", "21edab439af693b961be2f069e8690a88d3b4e37", "piqa/data/valid.jsonl",
        "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d"),
    "piqa/valid-labels.lst": Source(
        "ybisk/ybisk.github.io", "21edab439af693b961be2f069e8690a88d3b4e37", "piqa/data/valid-labels.lst",
        "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb"),
    "winogrande/dev.jsonl": Source(
        "zhang-edward/WinoGrande", "ea61adace986f13f152757273a9b0840887efe65", "data/dev.jsonl",
        "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8"),
    "boolq/dev.jsonl": Source(
        "d-eremeev/BoolQ-Question-Answering", "72c347852e309ad087cf9f57517b769712a7a2a4", "data/dev.jsonl",
        "ebc29ea3808c5c611672384b3de56e83349fe38fc1fe876fd29b674d81d0a80a"),
    "openbookqa/test.jsonl": Source(
        "katulevskiy/NLP-OpenBookQA", "eac0c145529af1a4e7924c979bbbba0b10354de3",
        "OpenBookQA-V1-Sep2018/Data/Main/test.jsonl",
        "feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313"),
    "arc/arc_easy.jsonl": Source(
        *FOUNDRY, "scripts/eval/local_data/world_knowledge/arc_easy.jsonl",
        "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5"),
    # the official test file with a baseline's predictions added; derive_arc() drops them again
    "arc/ARC-Challenge-Test.jsonl": Source(
        "hthuwal/ARC-Challenge", "526b8e71f1db48f600b9f87dcf6b7bd494ff0880",
        "analysis/ARC-Challenge-Test_qapredictions_dgem_default.jsonl",
        "7836b308f52744ea6efc41ef78691c77f272b9bfe686c6d4435b58c837179243",
        blob="09979a2d125835bdf0d6776773a74faaee06f636"),
    "hellaswag/hellaswag_small.jsonl": Source(
        *FOUNDRY, "tests/eval/local_data/hellaswag_small.jsonl",
        "9f3d4874dc55d8003a2d6eae1763d0ee1c3b3ec16ede80102bb3664cd932cdcb"),
}
_tried = False  # one automatic attempt per process: a machine without internet says so once


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data):
    """The id git gives a file's content: sha1 of 'blob <size>\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def derive_arc(raw):
    """ARC-Challenge-Test.jsonl from the copy with a solver's predictions: the original fields only, in the
    original order, one json.dumps line per item."""
    out = []
    for line in raw.decode("utf-8").splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        q = d["question"]
        item = {"id": d["id"], "question": {"stem": q["stem"], "choices": [{"text": c["text"], "label": c["label"]}
                                                                          for c in q["choices"]]},
                "answerKey": d["answerKey"]}
        out.append(json.dumps(item) + "\n")
    return "".join(out).encode("utf-8")


def url_of(rel, mirror=None):
    if mirror:
        return f"{mirror.rstrip('/')}/{rel}"
    s = FILES[rel]
    return f"{GITHUB}/{s.repo}/{s.commit}/{s.path}"


def download(url, timeout):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def content(rel, raw, mirror):
    """The bytes to store for `rel`: a mirror holds them as they are, GitHub may need a derivation."""
    s = FILES[rel]
    if mirror or not s.blob:
        return raw
    if git_blob_id(raw) != s.blob:
        raise UserError(f"its git blob id {git_blob_id(raw)[:12]} is not the pinned {s.blob[:12]}")
    return derive_arc(raw)


def fetch(dest=None, names=None, mirror=None, timeout=30.0):
    """Download the files `names` (default all) into `dest` (default $CLP_CACHE/data); returns (stored, failed).

    A file whose sha256 differs from the table is refused and not stored. An unreachable host stops the
    fetch with one line, since every later file would fail the same way."""
    dest = Path(dest) if dest else cache_root() / "data"
    mirror = mirror or os.environ.get("CLP_DATA_MIRROR")
    stored, failed = [], []
    for rel in names or list(FILES):
        target, want = dest / rel, FILES[rel].sha256
        if target.is_file() and sha256(target.read_bytes()) == want:
            stored.append(rel)
            continue
        url = url_of(rel, mirror)
        try:
            body = content(rel, download(url, timeout), mirror)
        except urllib.error.HTTPError as e:
            print(f"could not download {rel}: HTTP {e.code} from {url}", file=sys.stderr)
            failed.append(rel)
            continue
        except (urllib.error.URLError, OSError) as e:  # no route, no DNS, refused, timed out
            reason = getattr(e, "reason", e)
            host = urllib.parse.urlsplit(url).netloc
            print(f"note: cannot reach {host} ({reason}): no data downloaded; put the files under $CLP_DATA, "
                  f"or run python data.py --fetch where the host is reachable", file=sys.stderr)
            return stored, failed + [r for r in (names or list(FILES)) if r not in stored and r not in failed]
        except ValueError as e:
            print(f"refused {rel} from {url}: {e}", file=sys.stderr)
            failed.append(rel)
            continue
        if sha256(body) != want:
            print(f"refused {rel} from {url}: sha256 {sha256(body)[:12]}... is not the pinned {want[:12]}...",
                  file=sys.stderr)
            failed.append(rel)
            continue
        atomic.write_bytes(target, body)
        stored.append(rel)
        print(f"fetched {rel} ({len(body):,} bytes, sha256 ok) -> {shown(target)}", file=sys.stderr)
    return stored, failed


def cached_data(download=True):
    """$CLP_CACHE/data when it holds any file, fetching the missing ones first (once per process)."""
    global _tried
    dest = cache_root() / "data"
    missing = [rel for rel in FILES if not (dest / rel).is_file()]
    if missing and download and not _tried and not os.environ.get("CLP_OFFLINE"):
        _tried = True
        print(f"fetching the evaluation data ({len(missing)} files, WikiText-2 and the zero-shot tasks, about 8 MB) "
              f"into {shown(dest)}, once", file=sys.stderr)
        fetch(dest, missing)
    return dest if any((dest / rel).is_file() for rel in FILES) else None
