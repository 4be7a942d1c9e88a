"""Golden tests: the plans of every policy and the per-step losses of the README's CPU run, pinned in
tests/golden/ by tests/golden/make_golden.py (the losses of two runs tests/test_train.py makes anyway are
pinned there too, and checked where those runs happen). A change meant to keep behaviour (a refactor) must
pass them unchanged."""
import json
import os

import pytest

from conftest import assert_golden
from golden.make_golden import HERE, cost_model, encode, run_cpu_config
import skrull_plus  # noqa: F401  registers "skrull_plus"
from scheduler import schedule


def test_plans_unchanged():
    cases = json.load(open(os.path.join(HERE, "plans.json")))
    assert len(cases) == 54
    for case in cases:
        for policy, want in case["plans"].items():
            got = schedule(case["lengths"], dp=case["dp"], cp=case["cp"], bucket_size=case["bucket_size"],
                           policy=policy, cost=cost_model(case["cost"]), seed=case["seed"])
            assert encode(got) == want, (policy, {k: case[k] for k in ("dp", "cp", "bucket_size", "cost", "seed")})


@pytest.mark.slow
def test_cpu_run_losses_unchanged(tmp_path):
    """The README's `python train.py config/long_sft_cpu.py`, its first 20 steps and the eval after them."""
    assert_golden("cpu_config", run_cpu_config(str(tmp_path / "cpu")))
