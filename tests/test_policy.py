"""A policy of one's own, as the README's "Add your own policy" shows it: the example is taken from
README.md as written, registered, checked by schedule() on random batches, and trained through train.py,
where it must give the losses of any other schedule (here naive's)."""
import os
import re
import runpy

import numpy as np
import pytest
import torch

import scheduler

from conftest import ROOT, train_all


def readme_policy(tmp_path):
    """The README's example policy file, written to tmp_path/my_policy.py; returns (path, its name)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Add your own policy", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "my_policy.py"
    path.write_text(code)
    name = runpy.run_path(str(path))["schedule"]  # registers it in scheduler.POLICIES, as train.py will
    return path, name


def test_readme_policy_makes_valid_plans(tmp_path):
    path, name = readme_policy(tmp_path)
    try:
        assert name in scheduler.POLICIES and name not in ("naive", "sorted", "dacp", "skrull", "skrull_plus")
        rng = np.random.default_rng(0)
        for dp, cp, C in [(1, 1, 4096), (2, 1, 4096), (1, 2, 2048), (2, 4, 1024), (3, 2, 512)]:
            for _ in range(20):
                lengths = rng.integers(1, C if cp == 1 else 2 * (C * cp // (2 * cp)), size=int(rng.integers(1, 40)))
                scheduler.schedule(lengths.tolist(), dp=dp, cp=cp, bucket_size=C, policy=name)  # validates the plan
    finally:
        scheduler.POLICIES.pop(name, None)


@pytest.mark.slow
def test_readme_policy_trains_like_naive(tmp_path, dataset):
    path, name = readme_policy(tmp_path)
    scheduler.POLICIES.pop(name, None)
    mine, naive = train_all((tmp_path / "mine", dataset, dict(nproc=2, configs=[path], cp=2, max_iters=2,
                                                              checkpoint_interval=2)),
                            (tmp_path / "naive", dataset, dict(schedule="naive", max_iters=2)))
    from checkpoint import latest, read_metadata
    assert read_metadata(latest(str(tmp_path / "mine")))["config"]["schedule"] == name  # the policy the file registered
    assert [m["tokens"] for m in mine] == [m["tokens"] for m in naive]  # the same global batches
    torch.testing.assert_close(torch.tensor([m["loss"] for m in mine]), torch.tensor([m["loss"] for m in naive]),
                               rtol=1e-5, atol=1e-6)
