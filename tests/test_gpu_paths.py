"""The CUDA and NCCL paths a GPU review found wrong, checked on CPU: the logic runs here with gloo or with
CUDA mocked (calls recorded), and what needs a GPU is a cuda-marked test or a row of `python -m bench.gpu`."""
import signal
import subprocess

import pytest
import torch

import parallelize
from conftest import ROOT, command, env


def test_init_distributed_binds_nccl_to_the_local_gpu(monkeypatch):
    """CUDA: set_device(local_rank) and init_process_group(device_id=cuda:local_rank), so NCCL's first
    collective does not guess the GPU from the global rank. CPU: gloo, no device_id."""
    calls = []
    monkeypatch.setattr(parallelize.torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(parallelize.dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    assert parallelize.init_distributed("cuda", 3) == "cuda:3"
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", {"backend": "nccl", "device_id": torch.device("cuda", 3)})]
    calls.clear()
    assert parallelize.init_distributed("cpu", 3) == "cpu"
    assert calls == [("init", {"backend": "gloo"})]


def test_to_device_pins_and_copies_without_blocking_on_cuda():
    """context_parallel.to_device: CUDA gets pin_memory() then a non-blocking copy; CPU gets the tensor itself."""
    import context_parallel as cp
    calls = []

    class HostTensor:
        def pin_memory(self):
            calls.append("pin_memory")
            return self

        def to(self, device, non_blocking=False):
            calls.append(("to", device, non_blocking))
            return "on device"

    assert cp.to_device(HostTensor(), "cuda:1") == "on device"
    assert calls == ["pin_memory", ("to", torch.device("cuda", 1), True)]
    t = torch.arange(3)
    assert cp.to_device(t, "cpu") is t


EMPTY_RANK_POLICY = '''
import scheduler


def last_rank_only(lengths, *, dp, cp, bucket_size, cost, seed):
    """Every sequence on the last DP rank (naive's packing); the other DP ranks get no micro-batch."""
    return [[] for _ in range(dp - 1)] + scheduler.naive(lengths, dp=1, cp=cp, bucket_size=bucket_size)


scheduler.POLICIES["last_rank_only"] = last_rank_only
schedule = "last_rank_only"
'''


def _run_all(cmds, timeout):
    """Start every command at once; -> their outputs. A run still going after `timeout` s (a hang: a rank
    waiting in a collective no other rank reaches) is stopped with SIGTERM, which torchrun passes on."""
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
             for c in cmds]
    outs = []
    for c, p in zip(cmds, procs):
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.send_signal(signal.SIGTERM)
            pytest.fail(f"{' '.join(c)} did not finish in {timeout} s: a hang")
        assert p.returncode == 0, f"{' '.join(c)} failed:\n{outs[-1][-3000:]}"
    return outs


@pytest.mark.slow
def test_dp_rank_without_microbatches_under_fsdp(tmp_path, dataset):
    """A plan that gives DP rank 0 no micro-batch (2 gloo ranks, dp 2, FSDP2): rank 0 still joins the step's
    reduce-scatter through an empty micro-batch, so nobody hangs, and the losses are naive's."""
    import json
    policy = tmp_path / "last_rank_only.py"
    policy.write_text(EMPTY_RANK_POLICY)
    runs = {"empty": dict(configs=[policy]), "naive": dict(schedule="naive", peak_flops=1e12)}
    cmds = [command(tmp_path / name, dataset, nproc=2, fsdp=True, max_iters=2, **kw) for name, kw in runs.items()]
    _run_all(cmds, timeout=150)
    recs = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in runs}
    losses = {name: [r["loss"] for r in rs] for name, rs in recs.items()}
    assert len(losses["empty"]) == 2
    torch.testing.assert_close(torch.tensor(losses["empty"]), torch.tensor(losses["naive"]), rtol=1e-5, atol=1e-6)
    # the naive run was given peak_flops: its mfu is the cost model's FLOPs of each step's sequences
    check_mfu(recs["naive"], dataset, world=2, n_global=2 * 4, peak=1e12)
    assert all("mfu" not in r for r in recs["empty"])  # CPU without peak_flops: no mfu


def check_mfu(recs, dataset, world, n_global, peak, seed=1337):
    from data.prepare import global_batch, heldout_split, load_dataset
    from model import PRESETS
    from mfu import step_flops
    from scheduler import CostModel
    ds, tiny = load_dataset(dataset), PRESETS["tiny"]
    # train.py's model: the preset's vocabulary grown to the dataset tokenizer's, rounded up to 64
    cost = CostModel(type(tiny)(**{**tiny.__dict__, "vocab_size": max(tiny.vocab_size, -(-ds.meta["vocab_size"] // 64) * 64)}))
    train_ids, _ = heldout_split(len(ds), 0.0, seed)
    for it, r in enumerate(recs):
        lengths = [int(ds.lengths[i]) for i in train_ids[global_batch(len(train_ids), n_global, it, seed)]]
        assert sum(lengths) == r["tokens"]
        want = step_flops(cost, lengths) / (r["dt_ms"] / 1e3 * world * peak)
        assert r["mfu"] == pytest.approx(want, rel=2e-3, abs=5e-6), (r, want)


def test_mfu_peak_table_and_flops():
    """The peak: the config key, else the table by GPU name, else none (CPU). The FLOPs: the cost model's
    formula per sequence, ~6 x parameters per token for short sequences (Kaplan et al.'s 6N)."""
    import mfu
    from model import PRESETS
    from scheduler import CostModel
    assert mfu.peak_for_name("NVIDIA H100 80GB HBM3") == 989e12 and mfu.peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert mfu.peak_for_name("NVIDIA H200") == 989e12 and mfu.peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert mfu.peak_for_name("NVIDIA GeForce RTX 4090") is None
    assert mfu.device_peak_flops("cpu") is None and mfu.device_peak_flops("cpu", 2e12) == 2e12
    cost = CostModel(PRESETS["qwen2.5-0.5b"])
    lengths = [100, 3000, 1]
    assert mfu.step_flops(cost, lengths) == pytest.approx(sum(cost.flops(s) for s in lengths))
    c = PRESETS["qwen2.5-0.5b"]
    non_embedding = cost.n_params - c.vocab_size * c.n_embd  # the tied lm_head is a matmul: counted once
    assert mfu.step_flops(cost, [1]) == pytest.approx(6 * (non_embedding + c.vocab_size * c.n_embd), rel=0.02)
    assert mfu.step_mfu(cost, lengths, 2.0, 4, None) is None
    assert mfu.step_mfu(cost, lengths, 2.0, 4, 1e15) == pytest.approx(mfu.step_flops(cost, lengths) / 8e15)
    lin = cost.lin_flops * sum(lengths)
    assert mfu.step_flops(cost, lengths) - mfu.step_flops(cost, lengths, lora=True) == pytest.approx(lin / 3)
