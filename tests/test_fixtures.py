"""The references and the data excerpt in the repository are what their READMEs say they are."""
import hashlib

import pytest

from conftest import EXCERPT, FIXTURES, WHOLE


def listed(folder):
    """{relative path: sha256} of a SHA256SUMS file."""
    rows = (line.split() for line in (folder / "SHA256SUMS").read_text().splitlines() if line.strip())
    return {name.removeprefix("./"): digest for digest, name in rows}


def test_fixtures_are_the_staged_references_byte_for_byte():
    sums = listed(FIXTURES)
    files = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file()} - {"README.md", "SHA256SUMS"}
    assert files == set(sums), "a fixture was added or removed without its digest"
    for name, digest in sums.items():
        assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == digest, f"{name} changed"


def test_excerpt_keeps_whole_lines_of_every_file():
    files = [p for p in EXCERPT.rglob("*") if p.is_file() and p.suffix in (".raw", ".jsonl", ".lst")]
    assert len(files) == 11
    for p in files:
        text = p.read_text(encoding="utf-8")
        assert text.endswith("\n") and len(text.splitlines()) >= 4, p


@pytest.mark.whole_data
def test_excerpt_is_a_prefix_of_the_whole_data():
    for p in EXCERPT.rglob("*"):
        if p.is_file() and p.suffix in (".raw", ".jsonl", ".lst"):
            rel = p.relative_to(EXCERPT)
            assert (WHOLE / rel).read_bytes().startswith(p.read_bytes()), rel
        elif p.name == "SOURCE.md":
            assert p.read_bytes() == (WHOLE / p.relative_to(EXCERPT)).read_bytes()
