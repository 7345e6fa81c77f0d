"""Fill the result tables of the README and of the pages under docs/ from the committed result files.

    python docs/build_results.py            # rewrite every stale table in place
    python docs/build_results.py --check    # exit 1 and name each stale table or unsupported number

A page marks each generated block with an HTML comment alone on the line before it (invisible when
rendered):

    <!-- table: analysis/results/ablation-toy2d/table.md -->      the file's 1st markdown table
    <!-- table: analysis/results/digits_tuning_trials/table.md 2 -->   its 2nd table
    <!-- relations: analysis/results/ablation-toy2d/relations.json -->   the relations as a bullet list
    <!-- generated: step_cost -->                                   a table computed by GENERATED[name]

and the block that follows (a table, or the bullet list) is replaced. Numbers in the prose around the
blocks are checked, not generated: every decimal number (and every integer written with a thousands
separator) outside code must be found, at the precision written, in a file the page names: a path
under analysis/results/ or bench/results/ (folders included) or a gin file (for settings). A number
that comes from elsewhere (a paper) is declared on the page with `<!-- outside: N N ... (source) -->`.
"""

import argparse
import glob
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!-- (table|relations|generated): (\S+)(?: (\d+))? -->")
OUTSIDE = re.compile(r"<!-- outside: (.*?) -->")
SOURCE_PATH = re.compile(r"(?<![\w/.-])(?:(?:analysis|bench)/results/[\w./-]*[\w/]|gin/[\w/.-]+\.gin)")
PROSE_NUMBER = re.compile(r"(?<![\w.])(?<!arXiv )(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?!\d|\.\d)")
ANY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
TEXT_SUFFIXES = (".md", ".json", ".csv", ".gin", ".txt")


# ----------------------------------------------------------------------------------------- tables
def markdown_tables(text: str) -> list[list[str]]:
    """The markdown tables of a text, each as its list of '|' lines with whitespace runs collapsed."""
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


def read(path: str, root: str = ROOT) -> str:
    with open(os.path.join(root, path)) as f:
        return f.read()


def load(path: str, root: str = ROOT):
    with open(os.path.join(root, path)) as f:
        return json.load(f)


def file_table(path: str, index: int, root: str = ROOT) -> list[str]:
    tables = markdown_tables(read(path, root))
    if len(tables) < index:
        raise ValueError(f"{path} has {len(tables)} markdown table(s), not a table {index}")
    return tables[index - 1]


def relations_list(path: str, root: str = ROOT) -> list[str]:
    """relations.json as the bullet list the pages show: relation, verdict, the numbers it compared."""
    lines = []
    for r in load(path, root):
        if "verdict" in r:  # decided from the paired interval: holds, does not hold, or not separated
            verdict = {True: "**holds**", False: "**does not hold**"}.get(r["holds"], f"**{r['verdict']}**")
        else:
            verdict = "**holds**" if r["holds"] else "**does not hold**"
        lines.append(f"- {r['relation']}: {verdict} — {r['detail']}")
    return lines


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def row_cells(path: str, first: str, root: str = ROOT, column: int = 0, index: int = 1) -> list[str]:
    """The cells of the row of a file's table whose cell `column` equals `first`."""
    for line in file_table(path, index, root)[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[column] == first:
            return cells
    raise ValueError(f"no row {first!r} in {path}")


# ------------------------------------------------------------------------------ computed tables
def headline(root: str = ROOT) -> list[str]:
    """DE-CM against its teacher on each benchmark, from the tables of the result folders."""
    rows = []
    for name, path, student, teacher, note in [
        ("digits, quickstart (FID, 1 seed)", "analysis/results/quickstart/table.md",
         "student (chain)", "teacher (Euler)", "[digits](docs/results/digits.md)"),
        ("digits, 4× longer teacher (FID, 1 seed)", "analysis/results/quickstart-teacher8k/table.md",
         "student (chain)", "teacher (Euler)", "[digits](docs/results/digits.md)"),
        ("digits, every row tuned (FID, 3 seeds)", "analysis/results/ablation-digits-tuned/table.md",
         "DE-CM (full)", "teacher (Euler)", "[digits](docs/results/digits.md)"),
        ("2-D mixture, paper's protocol (SW₂, 3 seeds)", "analysis/results/ablation-toy2d/table.md",
         "DE-CM (full)", "teacher (Euler)", "[2-D](docs/results/toy2d.md)"),
    ]:
        column = 1 if "quickstart" in path else 0
        s = row_cells(path, student, root, column)[column + 1:]
        t = row_cells(path, teacher, root, column)[column + 1:]
        rows.append([name, s[0], s[1], s[2], t[3], note])
    return table(["benchmark", "DE-CM 1 NFE", "2 NFE", "4 NFE", "teacher, 50 Euler steps", "more"], rows)


STEP_LABELS = {
    "fm": "FM (velocity model, fused attention)",
    "cm": "L_cm: no-grad `torch.func.jvp` + with-grad forward (default)",
    "cm_fwad": "L_cm: forward-AD dual numbers, no grad + with-grad forward",
    "cm_dual": "L_cm: one with-grad dual forward (`forward_ad_grad`, FACM-style)",
    "cm_fd": "L_cm: float64 finite-difference JVP",
    "fm_term": "L_fm (student at s = t vs the teacher)",
    "n2n": "L_n2n",
    "decm": "full DE-CM, amortised (N2N every 3rd step)",
    "decm_dual": "full DE-CM with `forward_ad_grad`",
    "scm": "sCM-style L_cm",
    "meanflow": "MeanFlow",
}


def step_cost(root: str = ROOT) -> list[str]:
    """bench/step_cost.py's two CPU runs (CFG w = 1.5 and unguided) side by side, as ratios to an FM step."""
    guided = load("bench/results/step_cost-tiny-cpu.json", root)["results"]
    plain = load("bench/results/step_cost-tiny-cpu-w1.json", root)["results"]
    rows = []
    for key, label in STEP_LABELS.items():
        g, p = guided[key], plain[key]
        if key == "fm":
            cells = [f"1.00 ({g['seconds'] * 1e3:.0f} ms)", f"1.00 ({p['seconds'] * 1e3:.0f} ms)", "1.00", ""]
        else:
            memory = f"{g['memory_ratio']:.2f}"
            floor = f"{g['over_floor']:.2f} / {p['over_floor']:.2f}" if "over_floor" in g else ""
            cells = [f"{g['time_ratio']:.2f}", f"{p['time_ratio']:.2f}",
                     f"**{memory}**" if key in ("decm", "cm_dual") else memory, floor]
        rows.append([label] + cells)
    return table(["step", "× FM (w = 1.5)", "× FM (w = 1)", "memory × FM", "× its floor (w = 1.5 / 1)"], rows)


def sampling(root: str = ROOT) -> list[str]:
    """bench/sampling.py: samples per second of the student at 1/2/4 NFE and of the 50-step teacher."""
    res = load("bench/results/sampling-tiny-cpu.json", root)["results"]
    rows = [[name, f"{r['samples_per_s']:.1f}", f"{r['speedup_vs_teacher']:.1f}×"]
            for name, r in [("student, 1 NFE", res["student_nfe1"]), ("student, 2 NFE", res["student_nfe2"]),
                            ("student, 4 NFE", res["student_nfe4"]), ("teacher, 50 Euler steps (CFG)", res["teacher_nfe50"])]]
    return table(["sampler", "samples/s", "× the teacher"], rows)


def first_hop(root: str = ROOT) -> list[str]:
    """The first hop's local error with and without N2N, from error_accumulation's over-seeds table."""
    path = "analysis/results/error_accumulation-toy2d-3seeds/over_seeds.md"
    local = {}
    for line in file_table(path, 1, root)[2:]:
        run, nfe, hop, _, _, loc = [c.strip() for c in line.strip("|").split("|")]
        if hop == "1":
            local[(run, nfe)] = loc
    rows = [[nfe, local[("with N2N (DE-CM)", nfe)], local[("without N2N (FM + CD)", nfe)]] for nfe in ("2", "4", "8")]
    return table(["NFE", "with N2N (DE-CM)", "without (FM + CD)"], rows)


def step_parts(root: str = ROOT) -> list[str]:
    """The parts no step avoids (bench/step_cost.py) and the floors they set, as ratios to an FM step."""
    rows = []
    for label, path in [("w = 1.5", "bench/results/step_cost-tiny-cpu.json"), ("w = 1", "bench/results/step_cost-tiny-cpu-w1.json")]:
        data = load(path, root)
        parts, fm = data["parts_seconds"], data["results"]["fm"]["seconds"]
        ms = lambda k: f"{parts[k] * 1e3:.0f}"
        rows.append([label, ms("T"), ms("J"), ms("J_pytorch"), ms("W"), ms("O"), f"{parts['J'] / fm:.2f}",
                     f"{data['results']['cm']['floor_seconds'] / fm:.1f}", f"{data['results']['decm']['floor_seconds'] / fm:.1f}"])
    return table(["teacher guidance", "T (ms)", "J (ms)", "J, PyTorch's own tangent rules (ms)", "W (ms)", "O (ms)",
                  "J ÷ FM step", "L_cm floor ÷ FM step", "DE-CM floor ÷ FM step"], rows)


def memory_totals(root: str = ROOT) -> list[str]:
    """Predicted peak per GPU during the step at scale (bench/memory.py's computed rows, bf16 autocast): DDP,
    FSDP with the teacher sharded and a reduce-scatter per term, and FSDP if gradients stayed unsharded."""
    rows = {}
    for r in load("bench/results/memory.json", root)["rows"]:
        if r["kind"] != "computed" or r.get("precision") != "bf16":
            continue
        cell = rows.setdefault((r["preset"], r["world"], r["batch_per_rank"]), {})
        cell[r["mode"]] = f"{r['predicted']['peak'] / 1e9:.1f}"
        if r.get("predicted_if_fsdp_grads_unsharded"):
            cell["unsharded"] = f"{r['predicted_if_fsdp_grads_unsharded']['peak'] / 1e9:.1f}"
    return table(["model", "GPUs", "batch per GPU", "DDP: GB", "FSDP: GB", "FSDP, grads unsharded: GB"],
                 [[p, str(w), str(b), v.get("ddp", "—"), v.get("fsdp+st", "—"), v.get("unsharded", "—")]
                  for (p, w, b), v in rows.items()])


def install(root: str = ROOT) -> list[str]:
    """bench/install_size.py's measurement: the pinned venv by package group and the torch wheels."""
    data = load("bench/results/install.json", root)
    sizes = data["sizes"]["site_packages_bytes"]
    gb = lambda n: f"{n / 1e9:.2f} GB"
    rows = [[f"the pinned venv (torch {data['torch']['version']}), all", gb(data["sizes"]["total_bytes"])]]
    names = {"torch": "… of which torch", "nvidia_cuda": "… NVIDIA CUDA libraries (`nvidia-*`, `cuda-*`)",
             "triton": "… triton (GPU kernel compiler)", "other": "… every other package"}
    rows += [[names[k], gb(v)] for k, v in sizes.items()]
    for w in data["wheels"]:
        rows.append([f"wheel `{w['file']}`: download / unpacked", f"{gb(w['download_bytes'])} / {gb(w['unpacked_bytes'])}"])
    return table(["what", "size"], rows)


def mutations(root: str = ROOT) -> list[str]:
    """bench/mutations.py's result: each realistic bug, where it was put, and the test that caught it
    (or why it survives)."""
    data = load("bench/results/mutations.json", root)
    rows = []
    for r in data["mutations"]:
        first = r["first_failure"]
        if r["status"] != "caught":
            detail = r["explained"] or ""
        elif first.startswith(("FAILED ", "ERROR ")):
            detail = f"`{first.split(' - ')[0].split(' ', 1)[1].split('::')[-1]}`"
        else:  # a run that recorded only pytest's summary line: name the covering files
            detail = "a test of " + ", ".join(sorted({f"`{t.split('::')[0].split('/')[-1]}`" for t in r["tests"]}))
        rows.append([r["what"], f"`{r['path']}`", r["status"], detail])
    return table(["bug", "file", "status", "first failing test, or why it survives"], rows)


def paper_path(root: str = ROOT) -> list[str]:
    """bench/paper_path.py at real width on CPU: each stage's wall time and peak memory, and the peak the
    full depth would need (bench/results/paper_path-full-depth-estimate.json)."""
    run = load("bench/results/paper_path-cpu.json", root)
    estimate = load("bench/results/paper_path-full-depth-estimate.json", root)["stages"]
    rows = []
    for name, r in run["stages"].items():
        full = estimate.get(name, {}).get("peak_rss_gib_full_depth")
        rows.append([name, f"{r['wall_s']:.1f}", f"{r['peak_rss_gib']:.2f}", f"{full:.1f}" if full is not None else "—"])
    return table(["stage", "wall s", f"peak GiB (depth {run['depth']} of 28)", "peak GiB at depth 28 (estimate)"], rows)


def xl_cpu(root: str = ROOT) -> list[str]:
    """bench/xl_cpu.py at real size on CPU: per configuration the tensor peak per rank during the step against
    decm.memory's prediction, the RSS peak, the step time and the JVP's error against the float64 central
    difference (bench/results/xl_cpu*.json, every file that exists; `--depth` files have fewer blocks at the
    real width)."""
    gib = lambda b: f"{b / 2 ** 30:.2f}"
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "bench", "results", "xl_cpu*.json"))):
        if path.endswith("-reduced.json"):
            continue
        data = load(os.path.relpath(path, root), root)
        for r in data["rows"]:
            status = r["status"].split(":")[0] if r["status"] == "ok" or ":" not in r["status"] else (
                "killed (out of memory)" if "SIGKILL" in r["status"] else r["status"].split(":")[0])
            jvp = next((x["jvp_check"]["relative_error"] for x in r.get("ranks", []) if "jvp_check" in x), None)
            rows.append([r["model"], str(data.get("depth") or 28), r["config"], os.path.basename(path), status,
                         gib(r["peak"]) if "peak" in r else "—", gib(r["predicted"]["peak"]) if "predicted" in r else "—",
                         f"{r['peak_over_predicted']:.3f}" if "peak_over_predicted" in r else "—",
                         gib(max(r["rss_peak_per_rank"])) if "rss_peak_per_rank" in r else "—",
                         f"{sum(r['step_seconds']) / len(r['step_seconds']):.0f}" if "step_seconds" in r else "—",
                         f"{jvp:.1e}" if jvp is not None else "—"])
    return table(["model", "blocks", "config", "file", "status", "tensor peak GiB/rank", "predicted GiB/rank",
                  "measured ÷ predicted", "RSS peak GiB/rank", "step s", "JVP vs float64 FD (rel.)"], rows)


def _gpu_rows(root: str):
    """(file name, row) of every configuration in bench/results/gpu-*.json (bench/gpu_check.sh on CUDA)."""
    for path in sorted(glob.glob(os.path.join(root, "bench", "results", "gpu-*.json"))):
        for r in load(os.path.relpath(path, root), root).get("rows", []):
            yield os.path.basename(path), r


def gpu_check(root: str = ROOT) -> list[str]:
    """bench/gpu_check.sh on CUDA: per model and precision the throughput, the mean step time (the first,
    warm-up step left out), the peak allocated memory during the step against decm.memory's prediction
    and the JVP's error against the float64 central difference (as run / with TF32 off)."""
    rows = []
    for name, r in _gpu_rows(root):
        if "peak" not in r:
            rows.append([r["model"], r["config"], name, r["status"].split(":")[0]] + ["—"] * 6)
            continue
        jc, timed = r.get("jvp_check"), r["step_seconds"][1:] or r["step_seconds"]
        jvp = "—" if jc is None else f"{jc['relative_error']:.1e}" + (
            f" / {jc['without_tf32']['relative_error']:.1e}" if "without_tf32" in jc else " / not run")
        rows.append([r["model"], r["config"], name, r["status"].split(":")[0], f"{r['images_per_second']:.1f}",
                     f"{sum(timed) / len(timed):.2f}", f"{r['peak'] / 2 ** 30:.2f}",
                     f"{r['predicted']['peak'] / 2 ** 30:.2f}", f"{r['peak_over_predicted']:.3f}", jvp])
    return table(["model", "config", "file", "status", "img/s", "step s", "peak GiB", "predicted GiB",
                  "measured ÷ predicted", "JVP vs float64 FD, rel. (as run / TF32 off)"], rows)


def gpu_passes(root: str = ROOT) -> list[str]:
    """bench/gpu_check.sh on CUDA: median milliseconds of each pass of a step (F no-grad forward, J the
    no-grad JVP of L_cm, W with-grad forward + backward, T the CFG teacher call, an FM step, an L_cm step),
    J in forwards, the L_cm ÷ FM step ratio, J with TF32 allowed (where measured) and how far its tangent
    moved, and the attention kernel of F / J / W."""
    rows = []
    for name, r in _gpu_rows(root):
        pa = r.get("passes")
        if not pa:
            continue
        ms = lambda k: f"{pa['seconds'][k] * 1e3:.0f}"
        tf32 = pa.get("jvp_tf32")
        rows.append([r["model"], r["config"], name, ms("forward"), ms("jvp"), ms("with_grad"), ms("teacher_cfg"),
                     ms("fm_step"), ms("cm_step"), f"{pa['jvp_in_forwards']:.1f}", f"{pa['cm_step_over_fm_step']:.2f}",
                     f"{tf32['seconds'] * 1e3:.0f} ({tf32['relative_difference']:.0e})"
                     if tf32 and tf32.get("relative_difference") is not None else "—",
                     " / ".join(", ".join(pa["attention"][k]) or "—" for k in ("forward", "jvp", "with_grad"))])
    return table(["model", "config", "file", "F ms", "J ms", "W ms", "T ms", "FM step ms", "L_cm step ms", "J ÷ F",
                  "L_cm ÷ FM step", "J with TF32 ms (tangent rel. change)", "attention: F / J / W"], rows)


GENERATED = {"gpu_check": gpu_check, "gpu_passes": gpu_passes, "xl_cpu": xl_cpu, "paper_path": paper_path, "headline": headline, "step_cost": step_cost, "step_parts": step_parts, "sampling": sampling,
             "memory_totals": memory_totals, "first_hop": first_hop, "install": install, "mutations": mutations}


# --------------------------------------------------------------------------------------- pages
def pages(root: str = ROOT) -> list[str]:
    """README.md and every Markdown page under docs/, as paths relative to the repository root."""
    found = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True))
    return ["README.md"] + found


def block_for(kind: str, arg: str, index: int, root: str = ROOT) -> list[str]:
    if kind == "table":
        if not arg.startswith(("analysis/results/", "bench/results/")):
            raise ValueError(f"{arg} is not under analysis/results/ or bench/results/")
        return file_table(arg, index, root)
    if kind == "relations":
        return relations_list(arg, root)
    if arg not in GENERATED:
        raise ValueError(f"unknown generated table {arg!r} (known: {', '.join(GENERATED)})")
    return GENERATED[arg](root)


def render(text: str, root: str = ROOT) -> tuple[str, list[str]]:
    """The text with every marked block replaced from its file, and one problem per marker that failed."""
    lines, out, problems, i = text.splitlines(), [], [], 0
    while i < len(lines):
        out.append(lines[i])
        m = MARKER.fullmatch(lines[i].strip())
        i += 1
        if not m:
            continue
        kind, arg, index = m.group(1), m.group(2), int(m.group(3) or 1)
        start = "- " if kind == "relations" else "|"
        end = i
        while end < len(lines) and (lines[end].lstrip().startswith(start) or
                                    (kind == "relations" and end > i and lines[end].startswith("  "))):
            end += 1
        try:
            out.extend(block_for(kind, arg, index, root))
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"line {i}: {kind} {arg}: {e}")
            out.extend(lines[i:end])
        i = end
    return "\n".join(out) + ("\n" if text.endswith("\n") else ""), problems


def marked_blocks(text: str) -> str:
    """The lines of the blocks that follow markers: generated from files, so their numbers are sources too."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if MARKER.fullmatch(line.strip()):
            j = i + 1
            while j < len(lines) and lines[j].strip().startswith(("|", "- ")):
                out.append(lines[j])
                j += 1
    return "\n".join(out)


def prose(text: str) -> str:
    """The text without code blocks, inline code, HTML comments, tables and link targets."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("|"))


def source_numbers(paths: list[str], root: str = ROOT) -> list[float]:
    """Every number written in the named result files (folders: every text file under them)."""
    numbers = []
    for p in paths:
        full = os.path.join(root, p)
        files = [full] if os.path.isfile(full) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.endswith(TEXT_SUFFIXES))
        for f in files:
            with open(f, errors="replace") as fh:
                numbers.extend(float(x) for x in ANY_NUMBER.findall(fh.read().replace(",", "")))
    return numbers


def is_pattern(text: str, end: int) -> bool:
    """Whether the path ending at `end` goes on as a pattern (`step_cost-*.json`, `<name>/`), not a file."""
    rest = re.match(r"[^\s`)\]|,;]*", text[end:]).group(0)
    return any(c in rest for c in "*<{…")


def unsupported_numbers(text: str, root: str = ROOT) -> list[str]:
    """The prose numbers of a page that no result file it names holds at the precision written."""
    sources = sorted({m.group(0) for m in SOURCE_PATH.finditer(text) if not is_pattern(text, m.end())})
    missing = [s for s in sources if not os.path.exists(os.path.join(root, s))]
    sources, missing = [s for s in sources if s not in missing], [s for s in missing if not s.startswith("gin/")]
    known = source_numbers(sources, root)
    known += [float(x) for x in ANY_NUMBER.findall(marked_blocks(text).replace(",", ""))]
    declared = {n for m in OUTSIDE.finditer(text) for n in m.group(1).split() if ANY_NUMBER.fullmatch(n)}
    problems = [f"{s} does not exist" for s in missing]
    for token in PROSE_NUMBER.findall(prose(text)):
        if token in declared:
            continue
        value = float(token.replace(",", ""))
        decimals = len(token.split(".")[1]) if "." in token else 0
        tolerance = 0.5 * 10 ** -decimals + 1e-9
        if not any(abs(abs(x) - value) <= tolerance for x in known):
            problems.append(f"{token} is in no result or gin file the page names")
    return problems


def atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fill the marked result tables of README.md and docs/ from the "
                                            "committed result files, or check that they are up to date.")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if a table is stale or a prose number is in no named result file")
    args = p.parse_args(argv)
    failed = False
    for page in pages():
        text = read(page)
        new, problems = render(text)
        problems += [f"number {n}" for n in unsupported_numbers(new)]
        for problem in problems:
            print(f"{page}: {problem}", file=sys.stderr)
        failed |= bool(problems)
        if new != text:
            if args.check:
                print(f"{page}: stale (run python docs/build_results.py)", file=sys.stderr)
                failed = True
            else:
                atomic_write(os.path.join(ROOT, page), new)
                print(f"updated {page}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
