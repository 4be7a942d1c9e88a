"""What evening out two ranks' work gains on this machine, against what the cost model's independent ranks
predict. The cost model, as the paper's, takes every rank for a device of its own: a step ends with its
slowest rank, whatever the others do, so moving work from the busier rank to the idler one gains exactly
the busier rank's lost time. On a GPU node each rank has its own device; on a CPU the ranks are processes
on shared cores, caches and memory.

    python -m bench.balance [--tokens 1200] [--reps 30]

Two gloo processes, 1 thread each, the tiny model of config/long_sft_cpu.py, forward + backward of 8 equal
sequences per rank, every case once per rep, in an order reversed every other rep; medians over reps:
  alone      each rank's `tokens`/2 while the other waits at a barrier (one rank after the other)
  together   both ranks' `tokens`/2 at once: each rank's time against its time alone
  40/60      a step: both compute (40% and 60% of `tokens`), then one all-reduce of a gradient-sized
             buffer, timed on rank 0 from a common barrier; 50/50 the same, evened out
  independent ranks' step: the slower rank's compute alone (each rank's share timed alone) + the
             all-reduce alone; the ratio 40/60 over 50/50 is what the cost model expects evening out to gain
"""
import argparse
import json
import os
import time

import numpy as np

from bench.common import leave_gloo_worker, load_average, spawn_gloo

SPLITS = {"40/60": 0.4, "50/50": 0.5}


def worker(rank, world, init_file, out_file, tokens, reps):
    import torch
    import torch.distributed as dist
    from model import PRESETS, Transformer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "vocab_size": 320}))
    grads = torch.zeros(sum(p.numel() for p in model.parameters()))  # what the step all-reduces
    share = {name: int(tokens * (f if rank == 0 else 1 - f)) for name, f in SPLITS.items()}
    batch = {}
    for n in {tokens // 2, *share.values()}:
        lens = [n // 8] * 8
        idx = torch.randint(0, 320, (1, sum(lens)))
        batch[n] = dict(idx=idx, targets=idx, cu_seqlens=torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32),
                        position_ids=torch.cat([torch.arange(s) for s in lens])[None])

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def fwd_bwd(n):
        model(**batch[n])[1].backward()
        model.zero_grad(set_to_none=True)

    def in_turn(n):  # each rank alone, one after the other: this rank's time
        return [timed(lambda: fwd_bwd(n) if r == rank else None) for r in range(world)][rank]

    cases = {"alone": lambda: in_turn(tokens // 2), "together": lambda: timed(lambda: fwd_bwd(tokens // 2)),
             "reduce": lambda: timed(lambda: dist.all_reduce(grads))}
    for name, n in share.items():
        cases[name] = lambda n=n: timed(lambda: (fwd_bwd(n), dist.all_reduce(grads)))
        cases[name + " alone"] = lambda n=n: in_turn(n)
    for _ in range(3):
        fwd_bwd(tokens // 2)
    times = {name: [] for name in cases}
    for rep in range(reps):
        for name in (list(cases) if rep % 2 == 0 else list(cases)[::-1]):
            times[name].append(cases[name]())
    every = [None] * world
    dist.all_gather_object(every, {k: float(np.median(v)) for k, v in times.items()})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(every, f)
    leave_gloo_worker()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.balance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1200, help="tokens per step over both ranks")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load0 = load_average()
    ms = [{k: v * 1e3 for k, v in r.items()} for r in spawn_gloo(worker, 2, args.tokens, args.reps)]
    print(f"# python -m bench.balance --tokens {args.tokens} --reps {args.reps}: 2 gloo processes, 1 thread each, "
          f"medians over reps, ms; load average {load0:.1f} at the start, {load_average():.1f} at the end")
    for r in range(2):
        print(f"rank {r}, {args.tokens // 2} tokens: alone {ms[r]['alone']:.1f}, beside the other rank computing "
              f"{ms[r]['together']:.1f} ({ms[r]['together'] / ms[r]['alone']:.2f}x)")
    independent = {name: max(m[name + " alone"] for m in ms) + ms[0]["reduce"] for name in SPLITS}
    for name in SPLITS:
        print(f"step at {name}: measured {ms[0][name]:.1f}; independent ranks: {independent[name]:.1f} (the slower "
              f"rank's compute alone + the all-reduce, {ms[0]['reduce']:.1f})")
    a, b = SPLITS
    print(f"{a} over {b} (what evening out gains): measured {ms[0][a] / ms[0][b]:.3f}x, "
          f"independent ranks {independent[a] / independent[b]:.3f}x")


if __name__ == "__main__":
    main()
