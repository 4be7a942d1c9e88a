"""The CUDA paths on one GPU against an fp64 CPU reference, each within its tolerance in
gpu_checks.GPU_TOL (the checks themselves live in gpu_checks.py, which `python -m bench.gpu` also
prints as a table). The cuda-marked tests skip themselves only where torch sees no CUDA device."""
import os
import subprocess
import sys

import pytest
import torch

import gpu_checks
from conftest import ROOT


@pytest.mark.cuda
@pytest.mark.parametrize("check", gpu_checks.CHECKS, ids=lambda check: check.__name__)
def test_gpu_rows_within_tolerance(check):
    """kernels, in-process ring (W = 2, 4, 8), no host-device sync with a prebuilt plan, 2-layer Qwen2:
    bf16 on the GPU against fp64 on the CPU."""
    rows = check(torch.device("cuda"), torch.bfloat16)
    assert rows
    bad = [f"{row.check}: error {row.error:.2e} > tolerance {row.tolerance:.0e} ({row.detail})"
           for row in rows if not row.error <= row.tolerance]  # NaN fails
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_gpu_command_without_cuda_says_so_in_one_line():
    """`python -m bench.gpu` where torch sees no GPU: exit 1 with one line, not a traceback."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_new_checks_on_the_cpu_path():
    """The rows added for the GPU (every query length 1 under GQA; all_reduce_grads + fused AdamW over a 1-rank
    gloo group) hold on the CPU path in fp32, so on a GPU they measure the GPU, not a wrong reference."""
    for check in (gpu_checks.check_varlen_q1_gqa, gpu_checks.check_allreduce_fused_adamw):
        rows = check(torch.device("cpu"), torch.float32)
        assert rows and all(row.error <= 1e-5 for row in rows), rows


def test_gpu_check_driver_time_limits_and_results_file(tmp_path):
    """bench.gpu's driver on stand-in parts: a part that finishes gives its rows, one past its time limit is
    stopped (its process group) and becomes a failing row after the rows it finished, one that crashes a
    failing row; results.json and results.md are written, and the next part still runs."""
    import json
    from types import SimpleNamespace

    from bench import gpu

    script = {  # each stand-in writes its rows to TMP/<name>.json as a real part does, then behaves
        "fine": "emit([('fine: a check', 1e-4, 1e-2, 'ok')])",
        "slow": "emit([('slow: first row', 0.0, 0.0, 'done before the limit')]); time.sleep(600)",
        "crash": "raise SystemExit(3)",
    }

    def command(part, args):
        code = ("import json, os, time\n"
                f"path = os.path.join({args.tmp!r}, {part.name!r} + '.json')\n"
                "keys = ('check', 'error', 'tolerance', 'detail')\n"
                "def emit(rows): json.dump({'rows': [dict(zip(keys, r)) for r in rows], 'extra': {}}, open(path, 'w'))\n"
                + script[part.name])
        return [sys.executable, "-c", code]

    args = SimpleNamespace(tmp=str(tmp_path), out_dir=str(tmp_path / "out"), device="cpu")
    parts = [gpu.Part("fine", 30, "a part"), gpu.Part("slow", 3, "too slow"), gpu.Part("crash", 30, "crashes")]
    res = gpu.run_parts(parts, args, command=command, out=lambda *a, **k: None)
    assert res["parts"][1]["wall_s"] < 30  # the slow part was stopped at its limit, not waited for (600 s)
    assert [p["status"] for p in res["parts"]] == ["done", "stopped at its 3 s limit", "exited 3"]
    assert [(r["check"], gpu.row_ok(r)) for r in res["rows"]] == [
        ("fine: a check", True), ("slow: first row", True), ("slow: stopped at its 3 s limit", False), ("crash: exited 3", False)]
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["rows"][2]["check"] == "slow: stopped at its 3 s limit" and saved["budget_s"] == 63
    md = open(tmp_path / "out" / "results.md").read()
    assert "| slow | 3 |" in md and "| fine: a check | 1.0e-04 | 0.01 | yes | ok |" in md and "2 of 4 rows within tolerance" in md
    assert sum(p.limit_s for p in gpu.PARTS) <= 8 * 60  # the whole check within 8 minutes on one H100/H200
