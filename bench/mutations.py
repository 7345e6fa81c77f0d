"""Mutation check: how strong are the tests? One realistic bug at a time, run against the tests that cover it.

Each mutation replaces an exact snippet of the source (it must occur exactly `count` times) in a fresh copy
of the working tree (git's tracked and untracked-but-not-ignored files), then runs the covering test files
with `pytest -x` in that copy (PYTHONPATH = the copy, so `decm` is imported from it). A mutation is

- caught: the tests fail (pytest exit 1) or hang past the time limit;
- survived: the tests pass. A survivor is either killed by a new test or explained in the list below
  (`explained`: why no test should or can catch it, e.g. an equivalent mutant);
- error: the copy could not be tested (another pytest exit code, e.g. no tests collected).

Before the mutations, every distinct set of covering tests runs once on the unmutated copy and must pass.

    python bench/mutations.py                 # all mutations, writes bench/results/mutations.json
    python bench/mutations.py --only heun_to_euler renoise_to_current_time
    python bench/mutations.py --list          # the list, no runs

Not part of the default test suite (≈ 10–20 minutes on 2 cores); `tests/test_mutations.py` checks that every
mutation still applies to the current source and that the committed result covers the list with no
unexplained survivor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "bench", "results", "mutations.json")

# The covering tests: whole files where they are quick, else the tests of the file that exercise the code.
REGISTRY_METHOD = ("tests/test_registry.py::test_losses_from_gin_are_finite_per_sample",
                   "tests/test_registry.py::test_selectors_from_gin")
LOSS_TESTS = ("tests/test_fidelity.py", "tests/test_method.py") + REGISTRY_METHOD
SAMPLER_TESTS = ("tests/test_sampling.py", "tests/test_fidelity.py",
                 "tests/test_registry.py::test_samplers_return_finite_samples")
GUIDANCE_TESTS = ("tests/test_fidelity.py", "tests/test_method.py")
CHECKPOINT_TESTS = ("tests/test_checkpoint.py", "tests/test_faults.py::test_corrupt_checkpoints_fall_back_to_the_newest_valid_and_delete_nothing",
                    "tests/test_faults.py::test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous",
                    "tests/test_pipeline.py::test_resume_is_bit_identical_to_uninterrupted")
EVAL_TESTS = ("tests/test_evaluate.py::test_generation_is_identical_for_any_world_size",
              "tests/test_evaluate.py::test_tune_and_final_reference_halves_are_disjoint_and_bad_parts_are_refused",
              "tests/test_evaluate.py::test_evaluate_scores_against_the_reference_part_it_is_given",
              "tests/test_evaluate.py::test_sample_noise_is_a_function_of_the_seed_and_the_sample_index",
              "tests/test_evaluate.py::test_fid_equals_an_independent_frechet_distance_and_torch_fidelity_itself",
              "tests/test_registry.py::test_metrics_vanish_on_identical_samples",
              "tests/test_registry.py::test_energy_distance_and_sliced_wasserstein_by_hand")


def m(name, path, old, new, tests, what, count=1, explained=None):
    return {"name": name, "path": path, "old": old, "new": new, "tests": list(tests), "what": what,
            "count": count, "explained": explained}


MUTATIONS = [
    # --- the CM loss (FACM / sCM targets and reduction)
    m("scm_norm_over_batch", "decm/method/losses.py",
      "norm = norm / math.sqrt(g[0].numel())", "norm = norm / math.sqrt(g.numel())", LOSS_TESTS,
      "sCM RMS norm over the whole batch instead of per sample"),
    m("facm_alpha_inverted", "decm/method/losses.py",
      "alpha = 1 - t.clamp_min(0) ** self.alpha_power", "alpha = t.clamp_min(0) ** self.alpha_power", LOSS_TESTS,
      "FACM α(t) = t^p instead of 1 − t^p"),
    m("facm_clamp_removed", "decm/method/losses.py",
      "bcast(alpha, x) * g.clamp(-self.clamp, self.clamp)", "bcast(alpha, x) * g", LOSS_TESTS,
      "FACM's clamp of g removed"),
    m("logvar_without_u", "decm/method/losses.py",
      "err = torch.exp(-u) * err + u", "err = torch.exp(-u) * err", LOSS_TESTS,
      "learned log-variance weighting without + u"),
    m("cm_weight_before_normalise", "decm/method/losses.py",
      "        if self.robust_c > 0:\n            err = robust(err, self.robust_c, self.robust_q)\n"
      "        if self.weighting == \"cos\":\n            err = torch.cos(0.5 * math.pi * t).to(err) * err\n",
      "        if self.weighting == \"cos\":\n            err = torch.cos(0.5 * math.pi * t).to(err) * err\n"
      "        if self.robust_c > 0:\n            err = robust(err, self.robust_c, self.robust_q)\n",
      LOSS_TESTS, "CM time weight applied before the robust normalisation (FACM normalises first)"),
    m("cm_jvp_span_t", "decm/method/losses.py",
      "g = f_minus - (v + warm * bcast(1 - t, x) * df_dt)", "g = f_minus - (v + warm * bcast(t, x) * df_dt)",
      LOSS_TESTS, "CM target uses t instead of (1 − t) in front of dF/dt"),
    m("cm_tangent_no_time", "decm/method/losses.py",
      "f_minus, df_dt = ctx.jvp(x, t, s, v, torch.ones_like(t), torch.zeros_like(s))",
      "f_minus, df_dt = ctx.jvp(x, t, s, v, torch.zeros_like(t), torch.zeros_like(s))", LOSS_TESTS,
      "CM JVP tangent without the ∂/∂t component"),
    m("robust_without_stop_gradient", "decm/method/losses.py",
      "return err / (err.detach() + c) ** q", "return err / (err + c) ** q", LOSS_TESTS,
      "robust normalisation without the stop-gradient on its denominator (same value, other gradient)"),
    # --- FM, N2N, MeanFlow
    m("fm_cosine_sign", "decm/method/losses.py",
      "err = err + self.cosine_weight * (1 - cos)", "err = err + self.cosine_weight * (1 + cos)", LOSS_TESTS,
      "FM cosine term 1 + cos instead of 1 − cos"),
    m("n2n_lambda_dropped", "decm/method/losses.py",
      "g = (self.lam + self.gamma) * f_minus", "g = self.gamma * f_minus", LOSS_TESTS,
      "N2N residual with γ·F⁻ instead of (λ + γ)·F⁻"),
    m("n2n_vpsi_at_source", "decm/method/losses.py",
      "x_pred = x + bcast(t - r, x) * f_minus", "x_pred = x", LOSS_TESTS,
      "N2N second teacher call at the source point instead of the predicted end point"),
    m("n2n_tangent_sign", "decm/method/n2n.py",
      "return gamma * v, torch.full_like(r, gamma), torch.full_like(r, -lam)",
      "return gamma * v, torch.full_like(r, gamma), torch.full_like(r, lam)", LOSS_TESTS,
      "derived N2N tangent with +λ on ∂ₜ"),
    m("meanflow_span_sign", "decm/method/losses.py",
      "return x, v + bcast(s - t, x) * df_dt", "return x, v + bcast(t - s, x) * df_dt", LOSS_TESTS,
      "MeanFlow target with (t − s) instead of (s − t)"),
    m("interpolant_swapped", "decm/method/objective.py",
      "x = (1 - tb) * self.z + tb * self.x1", "x = tb * self.z + (1 - tb) * self.x1", LOSS_TESTS,
      "x_t with noise and data swapped (t = 0 data)"),
    m("nan_mask_target_zero", "decm/method/objective.py",
      "target = torch.where(bcast(bad, target).bool(), pred.detach(), torch.nan_to_num(target))",
      "target = torch.where(bcast(bad, target).bool(), torch.zeros_like(pred), torch.nan_to_num(target))",
      LOSS_TESTS + ("tests/test_nan.py",), "masked samples' target set to 0 instead of sg(prediction)"),
    m("fd_jvp_one_sided_scale", "decm/method/jvp.py",
      "tangent_out = (call(*plus) - call(*minus)) / (2 * eps)", "tangent_out = (call(*plus) - call(*minus)) / eps",
      LOSS_TESTS, "finite-difference JVP divided by eps instead of 2·eps"),
    m("n2n_t_max_ignored", "decm/method/selectors.py",
      "t = r + (self.t_max - r) * u", "t = r + (1.0 - r) * u", LOSS_TESTS,
      "noise_to_noisy.t_max accepted and ignored"),
    # --- guidance
    m("cfg_scale_off_by_one", "decm/method/guidance.py",
      "guided = v_cond + (self.scale - 1.0) * factor * delta", "guided = v_cond + self.scale * factor * delta",
      GUIDANCE_TESTS, "CFG v_c + w·Δ instead of v_c + (w − 1)·Δ"),
    m("cfg_interval_inverted", "decm/method/guidance.py",
      "return torch.where(inside, guided, v_cond)", "return torch.where(inside, v_cond, guided)", GUIDANCE_TESTS,
      "CFG applied outside the guidance interval instead of inside"),
    m("cfg_clip_never_limits", "decm/method/guidance.py",
      "clamp_min(1e-12), max=1.0)", "clamp_min(1e-12), min=1.0)", GUIDANCE_TESTS,
      "CFG norm clip factor clamped from below instead of above"),
    m("cfg_null_label_is_the_label", "decm/method/guidance.py",
      "y_null = torch.full_like(y, null)", "y_null = y", GUIDANCE_TESTS,
      "CFG unconditional pass with the conditional labels"),
    # --- samplers
    m("heun_to_euler", "decm/sampling.py",
      "x = x + (b - a) * 0.5 * (va + vb)", "x = x + (b - a) * va", SAMPLER_TESTS,
      "teacher Heun step turned into Euler"),
    m("renoise_to_current_time", "decm/sampling.py",
      "x = b * x_hat + (1 - b) * eps", "x = a * x_hat + (1 - a) * eps", SAMPLER_TESTS,
      "CM re-noise to the current time instead of the next"),
    m("chain_instant_velocity", "decm/sampling.py",
      "x = x + (b - a) * net(x, ta, tb, y)", "x = x + (b - a) * net(x, ta, ta, y)", SAMPLER_TESTS,
      "chain hop with F(x, t, t) instead of F(x, t_k, t_{k+1})"),
    m("one_step_wrong_end", "decm/sampling.py",
      "return z + net(z, t0, t1, y)", "return z + net(z, t0, t0, y)", SAMPLER_TESTS,
      "one-step sampler calls F(z, 0, 0)"),
    m("time_grid_shift_inverted", "decm/sampling.py",
      "warped = u / (u + shift * (1 - u))", "warped = u / (shift * u + (1 - u))", SAMPLER_TESTS,
      "timestep shift applied as 1/shift"),
    m("euler_instant_hop", "decm/sampling.py",
      "x = x + (b - a) * net(x, ta, ta, y)", "x = x + (b - a) * net(x, ta, torch.full_like(ta, b), y)",
      SAMPLER_TESTS, "Euler on F(x, t, t) uses the hop F(x, t_k, t_{k+1})"),
    # --- checkpoints
    m("keep_last_deletes_newest", "decm/checkpoint.py",
      "for old in valid[keep_last:]:", "for old in valid[:-keep_last]:", CHECKPOINT_TESTS,
      "keep_last removes the newest checkpoints instead of the oldest"),
    m("resume_from_oldest", "decm/checkpoint.py",
      "key=lambda e: (-e[0], e[1])", "key=lambda e: (e[0], e[1])", CHECKPOINT_TESTS,
      "resume from the oldest valid checkpoint"),
    m("sentinel_size_unchecked", "decm/checkpoint.py",
      "if actual != size:", "if False:", CHECKPOINT_TESTS,
      "a checkpoint whose size differs from its sentinel counts as valid"),
    # --- evaluation
    m("evaluate_ignores_reference_part", "decm/eval/evaluate.py",
      "draw_reference(dataset, n_samples, seed, reference_part)", "draw_reference(dataset, n_samples, seed, 'all')",
      EVAL_TESTS, "evaluate() ignores reference_part (always 'all')", count=2),
    m("noise_not_per_index", "decm/eval/evaluate.py",
      "np.random.SeedSequence([seed, int(i)])", "np.random.SeedSequence([seed])", EVAL_TESTS,
      "every sample index draws the same noise"),
    m("energy_distance_cross_term", "decm/eval/metrics.py",
      "return float(2 * torch.cdist(x, y).mean()", "return float(torch.cdist(x, y).mean()", EVAL_TESTS,
      "energy distance without the factor 2 on the cross term"),
    m("sw2_unsorted", "decm/eval/metrics.py",
      "py, _ = torch.sort(y.double() @ theta, dim=0)", "py = y.double() @ theta", EVAL_TESTS,
      "sliced W₂ without sorting the reference projections"),
]


def source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


def copy_tree(dest: str, files: list[str]) -> None:
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


def check_applies(mutation: dict, root: str = ROOT) -> str | None:
    """None when the mutation's snippet occurs exactly `count` times in its file, else the reason."""
    path = os.path.join(root, mutation["path"])
    if not os.path.isfile(path):
        return f"{mutation['path']} does not exist"
    found = open(path, encoding="utf-8").read().count(mutation["old"])
    return None if found == mutation["count"] else f"snippet found {found} times in {mutation['path']} (expected {mutation['count']})"


def apply(mutation: dict, root: str) -> None:
    path = os.path.join(root, mutation["path"])
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(mutation["old"], mutation["new"]))


def run_tests(root: str, tests: list[str], timeout_s: int) -> tuple[int | str, float, str]:
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               WANDB_MODE="disabled", PYTHONDONTWRITEBYTECODE="1")
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests], cwd=root,
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    first = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))][:1]
    last = proc.stdout.strip().splitlines()[-1:]
    return proc.returncode, time.time() - start, (first or last or [""])[0]


def verdict(code) -> str:
    if code == "timeout" or code == 1:
        return "caught"
    return "survived" if code == 0 else "error"


def main(argv=None) -> int:
    sys.path.insert(0, ROOT)
    from decm import cli

    ap = cli.parser("python bench/mutations.py", __doc__)
    ap.add_argument("--only", nargs="+", help="mutation names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    ap.add_argument("--out", default=RESULT, help="result JSON (merged with an existing one for --only)")
    args = ap.parse_args(argv)
    names = {x["name"] for x in MUTATIONS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        print(f"error: unknown mutation(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    chosen = [x for x in MUTATIONS if not args.only or x["name"] in args.only]
    if args.list:
        for x in chosen:
            print(f"{x['name']:32s} {x['path']:26s} {x['what']}")
        return 0
    stale = [(x["name"], check_applies(x)) for x in chosen if check_applies(x)]
    if stale:
        for name, why in stale:
            print(f"error: mutation {name}: {why}", file=sys.stderr)
        return 2
    files = source_files()
    results = {}
    if args.only and os.path.isfile(args.out):
        results = {r["name"]: r for r in json.load(open(args.out))["mutations"]}
    with tempfile.TemporaryDirectory(prefix="decm-mut-") as tmp:
        clean = os.path.join(tmp, "clean")
        copy_tree(clean, files)
        for tests in sorted({tuple(x["tests"]) for x in chosen}):
            code, secs, tail = run_tests(clean, list(tests), args.timeout)
            print(f"baseline {' '.join(tests)}: exit {code} ({secs:.0f} s)", flush=True)
            if code != 0:
                print(f"error: the covering tests fail without a mutation: {tail}", file=sys.stderr)
                return 1
        total = len(chosen)
        t0 = time.time()
        for k, x in enumerate(chosen, 1):
            work = os.path.join(tmp, x["name"])
            shutil.copytree(clean, work)
            apply(x, work)
            code, secs, tail = run_tests(work, x["tests"], args.timeout)
            shutil.rmtree(work, ignore_errors=True)
            status = verdict(code)
            results[x["name"]] = {"name": x["name"], "path": x["path"], "what": x["what"], "tests": x["tests"],
                                  "status": status, "pytest_exit": code, "seconds": round(secs, 1),
                                  "first_failure": tail if status == "caught" else "", "explained": x["explained"]}
            eta = (time.time() - t0) / k * (total - k)
            print(f"[{k}/{total}, ETA {eta / 60:.0f} min] {x['name']:32s} {status:8s} ({secs:.0f} s) {tail}", flush=True)
    ordered = [results[x["name"]] for x in MUTATIONS if x["name"] in results]
    summary = {s: sum(r["status"] == s for r in ordered) for s in ("caught", "survived", "error")}
    summary["unexplained_survivors"] = [r["name"] for r in ordered if r["status"] == "survived" and not r["explained"]]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump({"summary": summary, "mutations": ordered}, f, indent=2)
    os.replace(tmp_out, args.out)
    print(f"\n{summary['caught']} caught, {summary['survived']} survived "
          f"({len(summary['unexplained_survivors'])} unexplained), {summary['error']} errors → {args.out}")
    return 0 if not summary["unexplained_survivors"] and not summary["error"] else 1


if __name__ == "__main__":
    sys.exit(main())
