"""Write tests/golden/*.json from the code as it is now: the plans every policy makes on fixed batches,
and the per-step losses of fixed training runs. tests/test_golden.py compares the code against them, so
a change that should not alter plans or losses (a refactor) proves it. Rerun this only when a change is
meant to alter them, and say so in the commit.

    python tests/golden/make_golden.py plans
    python tests/golden/make_golden.py losses      (runs train.py; under a minute on 2 cores)
"""
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

POLICIES = ("naive", "sorted", "dacp", "skrull", "skrull_plus")
# (dp, cp, bucket_size, sequences per DP rank, longest); lengths drawn from the paper's Table 1 shapes
SETUPS = [(1, 1, 8192, 16, 8192), (2, 1, 8192, 8, 8192), (1, 2, 4096, 16, 8192), (2, 2, 2048, 12, 4096),
          (1, 4, 4096, 16, 16384), (2, 4, 26_000, 16, 100_000), (4, 8, 26_000, 16, 200_000),
          (1, 8, 13_000, 24, 100_000), (3, 3, 1000, 10, 3000)]
# a CPU-like profile, so plans under measured-style constants are pinned too, not only the H100 defaults
PROFILE = {"device": "golden", "a": 2e-11, "a_attn": 5e-11, "a_ring": 6e-11, "b_call": 3e-4, "b_seq": 1e-5,
           "c_mb": 4e-3, "t_optim": 0.01, "p2p_latency": 2e-4, "p2p_bandwidth": 2e9, "comm_overlap": 0.6,
           "comm_bytes": 4, "grad_bytes": 4,
           "model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "intermediate_size": 128,
                     "vocab_size": 320}}


def plan_cases():
    from data.synthetic import sample_lengths
    cases = []
    for i, (dp, cp, C, per_rank, longest) in enumerate(SETUPS):
        for dist in ("wikipedia", "lmsys", "chatqa2"):
            rng = np.random.default_rng(1000 + i)
            cap = C if cp == 1 else min(longest, (C * cp // (2 * cp)) * 2 * cp)
            lengths = [int(x) for x in sample_lengths(dist, dp * per_rank, rng, max_len=cap, min_len=1)]
            for cost in ("default", "profile"):
                cases.append(dict(lengths=lengths, dp=dp, cp=cp, bucket_size=C, cost=cost, seed=i))
    return cases


def cost_model(name):
    from scheduler import CostModel
    return None if name == "default" else CostModel.from_profile(None, PROFILE)


def encode(plan):
    return [[[mb.distributed, mb.local, mb.rollbacks] for mb in mbs] for mbs in plan]


def make_plans():
    import skrull_plus  # noqa: F401  registers "skrull_plus"
    from scheduler import schedule
    out = []
    for case in plan_cases():
        plans = {p: encode(schedule(case["lengths"], dp=case["dp"], cp=case["cp"], bucket_size=case["bucket_size"],
                                    policy=p, cost=cost_model(case["cost"]), seed=case["seed"])) for p in POLICIES}
        out.append({**case, "plans": plans})
    return out


# Training runs whose per-step losses (and eval losses) are pinned. The README's CPU run, its first 20 steps
# (lr_decay_iters keeps the 200-step schedule), runs in tests/test_golden.py. The others are runs that
# tests/test_train.py makes anyway on the `dataset` fixture's data (conftest.command's overrides), so
# pinning them costs nothing: dp=2 under naive, and cp=2 under skrull_plus.
CPU_RUN = ["train.py", "config/long_sft_cpu.py", "--max_iters=20", "--lr_decay_iters=200", "--export=False",
           "--checkpoint_interval=0", "--threads=1"]
EVAL = dict(eval_fraction=0.25, eval_interval=2, eval_batches=2)  # held-out eval every 2 steps, 2 batches
TEST_RUNS = {
    "dp2_naive": dict(nproc=2, schedule="naive", dump_grads=True, **EVAL),
    "cp2_skrull_plus": dict(nproc=2, cp=2, schedule="skrull_plus", batch_size=8, bucket_size=1024, dump_grads=True, **EVAL),
}


def losses_of(records):
    """{"loss": [...], "eval_loss": [... or None]} of metrics.jsonl records"""
    return {"loss": [r["loss"] for r in records], "eval_loss": [r.get("eval_loss") for r in records]}


def run_cpu_config(out_dir):
    """The README's CPU run (20 steps) into out_dir; returns its metrics records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *CPU_RUN, f"--out_dir={out_dir}"], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    if r.returncode:
        raise RuntimeError(f"the CPU run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def golden_losses(name):
    with open(os.path.join(HERE, "losses.json")) as f:
        return json.load(f)[name]


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "plans":
        with open(os.path.join(HERE, "plans.json"), "w") as f:
            json.dump(make_plans(), f, separators=(",", ":"))
    elif what == "losses":
        import tempfile
        sys.path.insert(0, os.path.dirname(HERE))
        from conftest import make_dataset, train
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            out["cpu_config"] = losses_of(run_cpu_config(os.path.join(tmp, "cpu")))
            data = make_dataset(os.path.join(tmp, "syn"))
            for name, overrides in TEST_RUNS.items():
                out[name] = losses_of(train(os.path.join(tmp, name), data, **overrides))
        for name, got in out.items():
            print(name, got)
        with open(os.path.join(HERE, "losses.json"), "w") as f:
            json.dump(out, f, indent=1)
    else:
        sys.exit("usage: python tests/golden/make_golden.py plans|losses")
