"""Golden tests: the plans of every policy and the per-step losses of fixed runs, pinned in tests/golden/
by tests/golden/make_golden.py. A change meant to keep behaviour (a refactor) must pass them unchanged."""
import json
import os

import pytest
import torch

from golden.make_golden import HERE, LOSS_RUNS, cost_model, encode, run_losses
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
@pytest.mark.parametrize("name", list(LOSS_RUNS))
def test_losses_unchanged(tmp_path, name, free_port):
    want = json.load(open(os.path.join(HERE, "losses.json")))[name]
    got = run_losses(name, str(tmp_path / name), free_port())
    assert [e is None for e in got["eval_loss"]] == [e is None for e in want["eval_loss"]]
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(want["loss"]), rtol=1e-5, atol=2e-6)
    evals = [(g, w) for g, w in zip(got["eval_loss"], want["eval_loss"]) if w is not None]
    torch.testing.assert_close(torch.tensor([g for g, _ in evals]), torch.tensor([w for _, w in evals]), rtol=1e-5, atol=2e-6)
