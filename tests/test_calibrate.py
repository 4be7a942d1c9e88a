"""calibrate.py on CPU: it measures in the regime train.py runs (FSDP2 over gloo here) and records it, the
timed micro-batches carry prebuilt attention plans, one GPU keeps the prior's P2P constants instead of
timing gloo on the CPU, and train.py's preflight warns when a profile's regime is not the run's."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import calibrate
import context_parallel
import preflight
from conftest import ROOT, env
from model import PRESETS, Transformer
from scheduler import H100, CostModel


def test_profile_regime_warning():
    regime = {"fsdp": True, "activation_checkpoint": "none", "dtype": "bfloat16", "world": 8}
    same = dict(fsdp=True, activation_checkpoint="none", dtype="bfloat16", world=8)
    lines = []
    assert preflight.check_profile_regime({"regime": regime}, **same, out=lines.append) is None and not lines
    msg = preflight.check_profile_regime({"regime": regime}, **{**same, "fsdp": False}, out=lines.append)
    assert lines == [f"warning: {msg}"] and "fsdp True there, False here" in msg and "world" not in msg
    msg = preflight.check_profile_regime({"regime": regime}, **{**same, "activation_checkpoint": "full", "world": 16},
                                         out=lines.append)
    assert "activation_checkpoint 'none' there, 'full' here" in msg and "world 8 there, 16 here" in msg
    assert "no regime" in preflight.check_profile_regime({}, **same, out=lines.append)
    assert calibrate.train_regime(torch.device("cpu")) == {"fsdp": False, "activation_checkpoint": "none", "dtype": "float32", "world": 1}
    assert calibrate.train_regime(torch.device("cuda"), world=2)["fsdp"] is True  # torchrun's default on CUDA


def test_timed_microbatch_builds_no_plan(monkeypatch):
    """The micro-batch (tokens, positions, AttnPlan) is built before the timing; the timed forward and backward
    build no plan (on CUDA a plan reads offsets on the host, a sync in every layer otherwise)."""
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = Transformer(cfg)
    x, pos, attn = calibrate.microbatch([30, 17, 5], cfg, torch.device("cpu"))
    assert x.shape == pos.shape == (1, 52) and pos[0, 30:47].tolist() == list(range(17))

    def no_plan(*a, **k):
        raise AssertionError("an AttnPlan was built inside the timed region")
    monkeypatch.setattr(context_parallel.AttnPlan, "__init__", no_plan)
    _, loss = model(x, x, position_ids=pos, attn_fn=attn, reduction="sum")
    loss.backward()


def test_one_gpu_keeps_the_prior_p2p_constants(monkeypatch, tmp_path):
    """One GPU: no gloo P2P on the CPU is timed; the profile keeps scheduler.H100's P2P constants, a_ring
    falls back to a_attn, and the JSON says so beside the regime it measured."""
    cfg = PRESETS["tiny"]
    truth = CostModel(cfg, {"a": 3e-12, "a_attn": 5e-12, "b_call": 2e-5, "b_seq": 1e-6, "c_mb": 1e-3})
    points = calibrate.design_points(512)

    def fake_compute_worker(rank, world, opts, out_file, barrier=None):  # what a GPU would measure
        res = {"points": [{"lengths": [s + 2 * i for i in range(k)], "seconds": 0} for s, k in opts["points"]],
               "t_optim": 0.01, "n_params": 1, "mem": [{"tokens": t, "bytes": 1000 * t + 5e6} for t in (64, 512)],
               "mem_static": 2e8, "device_memory": 80e9}
        for r in res["points"]:
            r["seconds"] = calibrate._predict(truth, r)
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(res, f)

    def no_gloo(*a, **k):
        raise AssertionError("timed P2P although there is one GPU")
    monkeypatch.setattr(calibrate, "compute_worker", fake_compute_worker)
    monkeypatch.setattr(calibrate, "spawn_gloo", no_gloo)
    monkeypatch.setattr(calibrate.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(calibrate.torch.cuda, "get_device_name", lambda d: "NVIDIA H100 80GB HBM3")
    args = SimpleNamespace(max_len=512, device="cuda", model="tiny", threads=1, repeats=1, procs=1, max_p2p_mb=1, mem_gb=None)
    dev, regime = torch.device("cuda"), calibrate.train_regime(torch.device("cuda"))
    meas = calibrate.measure(args, cfg, dev, regime)
    assert meas["p2p"] == [] and meas["cp"] == [] and len(meas["compute"]) == len(points)
    meas["load"] = [0.0, 0.0]
    fit = calibrate.fit_constants(cfg, meas, 2)
    calibrate.write_profile(str(tmp_path / "p.json"), args, cfg, dev, regime, meas, fit, calibrate.report(cfg, meas, fit))
    prof = json.load(open(tmp_path / "p.json"))
    assert prof["regime"] == {"fsdp": True, "activation_checkpoint": "none", "dtype": "bfloat16", "world": 1}
    for k in ("p2p_latency", "p2p_bandwidth", "comm_overlap"):
        assert prof[k] == H100[k]
    assert prof["a_ring"] is None and "not measured" in prof["p2p_note"] and prof["p2p_backend"] is None
    cm = CostModel.from_profile(None, prof)
    assert cm.a_ring == cm.a_attn and cm.a == pytest.approx(3e-12, rel=0.05)


@pytest.mark.slow
def test_calibrate_under_fsdp_on_gloo(tmp_path):
    """`python calibrate.py --fsdp true` end to end on CPU, tiny shapes: FSDP2 over gloo in the compute sweep
    and in the CP=2 runs (prebuilt plans, device tensors all-reduced), the regime in the JSON."""
    out = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, "calibrate.py", "--out", str(out), "--max_len", "32", "--repeats", "1",
                        "--max_p2p_mb", "1", "--procs", "1", "--fsdp", "true"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    prof = json.load(open(out))
    assert prof["regime"] == {"fsdp": True, "activation_checkpoint": "none", "dtype": "float32", "world": 1}
    assert prof["p2p_backend"] == "gloo" and prof["measurements"]["cp"] and prof["a_ring"] is not None
    assert "memory in train.py's regime {'fsdp': True" in r.stdout
