"""The data fetcher against a local HTTP server: stored when the digest matches, refused otherwise, one line offline."""
import dataclasses
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

import data
from conftest import DATA, WHOLE, need
from machinery import fetch, paths

SMALL = ["hellaswag/hellaswag_small.jsonl", "winogrande/dev.jsonl", "piqa/valid-labels.lst"]


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """(url, root): a server on 127.0.0.1 holding a copy of the data layout; tests put files into root."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def pinned(monkeypatch):
    """fetch.FILES as the data at hand is pinned: the real digests for the whole data, the excerpt's own
    digests for tests/data (the store-or-refuse logic under test is the same; the real pins are checked
    against the whole files in test_table_matches_the_data_files)."""
    if WHOLE is None:
        monkeypatch.setattr(fetch, "FILES", {rel: dataclasses.replace(s, sha256=fetch.sha256(need(DATA / rel).read_bytes()))
                                             for rel, s in fetch.FILES.items()})


def copy(root, rels):
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(need(DATA / rel), root / rel)


def leftovers(dest):
    return [p for p in Path(dest).rglob("*") if p.is_file() and p.name.startswith(".")]


@pytest.mark.whole_data
def test_table_matches_the_data_files():
    whole = WHOLE
    sums = dict(reversed(line.split()) for line in need(whole / "SHA256SUMS").read_text().splitlines() if line.strip())
    for rel, src in fetch.FILES.items():
        assert src.sha256 == sums[rel] == fetch.sha256((whole / rel).read_bytes()), rel
        assert len(src.commit) == 40 and src.repo.count("/") == 1
    assert set(fetch.FILES) >= {"wikitext-2-raw/wiki.test.raw", "wikitext-2-raw/wiki.valid.raw"}


def test_good_files_are_stored_and_verified(mirror, tmp_path, capsys):
    url, root = mirror
    copy(root, SMALL[:2])
    dest = tmp_path / "cache"
    stored, failed = fetch.fetch(dest, SMALL[:2], mirror=url)
    assert stored == SMALL[:2] and failed == []
    for rel in SMALL[:2]:
        assert (dest / rel).read_bytes() == (DATA / rel).read_bytes()
        assert (dest / rel).stat().st_mode & 0o044  # readable by others, unlike mkstemp's default
    assert leftovers(dest) == []
    assert capsys.readouterr().err.count("sha256 ok") == 2
    # a second fetch finds them verified and downloads nothing
    (root / SMALL[0]).unlink()
    assert fetch.fetch(dest, SMALL[:2], mirror=url) == (SMALL[:2], [])


def test_a_corrupted_file_is_refused_and_not_cached(mirror, tmp_path, capsys):
    url, root = mirror
    copy(root, SMALL)
    bad = root / SMALL[2]
    bad.write_bytes(bad.read_bytes().replace(b"1", b"0", 1))  # one label flipped
    dest = tmp_path / "cache"
    stored, failed = fetch.fetch(dest, SMALL, mirror=url)
    assert failed == [SMALL[2]] and stored == SMALL[:2]
    assert not (dest / SMALL[2]).exists() and leftovers(dest) == []
    err = capsys.readouterr().err
    assert f"refused {SMALL[2]}" in err and "is not the pinned" in err


def test_a_missing_file_is_an_http_error_line(mirror, tmp_path, capsys):
    url, _ = mirror
    assert fetch.fetch(tmp_path / "cache", SMALL[:1], mirror=url) == ([], SMALL[:1])
    assert "HTTP 404" in capsys.readouterr().err


def test_an_unreachable_host_gives_one_line(tmp_path, capsys):
    dest = tmp_path / "cache"
    stored, failed = fetch.fetch(dest, SMALL, mirror="http://127.0.0.1:1", timeout=5)
    assert stored == [] and failed == SMALL and not dest.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: cannot reach 127.0.0.1:1")


def test_first_need_fetches_into_the_cache(mirror, tmp_path, monkeypatch, capsys):
    url, root = mirror
    copy(root, fetch.FILES)
    for var in ("CLP_DATA", "CLP_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLP_DATA_MIRROR", url)
    monkeypatch.setattr(fetch, "_tried", False)
    monkeypatch.setattr(data, "ROOT", tmp_path / "checkout")  # no ./data beside the code
    text, desc = data.load_text("wikitext2", "test")
    assert desc == "wikitext2-test ($CLP_CACHE/data/wikitext-2-raw/wiki.test.raw)"
    assert text == data.wikitext_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
    assert "fetching the evaluation data (10 files" in capsys.readouterr().err
    assert data.find_data_dir() == tmp_path / "cache" / "data"


def test_offline_first_need_falls_back_with_one_line_per_process(tmp_path, monkeypatch, capsys):
    for var in ("CLP_DATA", "CLP_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLP_DATA_MIRROR", "http://127.0.0.1:1")
    monkeypatch.setattr(fetch, "_tried", False)
    monkeypatch.setattr(data, "ROOT", tmp_path / "checkout")
    assert data.load_text("wikitext2", "test")[1] == "pydoc-eval (WikiText-2 not found)"
    assert data.load_text("wikitext2", "valid")[1] == "pydoc-calib (WikiText-2 not found)"
    err = capsys.readouterr().err
    assert err.count("cannot reach") == 1


def test_arc_challenge_is_derived_from_the_predictions_file():
    original = need(DATA / "arc" / "ARC-Challenge-Test.jsonl").read_bytes()
    rows = []
    for line in original.decode().splitlines():  # what the solver added: scores, support, its answers
        d = json.loads(line)
        for c in d["question"]["choices"]:
            c.update(score=0.5, support={"text": "x"})
        rows.append(json.dumps(dict(d, selected_answers="A", question_score=1.0)))
    assert fetch.derive_arc(("\n".join(rows) + "\n").encode()) == original
    if WHOLE is not None:
        assert fetch.sha256(original) == fetch.FILES["arc/ARC-Challenge-Test.jsonl"].sha256
    assert fetch.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


def test_github_urls_are_pinned_to_commits():
    u = fetch.url_of("wikitext-2-raw/wiki.test.raw")
    assert u == ("https://raw.githubusercontent.com/pytorch/examples/cf74c81ec00256a9511c054aaf0b3f62cd3aa62d/"
                 "word_language_model/data/wikitext-2/test.txt")
    assert fetch.url_of("piqa/valid.jsonl", "http://m/") == "http://m/piqa/valid.jsonl"


def test_shown_paths_are_machine_independent(tmp_path, monkeypatch):
    monkeypatch.setenv("CLP_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "c"))
    for sub in ("d/wikitext-2-raw", "c/smollm2-135m"):
        (tmp_path / sub).mkdir(parents=True)
    assert paths.shown(tmp_path / "d" / "wikitext-2-raw") == "$CLP_DATA/wikitext-2-raw"
    assert paths.shown(tmp_path / "c" / "smollm2-135m") == "$CLP_CACHE/smollm2-135m"
    assert paths.shown(paths.ROOT / "tests") == "tests"
    assert paths.shown("smollm2-135m") == "smollm2-135m"  # a name, not a path
