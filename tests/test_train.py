"""
End-to-end tests of train.py, run as a user runs it (python / torchrun, gloo on CPU):
- the loss falls on the default synthetic data;
- a resumed run reproduces the uninterrupted run's losses (and plans) exactly, also with another cp and schedule;
- the schedule never changes what is computed: per-step losses and the first step's gradients are equal
  for naive vs skrull vs skrull_plus, for different bucket sizes (micro-batch splits), and for cp = 1, 2 and 4,
  and so are the held-out eval losses, and a LoRA run's losses and adapter gradients;
- FSDP2 and activation checkpointing change nothing either (training and eval losses, gradients, LoRA
  included), even with uneven micro-batch counts and an empty CP rank, and an FSDP2 run resumes exactly;
- the export at the end loads in transformers (and the LoRA adapter in peft) with our model's logits.
Safety (refusals, NaN, resume checks, ranks agreeing) is in tests/test_safety.py.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, assert_golden, train, train_all
from golden.make_golden import EVAL, TEST_RUNS

pytestmark = pytest.mark.slow  # every test here runs train.py


# EVAL: held-out eval on a quarter of the 64 samples, 2 global batches, after every 2 steps: the equivalence
# tests below compare eval losses too


def grads(out_dir):
    return load_file(os.path.join(out_dir, "grads.safetensors"))


def assert_same_run(a, b, grads_a=None, grads_b=None, rtol=1e-5, extra_evals_in_b=False):
    assert [m["iter"] for m in a] == [m["iter"] for m in b]
    assert [m["tokens"] for m in a] == [m["tokens"] for m in b]  # same global batches
    la, lb = torch.tensor([m["loss"] for m in a]), torch.tensor([m["loss"] for m in b])
    torch.testing.assert_close(la, lb, rtol=rtol, atol=1e-6)
    ea, eb = ([(m["iter"], m["eval_loss"]) for m in run if "eval_loss" in m] for run in (a, b))
    if extra_evals_in_b:  # b was stopped early (max_iters) and evaluated there, then resumed
        eb = [(i, e) for i, e in eb if i in dict(ea)]
    assert [i for i, _ in ea] == [i for i, _ in eb]  # held-out evaluations at the same steps
    if ea:
        torch.testing.assert_close(torch.tensor([e for _, e in ea]), torch.tensor([e for _, e in eb]), rtol=rtol, atol=1e-6)
    if grads_a is not None:
        assert grads_a.keys() == grads_b.keys()
        for k in grads_a:
            torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_loss_falls_and_metrics_and_export(tmp_path, dataset):
    run = tmp_path / "run"
    m = train(run, dataset, max_iters=12, learning_rate=3e-3, lr_decay_iters=12, checkpoint_interval=100, export=True,
              **{**EVAL, "eval_interval": 5})
    assert [r["iter"] for r in m] == list(range(1, 13))  # 1-based, like the console's "iter 1/12"
    for key in ("iter", "loss", "tokens", "dt_ms", "tok_per_s", "n_microbatches", "peak_tokens_per_rank", "plan_ms",
                "plan_wait_ms"):
        assert key in m[0], key
    assert all(r["peak_tokens_per_rank"] <= 512 for r in m)
    first, last = sum(r["loss"] for r in m[:2]) / 2, sum(r["loss"] for r in m[-2:]) / 2
    assert last < 0.9 * first, (first, last)
    evals = [(r["iter"], r["eval_loss"]) for r in m if "eval_loss" in r]
    assert [i for i, _ in evals] == [5, 10, 12] and evals[-1][1] < evals[0][1]  # every 5 steps and the last

    # the export: transformers' Qwen2ForCausalLM reads out_dir/hf and computes our model's logits
    transformers = pytest.importorskip("transformers")
    from checkpoint import load_model
    ours, meta = load_model(str(run))
    assert meta["iter"] == 12
    hf = transformers.Qwen2ForCausalLM.from_pretrained(run / "hf", attn_implementation="eager", dtype=torch.float32)
    idx = torch.randint(0, 264, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, ours(idx)[0], atol=2e-5, rtol=1e-4)

    # sample.py scores the run's own held-out samples: every held-out sample of each task, up to N
    from data.prepare import get_tokenizer, heldout_split, load_dataset
    from data.synthetic import solve
    ds = load_dataset(dataset)
    per_task = {}
    for i in heldout_split(len(ds), EVAL["eval_fraction"], 1337)[1]:  # 1337: the config's seed
        text = get_tokenizer("byte").decode(ds.get(int(i))[0])
        task = solve(text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0])[0]
        per_task[task] = per_task.get(task, 0) + 1
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={run}", "--eval_synthetic=3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for task, n in per_task.items():
        assert any(line.split()[0] == task and line.split()[1].endswith(f"/{min(n, 3)}")
                   for line in r.stdout.splitlines()[1:]), (task, r.stdout)


def test_resume_is_exact(tmp_path, dataset):
    """Bitwise with fixed constants (calibrate=False): the online fit plans from measured times, which differ
    between runs (tests/test_costfit.py resumes with calibration on, on a simulated machine)."""
    part = tmp_path / "part"
    full, _ = train_all((tmp_path / "full", dataset, dict(max_iters=6, calibrate=False, **EVAL)),
                        (part, dataset, dict(max_iters=3, checkpoint_interval=3, calibrate=False, **EVAL)))
    assert os.listdir(part / "ckpt") == ["step-00000003"]  # complete (renamed from step-00000003.tmp), no other
    shutil.copytree(part, tmp_path / "part2")
    # the second: cp and schedule change who computes what, never what is computed: a resume may change them
    resumed, other = train_all((part, dataset, dict(max_iters=6, init_from="resume", calibrate=False, **EVAL)),
                               (tmp_path / "part2", dataset, dict(nproc=2, cp=2, schedule="naive", max_iters=6,
                                                                  init_from="resume", **EVAL)))
    assert [r["iter"] for r in resumed] == list(range(1, 7))  # history kept, no duplicates
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # bitwise: same data order, same state
    figures = ("n_microbatches", "peak_tokens_per_rank", "rollbacks")  # the resumed run plans as the uninterrupted one
    assert [[r[k] for k in figures] for r in resumed] == [[r[k] for k in figures] for r in full]
    assert [r.get("eval_loss") for r in resumed[3:]] == [r.get("eval_loss") for r in full[3:]]
    assert_same_run(full, other, extra_evals_in_b=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU resume test covers the same code)")
def test_resume_on_cuda(tmp_path, dataset):
    """Fused AdamW on CUDA keeps `step` on the GPU; resume must put it back there."""
    kw = dict(device="cuda", dtype="bfloat16", threads=None)
    full = train(tmp_path / "full", dataset, max_iters=6, **kw)
    train(tmp_path / "part", dataset, max_iters=3, checkpoint_interval=3, **kw)
    resumed = train(tmp_path / "part", dataset, max_iters=6, init_from="resume", **kw)
    assert [r["iter"] for r in resumed] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]), torch.tensor([r["loss"] for r in full]),
                               rtol=1e-3, atol=1e-4)


def test_split_and_policy_invariance(tmp_path, dataset):
    """One process: the micro-batch split (bucket size) and the policy change nothing but the plan."""
    cases = [("naive", 8192), ("skrull", 512), ("skrull_plus", 512), ("sorted", 512), ("naive", 600)]
    runs = train_all(*[(tmp_path / f"b{i}", dataset, dict(schedule=policy, batch_size=16, bucket_size=bucket,
                                                            dump_grads=True, **EVAL)) for i, (policy, bucket) in enumerate(cases)])
    for i, other in enumerate(runs[1:], 1):
        assert_same_run(runs[0], other, grads(tmp_path / "b0"), grads(tmp_path / f"b{i}"))
    assert max(r["n_microbatches"] for r in other) > 1  # the small bucket really split the batch


def test_dp_policy_equivalence(tmp_path, dataset):
    """dp=2 x cp=1: naive, skrull and skrull_plus (both move sequences between DP ranks) give the same run."""
    a = train(tmp_path / "naive", dataset, **TEST_RUNS["dp2_naive"])
    assert_golden("dp2_naive", a)  # and the same losses as before any refactoring (tests/golden)
    for policy in ("skrull", "skrull_plus"):
        b = train(tmp_path / policy, dataset, nproc=2, schedule=policy, dump_grads=True, **EVAL)
        assert_same_run(a, b, grads(tmp_path / "naive"), grads(tmp_path / policy))


def test_cp_equivalence(tmp_path, dataset):
    """cp = 1, 2, 4 (dp=1) under skrull, skrull_plus and naive: ring attention + DACP reproduce single-process
    training."""
    cases = [(1, "skrull"), (2, "skrull"), (2, "skrull_plus"), (2, "naive"), (4, "skrull_plus")]
    runs = train_all(*[(tmp_path / f"cp{cp}_{policy}", dataset, dict(nproc=cp, cp=cp, schedule=policy, batch_size=8,
                                                                      bucket_size=2048 // cp, dump_grads=True, **EVAL))
                       for cp, policy in cases])
    for (cp, policy), m in zip(cases[1:], runs[1:]):
        assert_same_run(runs[0], m, grads(tmp_path / "cp1_skrull"), grads(tmp_path / f"cp{cp}_{policy}"))
    assert TEST_RUNS["cp2_skrull_plus"] == dict(nproc=2, cp=2, schedule="skrull_plus", batch_size=8, bucket_size=1024,
                                                dump_grads=True, **EVAL)
    assert_golden("cp2_skrull_plus", runs[2])  # the same losses as before any refactoring (tests/golden)


def test_small_bucket_rolls_back(tmp_path, dataset):
    """A deliberately small bucket (160 tokens per rank; the longest sample has 161) forces DACP's
    roll-back on this data; the run stays inside the bucket and still computes the same losses."""
    ref, m = train_all((tmp_path / "ref", dataset, dict(batch_size=8, bucket_size=2048, max_iters=3, **EVAL)),
                       (tmp_path / "rb", dataset, dict(nproc=2, cp=2, schedule="skrull", batch_size=8, bucket_size=160,
                                                       max_iters=3, **EVAL)))
    assert all(r["peak_tokens_per_rank"] <= 160 for r in m)
    assert sum(r["rollbacks"] for r in m) > 0
    assert_same_run(ref, m)


def test_attention_plan_built_once_per_microbatch(tmp_path, dataset, monkeypatch):
    """train.py builds one AttnPlan per micro-batch (in load_microbatch, from CPU lists) and every layer
    shares it: building one per layer would read the offsets back from the GPU in every layer. Runs
    train.py in this process so the plan constructor and the model's forward can be counted."""
    import runpy
    import context_parallel
    import model
    built, forwards = [], []
    init, forward = context_parallel.AttnPlan.__init__, model.Transformer.forward

    def counting_init(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    def counting_forward(self, *args, **kwargs):
        if next(self.parameters()).device.type != "meta":  # memory.py measures on meta at start-up
            forwards.append(1)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(context_parallel.AttnPlan, "__init__", counting_init)
    monkeypatch.setattr(model.Transformer, "forward", counting_forward)
    args = dict(out_dir=str(tmp_path), dataset=dataset, batch_size=8, bucket_size=400, max_iters=2,
                checkpoint_interval=0, device="cpu", dtype="float32", eval_interval=0, export=False)
    monkeypatch.setattr(sys, "argv", ["train.py", "config/long_sft_cpu.py"] + [f"--{k}={v}" for k, v in args.items()])
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    m = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert len(forwards) == sum(r["n_microbatches"] for r in m) > 2  # one forward per micro-batch
    assert len(built) == len(forwards), f"{len(built)} plans for {len(forwards)} micro-batches of a 4-layer model"


def test_fsdp_uneven_microbatches_checkpoint_modes_and_resume(tmp_path, dataset):
    """dp 2 x cp 2 under FSDP2 (with selective recompute) against the plain all-reduce path: the plan has
    DP ranks with different micro-batch counts and a CP rank with nothing in its last micro-batch (checked
    below), the run must not hang (train() has a timeout) and must give the same losses and gradients,
    and the same held-out eval losses (whose plans also give DP ranks different micro-batch counts).
    Full recompute at cp=2 gives them too; an FSDP run resumed at iter 2 reproduces the losses exactly;
    and FSDP2 holds at most 0.35 of the replicated state per rank."""
    from data.prepare import global_batch, heldout_split, load_dataset
    from memory import static_bytes
    from model import PRESETS, ModelConfig, Transformer
    from scheduler import schedule
    ds = load_dataset(dataset)
    args = dict(schedule="dacp", batch_size=4, bucket_size=160, max_iters=4, lr_decay_iters=4, calibrate=False, **EVAL)
    train_ids, eval_ids = heldout_split(len(ds), EVAL["eval_fraction"], 1337)
    plans = [schedule([int(ds.lengths[i]) for i in train_ids[global_batch(len(train_ids), 8, it, 1337)]], dp=2, cp=2,
                      bucket_size=160, policy="dacp") for it in range(4)]
    assert any(len(p[0]) != len(p[1]) for p in plans)
    assert any(not mbs[-1].distributed and not all(mbs[-1].local) for p in plans for mbs in p)
    eval_plans = [schedule([int(ds.lengths[i]) for i in eval_ids[b * 8:(b + 1) * 8]], dp=2, cp=2, bucket_size=160,
                           policy="dacp", seed=1337 + b) for b in range(EVAL["eval_batches"])]
    assert any(len(p[0]) != len(p[1]) for p in eval_plans)

    part = tmp_path / "part"
    fsdp = dict(nproc=4, cp=2, fsdp=True, activation_checkpoint="selective")
    ref, sharded, full, _ = train_all(
        (tmp_path / "ref", dataset, dict(nproc=4, cp=2, fsdp=False, dump_grads=True, **args)),
        (tmp_path / "fsdp", dataset, dict(**fsdp, dump_grads=True, **args)),
        (tmp_path / "full", dataset, dict(nproc=2, cp=2, activation_checkpoint="full", dump_grads=True,
                                          **{**args, "batch_size": 8})),  # dp 1: the same 8 sequences per step
        (part, dataset, dict(**fsdp, checkpoint_interval=2, **{**args, "max_iters": 2})))  # resumed below
    assert_same_run(ref, sharded, grads(tmp_path / "ref"), grads(tmp_path / "fsdp"))
    assert sum("eval_loss" in r for r in sharded) == 2  # after steps 2 and 4
    assert_same_run(ref, full, grads(tmp_path / "ref"), grads(tmp_path / "full"))

    # state per rank, measured from the tensors: FSDP2 shards all 16 bytes/param over the 4 ranks
    s_ref, s_fsdp = ref[0]["state_bytes_per_rank"], sharded[0]["state_bytes_per_rank"]
    assert s_fsdp <= 0.35 * s_ref, (s_fsdp, s_ref)
    cfg = ModelConfig(**{**PRESETS["tiny"].__dict__, "vocab_size": 320})
    n_tensors = len(list(Transformer(cfg).parameters()))
    # plus AdamW's 4-byte step counter per parameter tensor
    assert s_fsdp == static_bytes(cfg, 4, True)["persistent"] + 4 * n_tensors
    assert s_ref == static_bytes(cfg, 4, False)["persistent"] + 4 * n_tensors
    assert sharded[0]["peak_state_bytes_per_rank"] > s_fsdp and ref[0]["peak_state_bytes_per_rank"] > s_ref

    # resharding: the FSDP2 checkpoint of 4 ranks resumes exactly at 4, and at 1 process without FSDP2 (dp 1 x 8)
    shutil.copytree(part, tmp_path / "one")
    resumed, one = train_all((part, dataset, dict(**fsdp, init_from="resume", **args)),
                             (tmp_path / "one", dataset, dict(init_from="resume", **{**args, "batch_size": 8, "bucket_size": 320})))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in sharded]
    assert [r.get("eval_loss") for r in resumed] == [r.get("eval_loss") for r in sharded]
    assert_same_run(sharded, one)

    # export.py streams the sharded checkpoint into a directory transformers loads, with our model's logits
    import transformers
    from checkpoint import load_model
    from export import main as export_main
    export_main([f"--out_dir={part}"])
    model, meta = load_model(str(part))
    assert meta["iter"] == 2 and model.config == cfg
    hf = transformers.Qwen2ForCausalLM.from_pretrained(part / "hf", attn_implementation="eager", dtype=torch.float32)
    idx = torch.randint(0, 264, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(input_ids=idx).logits, rtol=1e-4, atol=1e-5)


def test_lora_equivalence_and_peft(tmp_path, dataset):
    """LoRA on a (random) Hugging Face Qwen2 checkpoint: losses, eval losses and adapter gradients equal for
    skrull vs naive (at dp 2 under FSDP2, frozen weights sharded too) and cp=1 vs cp=2; frozen weights
    unchanged and without optimizer state, with or without FSDP2; the PEFT adapter that train.py writes
    loads with peft and gives the logits of our model and of the merged export, and the FSDP2 run exports
    the same adapter and merged model (gathered from the shards)."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_lora import load_hf, random_hf
    base = tmp_path / "base"
    random_hf(base, tie=True)
    lora = dict(init_from=str(base), lora_rank=4, lora_alpha=8, lora_targets="all", batch_size=8, bucket_size=2048,
                dump_grads=True, **EVAL)
    ref = train(tmp_path / "ref", dataset, schedule="skrull", checkpoint_interval=100, export=True, **lora)
    # dp 2 x 4 sequences under FSDP2 draws the same 8 sequences per step as dp 1 x 8
    for name, nproc, cp, policy, fsdp in [("naive", 2, 1, "naive", True), ("cp2", 2, 2, "skrull", False)]:
        m = train(tmp_path / name, dataset, nproc=nproc, cp=cp, schedule=policy, fsdp=fsdp,
                  **{**lora, "bucket_size": 2048 // cp, "batch_size": 8 // (nproc // cp)},
                  **(dict(checkpoint_interval=100, export=True) if fsdp else {}))
        assert_same_run(ref, m, grads(tmp_path / "ref"), grads(tmp_path / name))
    assert ref[-1]["loss"] < ref[0]["loss"] and any("eval_loss" in r for r in ref)
    assert grads(tmp_path / "ref").keys() == {n for n in grads(tmp_path / "ref") if ".lora_" in n} != set()

    from model import Transformer
    frozen = dict(Transformer.from_pretrained(base).named_parameters())  # a tied lm_head is embed_tokens
    from torch.distributed.checkpoint import FileSystemReader
    from checkpoint import latest, read_tensors
    for run_dir in ("ref", "naive"):  # without and with FSDP2
        path = latest(str(tmp_path / run_dir))
        keys = FileSystemReader(path).read_metadata().state_dict_metadata
        optim = {k[len("optim.state."):].rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}
        assert optim and all(".lora_" in n for n in optim)  # no AdamW state for frozen weights
        saved = read_tensors(path, {n: (t.shape, t.dtype) for n, t in frozen.items()})
        for n, t in frozen.items():
            torch.testing.assert_close(saved[n], t, atol=0, rtol=0)  # untouched by training
    for f in ("adapter/adapter_model.safetensors", "hf/model.safetensors"):  # FSDP2's export, gathered on every rank
        a, b = load_file(tmp_path / "ref" / f), load_file(tmp_path / "naive" / f)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{f} {k}: {m}")

    from checkpoint import load_model
    ours, _ = load_model(str(tmp_path / "ref"))
    idx = torch.randint(0, 264, (2, 40))
    with torch.no_grad():
        logits = ours(idx)[0]
        with_adapter = peft.PeftModel.from_pretrained(load_hf(base), tmp_path / "ref" / "adapter").eval()
        torch.testing.assert_close(with_adapter(input_ids=idx).logits, logits, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(load_hf(tmp_path / "ref" / "hf")(input_ids=idx).logits, logits, atol=2e-5, rtol=1e-4)
