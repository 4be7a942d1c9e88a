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
