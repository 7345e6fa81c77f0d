"""The README and docs/ are held to the repository: results to the committed result files, every path and
link to a file that exists, nothing to a file outside the repository.

- Every marked table (`<!-- table: PATH [N] -->`, `<!-- generated: NAME -->`, ...) in README.md and under
  docs/ equals what docs/build_results.py makes from the result files; a stale or hand-edited number fails.
- Every decimal number in their text is in a result or gin file the page names (or declared as coming
  from outside, e.g. the paper).
- Every folder under analysis/results/ and every file under bench/results/ is shown on some page.
- Every repository path and every relative link (with its #anchor) in the Markdown files exists; code
  comments and docstrings cite only files that exist; nothing cites `shared/…` or an issue number of
  this project (upstream issues are cited with their project's name).
- The README is a front door: short, with the two commands and a link to every guide.
"""

import importlib.util
import io
import os
import re
import subprocess
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("build_results", os.path.join(ROOT, "docs", "build_results.py"))
build_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_results)

TOP_DIRS = ("decm", "gin", "tests", "analysis", "bench", "sweeps", "docs", ".ci")
PATH_TOKEN = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*|[\w.-]+\.md)(?![\w/])" % "|".join(re.escape(d) for d in TOP_DIRS))
OUTSIDE_REF = re.compile(r"(?<![\w./-])shared/[\w./-]+")
ISSUE_REF = re.compile(r"\b(?:issue|PR|pull request)\s*#\d+", re.I)
UPSTREAM = re.compile(r"(?<![\w/.-])[A-Za-z][\w-]*/[\w-]+(?![\w./-])|\b(?:PyTorch|pytorch|DiT|SiT|LightningDiT|FACM|timm|"
                      r"submitit|Optuna|optuna|wandb)\b")  # owner/repo, or a project's name
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
OUTPUT_DIRS = ("runs/", "sweeps/runs/")            # git-ignored outputs: documented, never committed
OUTPUT_NAMES = {"report.md"}                         # files the code writes into output folders
TEXT_SUFFIXES = (".md", ".py", ".gin", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg")


def repo_files(root: str = ROOT) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (what a commit would hold)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split("\n")
        return sorted(f for f in out if f and os.path.exists(os.path.join(root, f)))
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", "__pycache__", "wandb", ".pytest_cache"}
        found = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
            found += [os.path.relpath(os.path.join(d, f), root) for f in files]
        return sorted(found)


def exists_in(path: str, files: set, dirs: set) -> bool:
    path = os.path.normpath(path)
    return path in files or path in dirs


def folders(files) -> set:
    out = set()
    for f in files:
        d = os.path.dirname(f)
        while d:
            out.add(d)
            d = os.path.dirname(d)
    return out


def is_placeholder(token: str) -> bool:
    return any(c in token for c in "<>*{}…$") or "XXXX" in token or "does_not_exist" in token or "no_such" in token


def path_problems(text: str, where: str, files: set, dirs: set, basenames: set, outputs=OUTPUT_DIRS) -> list[str]:
    """Repository paths and bare `*.md` names in a text that name nothing in the repository.

    Paths under `outputs` are where commands write (git-ignored run folders; in code, also the result
    folders a script fills), so they need not exist.
    """
    problems = []
    for m in PATH_TOKEN.finditer(text):
        token = m.group(1).rstrip(".,:;")
        rest = re.match(r"[^\s`)\]|,;'\"]*", text[m.end():]).group(0)
        if is_placeholder(token + rest) or token.startswith(outputs):
            continue
        if "/" not in token.rstrip("/"):
            name = token.rstrip("/")
            if name.endswith(".md") and name not in basenames and name not in OUTPUT_NAMES:
                problems.append(f"{where}: {name} is no file in the repository")
            continue
        if not exists_in(token, files, dirs):
            problems.append(f"{where}: {token} does not exist in the repository")
    return problems


def outside_problems(text: str, where: str) -> list[str]:
    """Citations of files outside the repository (`shared/…`) and of this project's own issue numbers."""
    problems = [f"{where}: {m.group(0)} is outside the repository" for m in OUTSIDE_REF.finditer(text)]
    for m in ISSUE_REF.finditer(text):
        before = text[max(0, m.start() - 60):m.start()]
        if not UPSTREAM.search(before):
            problems.append(f"{where}: {m.group(0)!r} cites an issue without naming its (upstream) project")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def link_problems(page: str, text: str, root: str, files: set, dirs: set) -> list[str]:
    problems = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not exists_in(full, files, dirs):
            problems.append(f"{page}: link {target} → {full} does not exist")
            continue
        if anchor and full.endswith(".md"):
            with open(os.path.join(root, full)) as f:
                body = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # a `# comment` in a code block is no heading
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", body, flags=re.M)}
            if anchor not in anchors:
                problems.append(f"{page}: link {target}: no heading #{anchor} in {full}")
    return problems


def comments_and_docstrings(path: str, text: str) -> str:
    """The prose of a code file: comments and triple-quoted strings (.py), `#` comments (others)."""
    if not path.endswith(".py"):
        return "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    parts = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.string.lstrip("rbuRBU").startswith(('"""', "'''"))):
                parts.append(tok.string)
    except (tokenize.TokenError, SyntaxError):
        return text
    return "\n".join(parts)


def reference_problems(root: str = ROOT) -> list[str]:
    """Every dangling or outside reference in the repository's documentation, comments and docstrings."""
    all_files = repo_files(root)
    files, dirs = set(all_files), folders(all_files)
    basenames = {os.path.basename(f) for f in all_files}
    problems = []
    for f in all_files:
        if f.startswith(("analysis/results/", "bench/results/")) or not (f.endswith(TEXT_SUFFIXES) or f.startswith(".ci/")):
            continue
        with open(os.path.join(root, f), errors="replace") as fh:
            text = fh.read()
        if f.endswith(".md"):
            prose = text
            problems += link_problems(f, text, root, files, dirs)
            outputs = OUTPUT_DIRS
        else:
            prose = comments_and_docstrings(f, text)
            outputs = OUTPUT_DIRS + ("analysis/results/", "bench/results/")  # a script's output files
        problems += path_problems(prose, f, files, dirs, basenames, outputs) + outside_problems(prose, f)
    return problems


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


# --------------------------------------------------------------------------------------- results
def test_readme_and_docs_tables_equal_what_the_result_files_give():
    pages = build_results.pages()
    assert "README.md" in pages and "docs/results/index.md" in pages
    marked = 0
    for page in pages:
        text = read(page)
        marked += sum(bool(build_results.MARKER.fullmatch(line.strip())) for line in text.splitlines())
        new, problems = build_results.render(text)
        assert problems == [], f"{page}: {problems}"
        assert new == text, f"{page} is stale: run python docs/build_results.py"
    assert marked >= 20, marked


def test_an_edited_table_number_fails():
    text = read("docs/results/toy2d.md")
    m = re.search(r"^\| DE-CM \(full\) \| (\d)\.(\d)", text, flags=re.M)
    pos = m.start(2)
    edited = text[:pos] + ("1" if text[pos] != "1" else "2") + text[pos + 1:]
    new, problems = build_results.render(edited)
    assert problems == [] and new == text and new != edited


def test_a_changed_result_file_changes_its_table(tmp_path):
    src = os.path.join(ROOT, "analysis/results/ablation-toy2d/table.md")
    os.makedirs(tmp_path / "analysis/results/ablation-toy2d")
    with open(src) as f:
        table = f.read()
    (tmp_path / "analysis/results/ablation-toy2d/table.md").write_text(table.replace("0.117 ± 0.016", "0.118 ± 0.016"))
    page = "<!-- table: analysis/results/ablation-toy2d/table.md -->\n" + "\n".join(
        build_results.file_table("analysis/results/ablation-toy2d/table.md", 1)) + "\n"
    new, problems = build_results.render(page, root=str(tmp_path))
    assert problems == [] and "0.118 ± 0.016" in new and "0.117 ± 0.016" not in new


def test_every_number_in_the_text_is_in_a_file_the_page_names():
    problems = [f"{page}: {p}" for page in build_results.pages() for p in build_results.unsupported_numbers(read(page))]
    assert problems == []


def test_a_number_in_no_named_file_fails():
    text = read("docs/results/sweep.md")
    assert build_results.unsupported_numbers(text) == []
    edited = text.replace("SW₂ of 0.310", "SW₂ of 0.301")
    assert edited != text
    assert build_results.unsupported_numbers(edited) == ["0.301 is in no result or gin file the page names"]


def test_every_result_is_shown_on_a_page():
    shown = "\n".join(read(page) for page in build_results.pages())
    results = sorted(f"analysis/results/{d}" for d in os.listdir(os.path.join(ROOT, "analysis/results")))
    results += sorted(f"bench/results/{f}" for f in os.listdir(os.path.join(ROOT, "bench/results"))
                      if f.endswith(".json") and "-cuda" not in f)
    missing = [r for r in results if not re.search(re.escape(r) + r"(?![\w-])", shown)]
    assert missing == [], f"result files no page shows: {missing}"


# ------------------------------------------------------------------------------------ references
def test_no_reference_to_a_path_that_does_not_exist():
    assert reference_problems() == []


def test_a_reference_to_a_missing_path_or_outside_file_fails(tmp_path):
    files = {"README.md", "docs/guide.md", "decm/core.py"}
    dirs = folders(files)
    text = "See `decm/core.py`, `decm/gone.py`, `runs/quickstart/` and method.md."
    problems = path_problems(text, "x.md", files, dirs, {"README.md", "guide.md", "core.py"})
    assert problems == ["x.md: decm/gone.py does not exist in the repository", "x.md: method.md is no file in the repository"]
    outside = "shared" + "/method.md"  # an outside note, spelled so that this file itself cites none
    assert outside_problems(f"as in {outside} (issue #14)", "x.py") == [
        f"x.py: {outside} is outside the repository",
        "x.py: 'issue #14' cites an issue without naming its (upstream) project"]
    assert outside_problems("the case of pytorch/pytorch issue #182641; DiT PR #12", "x.md") == []
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/guide.md").write_text("# Guide\n## Sharded training (FSDP2)\n")
    page = "[a](docs/guide.md#sharded-training-fsdp2) [b](docs/guide.md#nope) [c](docs/missing.md)"
    assert link_problems("README.md", page, str(tmp_path), files, dirs) == [
        "README.md: link docs/guide.md#nope: no heading #nope in docs/guide.md",
        "README.md: link docs/missing.md → docs/missing.md does not exist"]
    code = '"""Follows decm/gone.py."""\nx = "gin/does_not_exist.gin"  # see ' + "shared" + '/anchors.md\n'
    assert path_problems(comments_and_docstrings("t.py", code), "t.py", files, dirs, set()) == [
        "t.py: decm/gone.py does not exist in the repository"]


# ----------------------------------------------------------------------------------- front door
def test_readme_is_a_short_front_door_with_the_two_commands_and_every_guide():
    text = read("README.md")
    assert len(text.splitlines()) <= 250
    ci = read(".ci/run")
    quickstart = ("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[test]' && "
                  ".venv/bin/python -m decm.launch --gin gin/quickstart.gin")
    tests = ("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[test,dashboard]' && "
             ".venv/bin/python -m pytest -q")
    lines = [line.strip() for line in text.splitlines()]
    assert quickstart in lines and tests in lines  # each the whole line of its code block
    assert ".venv/bin/pip install -q -c constraints.txt -e '.[test,dashboard]'" in ci
    assert ".venv/bin/python -m pytest -q" in ci
    linked = {os.path.normpath(m.group(1).partition("#")[0]) for m in LINK.finditer(text)}
    guides = {f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")}
    assert guides - linked == set(), f"guides the README does not link: {guides - linked}"
    index = read("docs/results/index.md")
    pages = {f for f in os.listdir(os.path.join(ROOT, "docs/results")) if f.endswith(".md") and f != "index.md"}
    assert {p for p in pages if f"]({p})" not in index} == set()
