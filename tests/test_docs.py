"""The Markdown a reader gets with a clone: no paths of the machine it was written on, no dead relative links."""
import re
import subprocess

import pytest

from conftest import ROOT

ABSOLUTE = re.compile(r"(?<![\w.$~/-])/(work|root|home|tmp)/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def markdown_files():
    """Committed Markdown, and new files not ignored (they are about to be committed)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [p for p in ROOT.rglob("*.md") if not {".venv", "runs"} & set(p.relative_to(ROOT).parts)]
    assert any(p.name == "README.md" for p in files)
    return files


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m[1]) for m in re.finditer(r"^#+\s+(.+)$", text, re.M)}


def test_no_absolute_machine_paths():
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in markdown_files()
           for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ABSOLUTE.search(line)]
    assert not bad, "absolute paths of a machine in Markdown:\n" + "\n".join(bad)


def test_every_relative_link_resolves():
    bad = []
    for p in markdown_files():
        for target in LINK.findall(FENCE.sub("", p.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (p.parent / path).resolve() if path else p
            if not dest.exists():
                bad.append(f"{p.relative_to(ROOT)}: {target} (no such file)")
            elif not dest.resolve().is_relative_to(ROOT):
                bad.append(f"{p.relative_to(ROOT)}: {target} (outside the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{p.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "dead links:\n" + "\n".join(bad)


@pytest.mark.parametrize("heading, want", [
    ("report.json (search.py, baselines.py)", "reportjson-searchpy-baselinespy"),
    ("GPTQ on-disk format", "gptq-on-disk-format"),
    ("eval.py `--json OUT`", "evalpy---json-out"),
    ("4. The search: [`search.py`](../search.py) and [`teacher.py`](../teacher.py)", "4-the-search-searchpy-and-teacherpy"),
])
def test_slug(heading, want):
    assert slug(heading) == want


def test_the_checks_can_fail(tmp_path):
    assert ABSOLUTE.search("see /work/shared/DESIGN.md") and ABSOLUTE.search("`/root/.cache/clp`")
    assert not ABSOLUTE.search("runs/tmp/x and https://host/home/page and $CLP_DATA/wikitext-2-raw")
    assert LINK.findall("a [x](docs/a.md#b) and ![p](img/p.png)") == ["docs/a.md#b", "img/p.png"]
