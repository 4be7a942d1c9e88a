"""Sharded checkpoints at 4 gloo ranks with a model of 107M parameters (a random Qwen2 directory, untied
embeddings, passed to train.py with --init_from), FSDP2 on, dp 2 x cp 2, 1 thread per rank:

  1. resume: a run is killed (SIGKILL, every rank) while it writes its second checkpoint, then resumed
     from what is on disk; the same checkpoint is also resumed at dp 4 x cp 1 and dp 1 x cp 4. The
     per-step losses are compared with an uninterrupted run's.
  2. host memory per rank during save and resume (bench/ckpt_probe.py), beside the same runs of another
     checkout (--baseline_src: the single-file, full-gather format), and the spread over ranks.
  3. async_save: the seconds a save blocks training, and the step times with a save in flight.
  4. export: export.py from the sharded checkpoint, its peak host memory against the model's fp32 bytes,
     and transformers' logits of the result against ours.

    python -m bench.ckpt [--work /tmp/skrull-ckpt] [--baseline_src DIR] [--iters 6]

--baseline_src: a checkout of the earlier format (e.g. `git archive <commit> | tar -x -C DIR`); without it
part 2 reports this version only.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


def random_qwen2(path, seed=0):
    """A random Qwen2 of 107M parameters as a Hugging Face directory: 8 layers of width 1024, vocabulary 8192."""
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg).float()
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def launch(out_dir, nproc, overrides, src=ROOT):
    """Popen of `torchrun bench/ckpt_probe.py config/long_sft_cpu.py --key=value ...` for the code in `src`,
    in a process group of its own (so every rank can be killed at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           os.path.join(ROOT, "bench", "ckpt_probe.py"), "config/long_sft_cpu.py", f"--out_dir={out_dir}"]
    cmd += [f"--{k}={v}" for k, v in overrides.items()]
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "run.log"), "a")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SKRULL_ROOT": src}
    return subprocess.Popen(cmd, cwd=src, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run(out_dir, nproc, overrides, src=ROOT):
    p = launch(out_dir, nproc, overrides, src)
    if p.wait() != 0:
        raise SystemExit(f"run in {out_dir} failed:\n" + open(os.path.join(out_dir, "run.log")).read()[-3000:])
    return metrics(out_dir)


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def probes(out_dir, call):
    """{rank: [records of `call`]} from ckpt_probe's files."""
    got = {}
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("probe.rank"):
            for line in open(os.path.join(out_dir, name)):
                r = json.loads(line)
                if r["call"] == call:
                    got.setdefault(r["rank"], []).append(r)
    return got


def descendants(pid):
    """The processes started by `pid`, and theirs (Linux /proc)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return [d for k in kids for d in (k, *descendants(k))]


def kill_during_save(out_dir, nproc, overrides, step):
    """Start a run and SIGKILL all its processes once step-<step>.tmp/ holds a shard file but no meta.json."""
    p = launch(out_dir, nproc, overrides)
    tmp = os.path.join(out_dir, "ckpt", f"step-{step:08d}.tmp")
    while p.poll() is None:
        names = os.listdir(tmp) if os.path.isdir(tmp) else []
        if any(n.endswith(".distcp") for n in names) and "meta.json" not in names:
            for pid in [*descendants(p.pid), p.pid]:  # torchrun starts each rank in a session of its own
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            return sorted(names)
        time.sleep(0.005)
    raise SystemExit(f"the run ended before its step-{step} save could be interrupted: {open(os.path.join(out_dir, 'run.log')).read()[-2000:]}")


def peak_rss(cmd, cwd):
    """The peak resident memory of a command, in bytes (GNU time's %M)."""
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stderr.strip().splitlines()[-1]) * 1024


def losses(records, first):
    return [r["loss"] for r in records if r["iter"] >= first]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/skrull-ckpt")
    p.add_argument("--baseline_src", default=None, help="a checkout of the single-file checkpoint format, measured the same way")
    p.add_argument("--iters", type=int, default=6)
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from data.synthetic import make_synthetic
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    base, data = os.path.join(args.work, "base"), os.path.join(args.work, "syn")
    n_params = random_qwen2(base)
    make_synthetic(data, dist="chatqa2", n=64, max_len=64, seed=0, verbose=False)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | load {os.getloadavg()[0]:.1f} | model {n_params / 1e6:.1f}M params "
          f"({4 * n_params / MiB:,.0f} MiB fp32, {16 * n_params / MiB:,.0f} MiB with AdamW) | 4 gloo ranks, 1 thread each")
    common = dict(init_from=base, dataset=data, batch_size=2, bucket_size=128, max_iters=args.iters, warmup_iters=2,
                  lr_decay_iters=args.iters, threads=1, eval_fraction=0.0, export=False, fsdp=True, cp=2, checkpoint_interval=0)
    W = lambda name: os.path.join(args.work, name)  # noqa: E731

    # 1. the uninterrupted run; a run killed during its step-4 save; resumes at three layouts
    full = run(W("full"), 4, common)
    on_disk = kill_during_save(W("run"), 4, {**common, "checkpoint_interval": 2}, step=4)
    time.sleep(1)
    from checkpoint import latest
    assert sorted(os.listdir(W("run/ckpt"))) == ["step-00000002", "step-00000004.tmp"], os.listdir(W("run/ckpt"))
    print(f"\n1. killed (SIGKILL, all ranks) while writing step-00000004.tmp/ {on_disk}; newest complete checkpoint: "
          f"{os.path.relpath(latest(W('run')), args.work)}")
    for name in ("dp4", "cp4", "sync", "async"):  # the same state: the step-2 checkpoint and a killed step-4 tmp/
        shutil.copytree(W("run"), W(name), ignore=shutil.ignore_patterns("probe.rank*"))
    layouts = {"dp 2 x cp 2": ("run", dict(cp=2, batch_size=2)), "dp 4 x cp 1": ("dp4", dict(cp=1, batch_size=1)),
               "dp 1 x cp 4": ("cp4", dict(cp=4, batch_size=4))}
    print(f"{'resumed at':<13} per-step losses (steps 3..{args.iters}) vs the uninterrupted run's")
    print(f"{'uninterrupted':<13} {losses(full, 3)}")
    for label, (name, kw) in layouts.items():
        got = run(W(name), 4, {**common, **kw, "init_from": "resume", "checkpoint_interval": 2})
        same = losses(got, 3) == losses(full, 3)
        close = all(abs(a - b) <= 1e-5 * abs(b) + 1e-6 for a, b in zip(losses(got, 3), losses(full, 3)))
        print(f"{label:<13} {losses(got, 3)} {'bitwise equal' if same else 'equal to rtol 1e-5' if close else 'DIFFERENT'}")

    # 2. host memory: save (the step-2 and step-4 saves of the resumed run) and resume (its load)
    rows = [("sharded (this)", W("run"))]
    if args.baseline_src:
        old = W("baseline")
        run(old, 4, {**common, "max_iters": 2, "checkpoint_interval": 2}, src=args.baseline_src)
        run(old, 4, {**common, "max_iters": 4, "init_from": "resume", "checkpoint_interval": 2}, src=args.baseline_src)
        rows.append(("full gather (baseline)", old))
    print("\n2. peak host memory per rank, MiB (VmHWM; save: over the call; resume: from process start to the load's end)")
    print(f"{'format':<24} {'call':<6} {'rank 0':>8} {'rank 1':>8} {'rank 2':>8} {'rank 3':>8} {'max/min':>8} {'seconds':>8}")
    peaks = {}
    for label, d in rows:
        for call in ("save", "load"):
            recs = probes(d, call)
            per_rank = [max(r["peak"] for r in recs[k]) for k in sorted(recs)]
            peaks[(label, call)] = per_rank
            secs = max(r["seconds"] for k in recs for r in recs[k])
            print(f"{label:<24} {call:<6} " + " ".join(f"{b / MiB:>8,.0f}" for b in per_rank)
                  + f" {max(per_rank) / min(per_rank):>8.2f} {secs:>8.1f}")
    if args.baseline_src:
        for call in ("save", "load"):
            new, old = peaks[(rows[0][0], call)][0], peaks[(rows[1][0], call)][0]
            print(f"rank 0 {call}: {new / MiB:,.0f} MiB vs {old / MiB:,.0f} MiB: {100 * (1 - new / old):.0f}% below the baseline")

    # 3. async_save: from the step-2 checkpoint, a save after every step, blocking vs in the background
    print(f"\n3. async_save: a save after every step, steps 3..{args.iters}, resumed from step 2 (load {os.getloadavg()[0]:.1f})")
    for name, flag in (("sync", False), ("async", True)):
        got = run(W(name), 4, {**common, "init_from": "resume", "checkpoint_interval": 1, "async_save": flag})
        per_rank = list(probes(W(name), "save").values())
        blocked = [round(max(recs[i]["seconds"] for recs in per_rank), 2) for i in range(len(per_rank[0]))]
        print(f"async_save={flag!s:<5} step dt_ms {[r['dt_ms'] for r in got if r['iter'] >= 3]} | save() blocks (s, max over "
              f"ranks) {blocked} | losses equal to uninterrupted: {losses(got, 3) == losses(full, 3)}")

    # 4. export from the sharded checkpoint (the resumed run's last), then transformers vs our logits
    peak = peak_rss([sys.executable, "export.py", f"--out_dir={W('run')}"], ROOT)
    floor = peak_rss([sys.executable, "-c", "import export"], ROOT)  # the interpreter, torch and the imports alone
    print(f"\n4. export.py --out_dir=<run>: peak host memory {peak / MiB:,.0f} MiB (importing it alone: {floor / MiB:,.0f} MiB); "
          f"the model's fp32 bytes {4 * n_params / MiB:,.0f} MiB ({peak / (4 * n_params):.2f}x)")
    if args.baseline_src:
        old_peak = peak_rss([sys.executable, "export.py", f"--out_dir={W('baseline')}"], args.baseline_src)
        print(f"   the baseline's export.py from its single-file checkpoint: {old_peak / MiB:,.0f} MiB")
    check = ("import sys, torch, transformers\nsys.path.insert(0, '.')\nfrom checkpoint import load_model\n"
             f"ours, _ = load_model({W('run')!r})\n"
             f"hf = transformers.Qwen2ForCausalLM.from_pretrained({os.path.join(W('run'), 'hf')!r}, attn_implementation='eager', dtype=torch.float32)\n"
             "idx = torch.randint(0, 8192, (2, 48), generator=torch.Generator().manual_seed(0))\n"
             "with torch.no_grad():\n    a, b = hf(input_ids=idx).logits, ours(idx)[0]\n"
             "torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)\n"
             "print(f'transformers vs ours: max |logit diff| {(a - b).abs().max().item():.2e} (atol 2e-5, rtol 1e-4): equal')\n")
    r = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(r.stdout.strip() or r.stderr[-2000:])


if __name__ == "__main__":
    main()
