"""The README's result tables are the committed result files' tables, number for number.

Every result table in the README is preceded by a marker `<!-- table: PATH [N] -->` naming the file
(under analysis/results/ or bench/results/) and which of its markdown tables (1-based, default 1) it
shows. A stale or hand-edited number fails here.
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(__file__))
MARKER = re.compile(r"<!-- table: (\S+)(?: (\d+))? -->")


def tables(text: str) -> list[list[str]]:
    """The markdown tables of a text, each as its list of stripped '|' lines."""
    out, current = [], []
    for line in text.splitlines():
        if line.strip().startswith("|"):
            current.append(" ".join(line.strip().split()))
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def mismatches(readme: str, root: str = ROOT) -> list[str]:
    """One message per marked README table that differs from its file's table (or whose file is missing)."""
    problems = []
    lines = readme.splitlines()
    for i, line in enumerate(lines):
        m = MARKER.search(line)
        if not m:
            continue
        path, index = m.group(1), int(m.group(2) or 1)
        if not path.startswith(("analysis/results/", "bench/results/")):
            problems.append(f"line {i + 1}: {path} is not under analysis/results/ or bench/results/")
            continue
        full = os.path.join(root, path)
        if not os.path.exists(full):
            problems.append(f"line {i + 1}: {path} does not exist")
            continue
        following = tables("\n".join(lines[i + 1:]))
        source = tables(open(full).read())
        if not following or len(source) < index:
            problems.append(f"line {i + 1}: no table after the marker or no table {index} in {path}")
            continue
        shown, expected = following[0], source[index - 1]
        if shown != expected:
            diff = next((f"README {a!r} vs file {b!r}" for a, b in zip(shown, expected) if a != b),
                        f"{len(shown)} rows vs {len(expected)}")
            problems.append(f"line {i + 1}: table differs from {path}: {diff}")
    return problems


def readme() -> str:
    return open(os.path.join(ROOT, "README.md")).read()


def test_readme_result_tables_equal_their_files():
    text = readme()
    assert MARKER.search(text), "the README has no marked result table"
    assert mismatches(text) == []


def test_an_edited_number_fails():
    text = readme()
    m = MARKER.search(text)
    start = text.index("\n|", m.end())
    row = text.index("\n", text.index("\n", text.index("\n", start + 1) + 1) + 1)  # past header and rule
    digit = re.search(r"\d", text[row:])
    pos = row + digit.start()
    edited = text[:pos] + ("1" if text[pos] != "1" else "2") + text[pos + 1:]
    assert mismatches(edited) and "differs" in mismatches(edited)[0]
