"""README and docs/: links resolve, README stays short, and the performance figures come from results.jsonl.

docs/performance.md must be exactly what `benchmarks/perf_table.py --doc` makes of benchmarks/results.jsonl, and
README's performance table exactly what `perf_table.py --headline` prints, so neither can drift from the measurements.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 250

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"), images too
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)")  # [label]: target
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def perf_table():
    spec = importlib.util.spec_from_file_location("perf_table", ROOT / "benchmarks" / "perf_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for _, line in prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(path: Path) -> list:
    """'file:line: target (why)' for each relative link of a markdown file that does not resolve."""
    problems = []
    for n, line in prose_lines(path.read_text()):
        line = CODE_SPAN.sub("", line)
        targets = LINK.findall(line) + REFERENCE.findall(line)
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{n}: {target}"
            if not dest.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} (no heading with anchor #{anchor} in {dest.name})")
    return problems


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_link_check_catches_broken_links(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n\n## `--fp8`: float8 matmuls\n\n## Data (HF, 2026-12-07)\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#--fp8-float8-matmuls) [ok](b.md#data-hf-2026-12-07) [ok](#here)\n# Here\n"
                    "[gone](missing.md) [bad anchor](b.md#nope) [bad](#elsewhere)\n"
                    "```\n[in code](missing_too.md)\n```\n`[in a span](missing_three.md)` [web](https://example.com)\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        problems = broken_links(page)
    finally:
        ROOT = root
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md (no such file)", "b.md#nope (no heading with anchor #nope in b.md)",
        "#elsewhere (no heading with anchor #elsewhere in a.md)"]


def test_slug_follows_github():
    assert slug("Where a training step's time goes") == "where-a-training-steps-time-goes"
    assert slug("Weight files accepted as `--dit_path`") == "weight-files-accepted-as---dit_path"
    assert slug("Distilled mode (0.6B)") == "distilled-mode-06b"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move details to docs/ (at most {README_MAX_LINES})"


def test_readme_lists_every_doc():
    text = README.read_text()
    assert [d.name for d in DOCS if f"(docs/{d.name})" not in text] == []


def test_performance_page_is_generated_from_results(tmp_path):
    out = tmp_path / "performance.md"
    perf_table().main(["--doc", str(out)])
    committed = (ROOT / "docs" / "performance.md").read_text()
    assert out.read_text() == committed, ("docs/performance.md differs from results.jsonl: run "
                                          "`python benchmarks/perf_table.py --doc docs/performance.md`")
    out2 = tmp_path / "again.md"
    perf_table().main(["--doc", str(out2)])
    assert out2.read_text() == out.read_text()


def test_performance_page_has_every_result_line():
    pt = perf_table()
    rows = pt.load(pt.HERE / "results.jsonl")
    page = (ROOT / "docs" / "performance.md").read_text()
    named = [int(n) for n in re.findall(r"^\| [^|]* \(line (\d+)\) \|", page, re.M)]
    assert sorted(named) == [n for n, row in enumerate(rows, 1) if row]


def test_doc_mode_refuses_a_template_that_leaves_lines_out():
    pt = perf_table()
    rows = pt.load(pt.HERE / "results.jsonl")
    with pytest.raises(SystemExit, match="in no table"):
        pt.doc(rows, "# Page\n<!-- rows 1-3 -->\n", "results.jsonl")
    with pytest.raises(SystemExit, match="in two tables"):
        pt.doc(rows, f"<!-- rows 1-{len(rows)} -->\n<!-- rows 2 -->\n", "results.jsonl")


def test_readme_headline_table_is_perf_tables():
    pt = perf_table()
    expected = pt.headline(pt.load(pt.HERE / "results.jsonl"))
    lines = README.read_text().splitlines()
    assert expected[0] in lines, "README has no performance table: paste `python benchmarks/perf_table.py --headline`"
    start = lines.index(expected[0])
    table = lines[start:start + len(expected) + 1]
    assert table[:len(expected)] == expected, ("README's performance table differs from "
                                               "`python benchmarks/perf_table.py --headline`")
    assert len(table) == len(expected) or not table[-1].startswith("|"), "README's table has rows perf_table lacks"
    # each row names its results.jsonl line, and the figures are that line's
    named = [int(n) for n in re.findall(r"\| line (\d+) \|$", "\n".join(expected), re.M)]
    assert named == [n for n, _, _ in pt.HEADLINE]
