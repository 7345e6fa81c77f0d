"""The mutation check (bench/mutations.py) stays usable and its committed result stays complete.

Running the mutations takes minutes, so the suite checks what can go stale cheaply: every listed mutation
still applies to the current source (its snippet occurs the stated number of times), and the committed
result in bench/results/mutations.json covers the whole list, caught or explained, with no error.
"""

import json
import os

from conftest import load_bench

mutations = load_bench("mutations")

MUST_BE_CAUGHT = {"scm_norm_over_batch", "facm_alpha_inverted", "facm_clamp_removed", "logvar_without_u",
                  "heun_to_euler", "renoise_to_current_time", "evaluate_ignores_reference_part"}


def test_every_mutation_applies_to_the_current_source():
    assert len(mutations.MUTATIONS) >= 25
    names = [x["name"] for x in mutations.MUTATIONS]
    assert len(set(names)) == len(names)
    stale = {x["name"]: why for x in mutations.MUTATIONS if (why := mutations.check_applies(x))}
    assert not stale, stale
    for x in mutations.MUTATIONS:
        assert x["old"] != x["new"] and all(os.path.isfile(t.split("::")[0]) for t in x["tests"]), x["name"]


def test_the_committed_result_covers_the_list_with_no_unexplained_survivor():
    result = json.load(open(mutations.RESULT))
    by_name = {r["name"]: r for r in result["mutations"]}
    assert set(by_name) == {x["name"] for x in mutations.MUTATIONS}
    for name, r in by_name.items():
        assert r["status"] in ("caught", "survived"), (name, r["status"])
        if r["status"] == "survived":
            assert r["explained"], f"{name} survived the tests and has no explanation"
    assert all(by_name[n]["status"] == "caught" for n in MUST_BE_CAUGHT)
    assert result["summary"]["unexplained_survivors"] == []


def test_a_stale_mutation_is_reported_not_applied(tmp_path):
    x = dict(mutations.MUTATIONS[0], old="this text is not in the file")
    assert "found 0 times" in mutations.check_applies(x)
    assert mutations.verdict(1) == "caught" and mutations.verdict(0) == "survived" and mutations.verdict(5) == "error"
