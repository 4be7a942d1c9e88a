"""
train.py refuses what it cannot do before touching anything, loses nothing, and stops cleanly:
- every bad config value ends with one line (no traceback) and leaves out_dir byte-for-byte as it was;
- a fresh run refuses an out_dir holding a run, unless overwrite=True;
- resume refuses settings that change the data order or the model, and a max_iters below the checkpoint;
- a non-finite loss stops the run (non-zero exit), metrics.jsonl stays strict JSON, no NaN checkpoint;
- ranks that compute different batches or plans stop together with a message saying which differs;
- a batch with no target token gives loss 0, not NaN or a ZeroDivisionError;
- every node generates the synthetic set it needs (no shared filesystem required).
"""
import ast
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, _free_port, command, env, run, train

pytestmark = pytest.mark.slow  # every test here runs train.py


@pytest.fixture(scope="module")
def finished(tmp_path_factory, dataset):
    """A finished 3-step run with a checkpoint at iter 3."""
    d = tmp_path_factory.mktemp("runs") / "done"
    train(d, dataset, max_iters=3, checkpoint_interval=3)
    return d


def snapshot(d):
    """Every file under d (checkpoint folders included) and its bytes."""
    return {os.path.relpath(os.path.join(top, f), d): open(os.path.join(top, f), "rb").read()
            for top, _, files in sorted(os.walk(d)) for f in sorted(files)}


def check_refusal(cmd, r, words):
    """The command exited non-zero with one line on stderr naming every word, and no traceback."""
    err = r.stderr.strip()
    assert r.returncode != 0, f"{' '.join(cmd)} did not fail:\n{r.stdout[-2000:]}"
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)
    return err


def refused(cmd, *words):
    return check_refusal(cmd, run(cmd, timeout=120), words)


def refused_all(cases):
    """[(cmd, words)]: each train.py command must refuse with one line naming the words. The first two run as
    a user runs them (their own process: exit status, stderr, no traceback); the rest run one after the
    other in a single process through runpy, which skips a torch import per case: each must end in the
    SystemExit whose message Python would print as that one line."""
    for cmd, words in cases[:2]:
        refused(cmd, *words)
    driver = (f"import json, runpy, sys\nsys.path.insert(0, {ROOT!r})\ncodes = []\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    sys.argv = argv\n"
              "    try:\n"
              f"        runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n"
              "        codes.append(None)\n"
              "    except SystemExit as e:\n"
              "        codes.append(e.code)\n"
              "print('CODES', json.dumps(codes))\n")
    argvs = [cmd[1:] for cmd, _ in cases[2:]]  # cmd[0] is the interpreter
    r = run([sys.executable, "-c", driver, json.dumps(argvs)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.rsplit("CODES ", 1)[1])
    for (cmd, words), code in zip(cases[2:], codes):
        assert isinstance(code, str), f"{' '.join(cmd)} did not refuse with a message: {code!r}"
        check_refusal(cmd, subprocess.CompletedProcess(cmd, 1, "", code + "\n"), words)


def test_bad_config_is_one_line_and_touches_nothing(tmp_path, dataset, finished):
    before = snapshot(finished)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    config_only = tmp_path / "config_only"  # a Hugging Face directory without weights: enough for a dry run only
    config_only.mkdir()
    (config_only / "config.json").write_text('{"model_type": "qwen3"}')
    cases = [  # (overrides, words the message must contain)
        (dict(schedule="bogus"), ["schedule='bogus'", "skrull"]),
        (dict(log_interval=0), ["log_interval=0"]),
        (dict(batch_size=0), ["batch_size=0"]),
        (dict(learning_rate=float("nan")), ["learning_rate"]),
        (dict(dtype="float16"), ["float16", "loss scaling"]),
        (dict(ds=str(tmp_path / "missing")), ["not a prepared dataset"]),
        (dict(init_from=str(tmp_path / "nowhere")), ["Hugging Face"]),
        (dict(init_from=str(finished)), ["--init_from=resume"]),
        (dict(model_preset="huge"), ["model_preset='huge'", "tiny"]),
        (dict(threads=0), ["threads=0"]),
        (dict(rope_scaling_type="dynamic"), ["rope_scaling_type='dynamic' is not implemented", "yarn"]),
        (dict(rope_scaling_factor=0.5), ["rope_scaling_factor=0.5"]),
        (dict(rope_scaling_factor=2, od=tmp_path / "new"), ["need rope_scaling_type"]),  # tiny has plain RoPE
        (dict(init_from=str(config_only), od=tmp_path / "new"), ["no model.safetensors", "dry_run"]),
        (dict(activation_checkpoint="some"), ["activation_checkpoint='some'", "selective"]),  # (bucket_size=0 is
        (dict(fsdp=True), ["fsdp=True", "torchrun"]),  # valid now: the memory model gives the bucket)
        (dict(), ["--init_from=resume", "--overwrite=True"]),  # a fresh run into a finished run's out_dir
    ]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), ["CUDA is not available"]))
    cases.append((dict(od=afile), ["is a file"]))
    refused_all([(command(overrides.pop("od", finished), overrides.pop("ds", dataset), **overrides), words)
                 for overrides, words in cases])
    assert snapshot(finished) == before
    assert afile.read_text() == "mine"


def test_help_lists_only_config_keys():
    """--help lists exactly the names train.py assigns in its config block, not imported constants."""
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    keys = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "_train_keys":
                break
            keys.append(node.targets[0].id)
    r = run([sys.executable, "train.py", "--help"])
    listed = [line.split("=")[0].strip()[2:] for line in r.stdout.splitlines() if line.startswith("  --")]
    assert r.returncode == 0 and listed == keys, (listed, keys)


def test_overwrite_starts_over(tmp_path, dataset, finished):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    (d / "notes.txt").write_text("mine")
    m = train(d, dataset, max_iters=2, overwrite=True)
    assert [r["iter"] for r in m] == [1, 2]
    assert not (d / "ckpt").exists()  # the old run's checkpoint went with it (checkpoint_interval=0)
    assert (d / "notes.txt").read_text() == "mine"  # what train.py did not write is never touched


def test_resume_refuses_a_different_run(tmp_path, dataset, finished):
    before = snapshot(finished)
    other = str(tmp_path / "other")
    from data.synthetic import make_synthetic
    make_synthetic(other, dist="chatqa2", n=80, max_len=512, seed=0, verbose=False)
    cases = [
        (dict(seed=7), ["seed 1337 -> 7"]),
        (dict(batch_size=8), ["global_batch_size 4 -> 8"]),
        (dict(model_preset="qwen2.5-0.5b"), ["model_preset 'tiny' -> 'qwen2.5-0.5b'"]),
        (dict(ds=other), ["dataset"]),
        (dict(seed=7, batch_size=2), ["seed", "global_batch_size"]),
        (dict(max_iters=2), ["max_iters=2 is below the checkpoint's iteration 3"]),
    ]
    cases = [(command(finished, overrides.pop("ds", dataset), init_from="resume", **{"max_iters": 6, **overrides}), words)
             for overrides, words in cases]
    refused_all(cases + [(command(tmp_path / "empty", dataset, init_from="resume"), ["does not exist"])])
    assert snapshot(finished) == before


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, dataset):
    d = tmp_path / "nan"
    cmd = command(d, dataset, learning_rate=1e3, max_iters=30, warmup_iters=0, checkpoint_interval=1)
    err = refused(cmd, "not finite", "stopped before the optimizer step")
    it = int(err.split("iter ")[1].split(":")[0])
    assert 1 < it < 30
    lines = open(d / "metrics.jsonl").read().splitlines()
    recs = [json.loads(l, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for l in lines]
    assert [r["iter"] for r in recs] == list(range(1, it))
    assert f"Last checkpoint: iter {it - 1}" in err
    from checkpoint import latest, read_metadata, read_tensors
    path = latest(str(d))
    assert read_metadata(path)["iter"] == it - 1
    from model import ModelConfig, Transformer
    specs = {n: (p.shape, p.dtype) for n, p in Transformer(ModelConfig(**read_metadata(path)["model_config"])).named_parameters()}
    assert all(torch.isfinite(t).all() for t in read_tensors(path, specs).values())


def test_checkpoint_with_nonfinite_weights_is_never_written(tmp_path, dataset):
    """Weights that turn non-finite without a non-finite loss or gradient (here: forced after step 2's
    update) must not replace the last good checkpoint."""
    wrapper = tmp_path / "poison.py"
    wrapper.write_text(
        "import runpy, sys, torch\n"
        "orig = torch.optim.AdamW.step\n"
        "calls = []\n"
        "def step(self, *a, **k):\n"
        "    out = orig(self, *a, **k)\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        with torch.no_grad():\n"
        "            self.param_groups[0]['params'][0].fill_(float('inf'))\n"
        "    return out\n"
        "torch.optim.AdamW.step = step\n"
        f"sys.argv = ['train.py'] + sys.argv[1:]\nsys.path.insert(0, {ROOT!r})\n"
        f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n")
    d = tmp_path / "run"
    refused(command(d, dataset, script=str(wrapper), max_iters=4, checkpoint_interval=1),
            "iter 2: not writing a checkpoint with non-finite values")
    from checkpoint import latest, read_metadata
    assert read_metadata(latest(str(d)))["iter"] == 1 and os.listdir(d / "ckpt") == ["step-00000001"]


def _perturbing_wrapper(tmp_path, what):
    """A train.py launcher that makes rank 1 compute a different plan or batch than the others."""
    path = tmp_path / f"perturb_{what}.py"
    patch = {
        # train.py plans one DP rank (a scheduler.RankPlan): rank 1's micro-batches, or its DP split, differ
        "plan": "import scheduler\n"
                "orig = scheduler.schedule\n"
                "def schedule(*a, **k):\n"
                "    plan = orig(*a, **k)\n"
                "    if isinstance(plan, scheduler.RankPlan):\n"
                "        plan = scheduler.RankPlan(plan.split, plan.dp_rank, plan.microbatches + plan.microbatches[:1])\n"
                "    return plan\n"
                "scheduler.schedule = schedule\n",
        "split": "import scheduler\n"
                 "orig = scheduler.schedule\n"
                 "def schedule(*a, **k):\n"
                 "    plan = orig(*a, **k)\n"
                 "    if isinstance(plan, scheduler.RankPlan):\n"
                 "        plan = scheduler.RankPlan([s + s[:1] for s in plan.split], plan.dp_rank, plan.microbatches)\n"
                 "    return plan\n"
                 "scheduler.schedule = schedule\n",
        "batch": "import data.prepare as prep\n"
                 "orig = prep.global_batch\n"
                 "prep.global_batch = lambda *a: orig(*a)[::-1].copy()\n",
    }[what]
    path.write_text(
        "import os, runpy, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "if os.environ['RANK'] == '1':\n" + "".join("    " + l + "\n" for l in patch.splitlines()) +
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n")
    return str(path)


def test_ranks_that_disagree_stop_together(tmp_path, dataset):
    for what, words in [("plan", ["ranks [1] disagree with their CP peers on the plan"]),
                        ("split", ["ranks [1] disagree with rank 0 on the plan (the DP split)"]),
                        ("batch", ["ranks [1] disagree with rank 0 on the global batch"])]:
        cmd = command(tmp_path / what, dataset, nproc=2, script=_perturbing_wrapper(tmp_path, what), cp=2, max_iters=2)
        r = run(cmd, timeout=120)
        assert r.returncode != 0
        assert all(w in r.stderr for w in words), r.stderr[-3000:]
        assert "iter 1:" in r.stderr
        assert open(tmp_path / what / "metrics.jsonl").read() == ""  # stopped before the first step finished


def test_batch_without_targets_gives_zero_loss(tmp_path, dataset):
    d = tmp_path / "nomask"
    shutil.copytree(dataset, d)
    mask = np.memmap(d / "mask.bin", dtype=np.uint8, mode="r+")
    mask[:] = 0
    mask.flush()
    m = train(tmp_path / "run", str(d), max_iters=2)
    assert [(r["loss"], r["targets"], r["grad_norm"]) for r in m] == [(0.0, 0, 0.0)] * 2


def test_every_node_generates_its_synthetic_data(tmp_path):
    """Two 'nodes' (two torchrun agents, one process each) running from two copies of the repo, i.e. with
    no shared data directory: each node's first rank must generate the synthetic set for its node."""
    ignore = shutil.ignore_patterns(".git", "__pycache__", "synthetic_*", "out*", ".pytest_cache", ".hypothesis")
    copies = [tmp_path / f"node{i}" for i in range(2)]
    for c in copies:
        shutil.copytree(ROOT, c, ignore=ignore)
    port = _free_port()
    procs = []
    for i, c in enumerate(copies):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", "config/long_sft_cpu.py",
               f"--out_dir={tmp_path / f'out{i}'}", "--synthetic_n=64", "--synthetic_max_len=512", "--bucket_size=512",
               "--batch_size=2", "--max_iters=2", "--checkpoint_interval=0", "--threads=1"]
        procs.append(subprocess.Popen(cmd, cwd=c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env()))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    for c in copies:
        assert os.path.isfile(c / "data" / "synthetic_wikipedia_n64_L512_s1337" / "meta.json")
