"""Every CUDA path on one GPU, each against a tolerance fixed in gpu_checks.GPU_TOL, as one table:
the correctness checks of gpu_checks.py (also tests/test_gpu.py), train.py steps under naive and
skrull with checkpoint + resume, then tokens/s of the Qwen2.5-0.5B shape. Exits 1 if any row fails.

    python -m bench.gpu                      # about 5 minutes on one H100/H200
    python -m bench.gpu --skip-throughput    # the checks only, about 1 minute

--device cpu runs the same checks on the CPU path (a dry run of this command, not a GPU result).
"""
import argparse
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

from bench.common import train_run
from gpu_checks import CHECKS, GPU_TOL, Row, check_no_host_sync


def _tokens_per_s(records):
    return sum(r["tokens"] for r in records) / sum(r["dt_ms"] for r in records) * 1e3


def train_checks(dev, tmp, rows):
    """train.py as users run it: bf16 autocast steps under naive and skrull, and checkpoint + resume with
    fused AdamW, on a tiny model. Appends its rows to `rows` as they come."""
    from data.synthetic import make_synthetic
    small = make_synthetic(os.path.join(tmp, "small"), dist="chatqa2", n=256, max_len=2048, seed=0, verbose=False)
    common = dict(dataset=small, model_preset="tiny", batch_size=8, bucket_size=2048, max_iters=8, warmup_iters=2,
                  lr_decay_iters=8, checkpoint_interval=0, device=dev.type, dtype="bfloat16" if dev.type == "cuda" else "float32")
    runs = {p: train_run(os.path.join(tmp, p), 1, {**common, "schedule": p}) for p in ("naive", "skrull")}
    for p, m in runs.items():
        losses = [r["loss"] for r in m]
        ok = all(np.isfinite(losses)) and losses[-1] < losses[0]
        rows.append(Row(f"train: {len(m)} {common['dtype']} steps, tiny Qwen2, schedule={p}", 0.0 if ok else float("nan"), 0.0,
                        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (finite, falling)"))
    la, lb = (np.array([r["loss"] for r in runs[p]]) for p in ("naive", "skrull"))
    rows.append(Row("train: naive vs skrull, same batches", float(np.max(np.abs(la - lb) / np.abs(la))), GPU_TOL["policy"],
                    "max relative loss difference over steps"))
    part = os.path.join(tmp, "resume")
    train_run(part, 1, {**common, "schedule": "skrull", "max_iters": 4, "checkpoint_interval": 4})
    resumed = train_run(part, 1, {**common, "schedule": "skrull", "init_from": "resume"})
    lr_ = np.array([r["loss"] for r in resumed])
    rows.append(Row("train: checkpoint at 4, resume to 8 (fused AdamW on CUDA)", float(np.max(np.abs(lr_ - lb) / np.abs(lb))),
                    GPU_TOL["resume"], "max relative loss difference vs the uninterrupted run"))


def throughput(dev, tmp, args):
    """tokens/s: Qwen2.5-0.5B's layers (vocabulary: the synthetic byte tokenizer's, 320 rows), cp=1, one GPU,
    naive and skrull alternating. -> {policy: [tok/s per run], policy_mem: (GiB, tokens, micro-batches), cfg}"""
    from data.synthetic import make_synthetic
    big = make_synthetic(os.path.join(tmp, "chatqa2"), dist="chatqa2", n=512, max_len=args.max_len, seed=0, verbose=False)
    cfg = dict(dataset=big, model_preset="qwen2.5-0.5b", batch_size=args.batch_size, bucket_size=args.bucket,
               max_iters=args.iters, warmup_iters=2, learning_rate=2e-5, min_lr=2e-6, checkpoint_interval=0,
               device=dev.type, dtype="bfloat16", cp=1)
    res = {p: [] for p in ("naive", "skrull")}
    for rep in range(args.reps):
        for p in (("naive", "skrull") if rep % 2 == 0 else ("skrull", "naive")):
            m = train_run(os.path.join(tmp, f"tput_{p}_{rep}"), 1, {**cfg, "schedule": p})[args.warmup:]
            res[p].append(m)
            print(f"  0.5B shape, {p}, rep {rep}: {_tokens_per_s(m):,.0f} tok/s", flush=True)
    tput = {"cfg": cfg}
    for p, reps in res.items():
        steps = [r for m in reps for r in m]
        top = max(steps, key=lambda r: r.get("max_memory_allocated", 0))
        gib = top.get("max_memory_allocated", 0) / 2 ** 30
        tput[p] = [_tokens_per_s(m) for m in reps]
        tput[p + "_mem"] = (gib, top["peak_tokens_per_rank"], statistics.median(r["n_microbatches"] for r in steps))
    return tput


def run_all(dev, dtype, args, tmp):
    """-> (rows, throughput or None). A check that raises becomes a failing row of one line, so it hides
    no other; a failing train.py run ends the train rows and the throughput runs."""
    rows = []
    for check in CHECKS:
        if check is check_no_host_sync and dev.type != "cuda":
            continue
        try:
            rows += check(dev, dtype)
        except Exception as e:
            rows.append(Row(f"{check.__name__}: raised", float("nan"), 0.0, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        print(f"  {check.__name__} done", flush=True)
    tput = None
    if not args.skip_train:
        try:
            train_checks(dev, tmp, rows)
            if not args.skip_throughput:
                tput = throughput(dev, tmp, args)
        except (Exception, SystemExit) as e:
            rows.append(Row("train: raised", float("nan"), 0.0, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
    return rows, tput


def print_throughput(tput, args):
    c = tput["cfg"]
    print(f"\ntokens/s, Qwen2.5-0.5B layers (vocabulary: the synthetic data's byte tokenizer's), cp=1, bf16 autocast, synthetic ChatQA2 shape "
          f"(max_len {args.max_len}), batch_size {c['batch_size']}, bucket_size {c['bucket_size']}, {args.iters - args.warmup} "
          f"timed steps x {args.reps} runs per policy, alternating; only the packing differs")
    print("| schedule | tok/s per run | median | micro-batches/step | peak max_memory_allocated | its step's tokens | bucket |")
    print("|---|---|---|---|---|---|---|")
    for p in ("naive", "skrull"):
        gib, toks, mbs = tput[p + "_mem"]
        print(f"| {p} | {', '.join(f'{t:,.0f}' for t in tput[p])} | {statistics.median(tput[p]):,.0f} | {mbs:g} | {gib:.1f} GiB | "
              f"{toks} | {c['bucket_size']} |")
    print(f"skrull / naive: {statistics.median(tput['skrull']) / statistics.median(tput['naive']):.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--skip-train", action="store_true", help="leave out the train.py rows")
    ap.add_argument("--skip-throughput", action="store_true", help="leave out the 0.5B tokens/s rows")
    ap.add_argument("--iters", type=int, default=8, help="steps per throughput run (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="throughput runs per policy, alternating")
    ap.add_argument("--batch_size", type=int, default=16, help="sequences per step in the throughput runs")
    ap.add_argument("--max_len", type=int, default=24576, help="longest synthetic ChatQA2-shaped sample")
    ap.add_argument("--bucket", type=int, default=26000, help="bucket_size (tokens per micro-batch) of the throughput runs")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"python -m bench.gpu: no CUDA device visible to torch {torch.__version__}; run it on a machine with a GPU "
                 f"(or --device cpu for a dry run of the checks on the CPU path)")
    if args.warmup >= args.iters:
        sys.exit(f"python -m bench.gpu: --warmup ({args.warmup}) must be below --iters ({args.iters})")
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"python -m bench.gpu on {name}, torch {torch.__version__}, {dtype} vs an fp64 CPU reference")
    print("tolerances (relative error ||got - ref|| / ||ref||): " + ", ".join(f"{k} {v:.0e}" for k, v in GPU_TOL.items()), flush=True)
    tmp = tempfile.mkdtemp(prefix="skrull_gpu_")
    rows, tput = run_all(dev, dtype, args, tmp)
    print("\n| check | error | tolerance | ok | detail |\n|---|---|---|---|---|")
    failed = 0
    for row in rows:
        ok = row.error <= row.tolerance  # NaN (non-finite results, an exception) fails
        failed += not ok
        print(f"| {row.check} | {row.error:.1e} | {row.tolerance:.0e} | {'yes' if ok else 'NO'} | {row.detail} |")
    if tput:
        print_throughput(tput, args)
    print(f"\n{len(rows) - failed} of {len(rows)} rows within tolerance")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
