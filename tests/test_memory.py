"""
Tests of memory.py and the activation checkpoint modes of model.Block, no processes:
- the bytes kept for the backward, counted by memory.saved_bytes, agree with PyTorch's own MemTracker
  on real CPU tensors, and the meta device (what the memory model runs on) counts the same;
- the three checkpoint modes give the same gradients (cp=1 here; cp=2 and FSDP in test_train.py);
- StateMeter measures, on a real step, the state the memory model predicts;
- the dry run exits 0 when every rank fits and 1, naming the rank, when one does not.
"""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from memory import MemoryModel, StateMeter, _FlashLikeAttention, meta_model, saved_bytes, static_bytes
from model import PRESETS, Transformer

MODES = ("none", "full", "selective")


def test_saved_bytes_match_torch_mem_tracker():
    """MemTracker (torch.distributed._tools) tracks every live storage a forward creates. After the
    forward, the live activations are what autograd keeps plus the loss scalar it returns."""
    from torch.distributed._tools.mem_tracker import MemTracker
    torch.manual_seed(0)
    model, meta = Transformer(PRESETS["tiny"]), meta_model(PRESETS["tiny"], torch.float32)
    counts = {}
    for mode in MODES:
        for n in (128, 256):
            idx, cu = torch.ones((1, n), dtype=torch.long), torch.tensor([0, n], dtype=torch.int32)
            for block in model.layers:
                block.recompute = mode
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                _, loss = model(idx, idx, cu_seqlens=cu, position_ids=torch.arange(n), reduction="sum",
                                attn_fn=_FlashLikeAttention.apply)
                snap = tracker.get_tracker_snapshot()
            activations = next(b for k, b in snap[torch.device("cpu")].items() if "ACT" in str(k))
            loss_bytes = loss.nbytes
            del loss
            for block in model.layers:
                block.recompute = "none"
            ours = saved_bytes(model, n, mode)
            assert ours + loss_bytes == activations, (mode, n, ours, activations)
            assert saved_bytes(meta, n, mode) == ours, (mode, n)
            counts[mode, n] = ours
    # recompute really drops what it claims: full keeps least, selective in between
    assert counts["full", 256] < counts["selective", 256] < counts["none", 256]


def test_recompute_modes_same_grads():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    x = torch.randint(0, 264, (1, 200))
    cu = torch.tensor([0, 37, 150, 200], dtype=torch.int32)
    grads = {}
    for mode in MODES:
        for block in model.layers:
            block.recompute = mode
        model.zero_grad()
        model(x, x, cu_seqlens=cu)[1].backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for mode in ("full", "selective"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{mode} {n}: {m}")


def test_static_bytes_shards():
    """FSDP2 splits dim 0 into world chunks of ceil(d0 / world) rows; a rank holds 16 bytes per element."""
    s1, s4 = static_bytes(PRESETS["tiny"], 1, False), static_bytes(PRESETS["tiny"], 4, True)
    model = Transformer(PRESETS["tiny"])
    assert s1["n_params"] == model.num_params() and s1["persistent"] == 16 * model.num_params()
    assert s4["persistent"] == 16 * sum(-(-p.shape[0] // 4) * p[0].numel() for p in model.parameters())
    assert s4["working"] == 8 * model.num_params()  # CPU fp32: gathered parameters + their gradients


def test_state_meter_measures_the_predicted_state():
    """One process, no FSDP: 16 bytes per parameter between steps (fp32 weights, gradients, two AdamW
    moments) plus AdamW's step counter per tensor; within the step no more than that."""
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    optimizer = torch.optim.AdamW(model.parameters())
    meter = StateMeter(model, model.parameters(), optimizer)
    meter.start()
    idx = torch.randint(0, 264, (1, 64))
    _, loss = model(idx, idx)
    meter.sample()
    loss.backward()
    meter.sample()
    optimizer.step()
    state = meter.finish(1, "cpu")
    n_tensors = len(list(model.parameters()))
    assert state["state_bytes_per_rank"] == static_bytes(PRESETS["tiny"])["persistent"] + 4 * n_tensors
    assert state["peak_state_bytes_per_rank"] == state["state_bytes_per_rank"]


def test_dry_run_in_process():
    from preflight import dry_run
    from scheduler import CostModel
    lengths = [[300, 40, 700, 90], [512, 512, 60, 20]]
    for device_memory, rc, words in [(80e9, 0, "fits: every rank"), (1e7, 1, "does not fit: rank ")]:
        mem = MemoryModel(PRESETS["tiny"], world=4, recompute="selective", device_memory=device_memory)
        lines = []
        assert dry_run(lengths, dp=2, cp=2, bucket_size=512, policy="skrull", seed=0, cost=CostModel(PRESETS["tiny"], memory=mem),
                       mem=mem, model_name="tiny", dataset="lengths", out=lines.append) == rc
        assert lines[0].startswith("dry run: tiny") and "world 4 = dp 2 x cp 2" in lines[0] and words in lines[-1]
        assert sum(line.endswith(("yes", "NO")) for line in lines) == 4  # one row per rank


@pytest.fixture(scope="module")
def long_dataset(tmp_path_factory):
    from data.synthetic import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("data") / "syn"), dist="chatqa2", n=160, max_len=65536, seed=0, verbose=False)


def dry_run(*args):
    """Start train.py's dry run (returns the process: several run side by side)."""
    return subprocess.Popen([sys.executable, "train.py", *args, "--dry_run=True"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_dry_run_exit_codes(long_dataset):
    fits = dry_run("config/long_sft_7b.py", "--dry_run_world=32", f"--dataset={long_dataset}")
    over = dry_run("config/long_sft_7b.py", "--dry_run_world=32", f"--dataset={long_dataset}", "--bucket_size=60000")
    (out, err), (out2, err2) = fits.communicate(timeout=120), over.communicate(timeout=120)
    assert fits.returncode == 0, out + err
    assert out.count(" yes") == 32 and "fits: every rank" in out
    rc, out, err = over.returncode, out2, err2
    assert rc == 1, out + err
    assert "does not fit: rank " in out and "GiB over the usable" in out and "Traceback" not in err
