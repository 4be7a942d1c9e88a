"""What planning costs a training rank as the cluster grows, and how much of a step waits for it.

    python -m bench.plan [--baseline DIR] [--gpus 32,128,512,4096] [--batches 2] [--repeats 3] [--interference]
                         [--split]

For 32, 128, 512 and 4,096 GPUs (cp 8, so dp 4 to 512; 64 sequences per DP rank; C 26K; Qwen2.5-0.5B with
the H100 constants of scheduler.H100) and the three length shapes of paper Table 1 (simulate.py), per
policy (skrull, skrull_plus):
  plan     CPU ms one rank spends planning a step: schedule(..., dp_rank=r) for a few DP ranks r (first,
           middle, last); median [min-max] over batches, ranks and repeats
  wait     what the step waits: the planner process plans step s + 1 while step s runs, so only planning
           beyond the step's time is exposed, plus taking the plan from the process (measured: a
           planner.Planner round trip with the plan already made)
  step     the simulator's predicted step time of the plan (CostModel.predict_step_time), and the wait as
           a share of it
With --baseline DIR (a checkout of the code before: e.g. `git worktree add /tmp/before <commit>`), the same
batches through DIR's scheduler in a worker process, alternating with ours: there every rank computed the
whole plan on the training loop's thread, so its wait is its whole planning time. Its predicted step time
is shown where its plan differs (skrull_plus above skrull_plus.PLUS_GLOBAL_DP DP ranks).
--interference: a loop of small torch ops timed alone, beside a planner thread, and beside the planner
process (why planner.py plans in a process).
--split: the DP split alone, in numpy rounds (as shipped) vs one sequence at a time off the heap, alternating.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from functools import partial

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # the baseline worker runs as a script, with its own code first on sys.path
    sys.path.insert(0, ROOT)

CP, C, PER_RANK, SHAPES, POLICIES = 8, 26_000, 64, ("wikipedia", "lmsys", "chatqa2"), ("skrull", "skrull_plus")


def batches(gpus, n, seed=0):
    """n global batches per shape for `gpus` GPUs: {shape: [lengths]} (simulate.sample_global_batch)."""
    from simulate import sample_global_batch
    rng = np.random.default_rng(seed + gpus)
    return {ds: [sample_global_batch(ds, gpus // CP * PER_RANK, rng, CP * C) for _ in range(n)] for ds in SHAPES}


def cpu_ms(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        out.append((time.thread_time() - t0) * 1e3)
    return out


def sample_ranks(dp):
    return sorted({0, dp // 2, dp - 1})


def measure_after(lengths, dp, policy, repeats, planner_rt):
    """Our code: (per-rank planning CPU ms, predicted step s, planner round trip ms)."""
    from scheduler import CostModel, schedule
    cost = CostModel("qwen2.5-0.5b")
    kw = dict(dp=dp, cp=CP, bucket_size=C, policy=policy, cost=cost)
    times = [t for r in sample_ranks(dp) for t in cpu_ms(lambda: schedule(lengths, dp_rank=r, **kw), repeats)]
    step = cost.predict_step_time(schedule(lengths, **kw), lengths)
    return times, step, planner_rt(lengths, kw)


def planner_round_trip(lengths, kw):
    """ms to take a plan the planner process has already made (pickled RankPlan through a queue)."""
    from planner import Planner
    p = Planner(dict(dp_rank=kw["dp"] - 1, **{k: v for k, v in kw.items() if k != "cost"}))
    try:
        p.submit(0, lengths, 0, kw["cost"])
        while p._results.empty():  # let it finish planning: the step would be running meanwhile
            time.sleep(0.01)
        time.sleep(0.05)
        return p.take(0, lengths, 0, kw["cost"]).wait_ms
    finally:
        p.close()


def baseline_worker():
    """Runs as `python bench/plan.py --worker DIR`: DIR's scheduler on the jobs read from stdin, one JSON
    line per job, answering each with its CPU times (whole plan, as every rank computed it) and step time."""
    d = sys.argv[sys.argv.index("--worker") + 1]
    sys.path.insert(0, d)
    import scheduler
    import skrull_plus  # noqa: F401  registers skrull_plus
    cost = scheduler.CostModel("qwen2.5-0.5b")
    for line in sys.stdin:
        job = json.loads(line)
        kw = dict(dp=job["dp"], cp=CP, bucket_size=C, policy=job["policy"], cost=cost)
        plan = None

        def run():
            nonlocal plan
            plan = scheduler.schedule(job["lengths"], **kw)
        times = cpu_ms(run, job["repeats"])
        print(json.dumps({"times": times, "step": cost.predict_step_time(plan, job["lengths"])}), flush=True)


def fmt(xs):
    med = statistics.median(xs)
    return f"{med:8.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def table(args):
    import skrull_plus  # noqa: F401  registers skrull_plus
    worker = None
    if args.baseline:
        worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", os.path.abspath(args.baseline)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=args.baseline,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    print(f"# python -m bench.plan {' '.join(sys.argv[1:])}")
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start; CPU ms per step, median [min-max]")
    print("| GPUs | DP x CP | shape | policy | step (ms, predicted) | plan per rank (ms) | wait (ms) | wait / step |"
          + (" before: plan = wait (ms) | before: wait / step | before: step (ms) |" if worker else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if worker else ""))
    for gpus in args.gpus:
        dp = gpus // CP
        repeats = args.repeats if gpus <= 512 else 1
        for ds, bs in batches(gpus, args.batches).items():
            for policy in POLICIES:
                plan, steps, rts, before, before_steps = [], [], [], [], []
                for lengths in bs:  # alternating: ours, then the baseline, batch after batch
                    times, step, rt = measure_after(lengths, dp, policy, repeats, planner_round_trip)
                    plan += times
                    steps.append(step)
                    rts.append(rt)
                    if worker:
                        worker.stdin.write(json.dumps(dict(lengths=lengths, dp=dp, policy=policy, repeats=repeats)) + "\n")
                        worker.stdin.flush()
                        got = json.loads(worker.stdout.readline())
                        before += got["times"]
                        before_steps.append(got["step"])
                step_ms = statistics.mean(steps) * 1e3
                waits = [max(0.0, p - step_ms) + statistics.median(rts) for p in plan]
                row = (f"| {gpus} | {dp} x {CP} | {ds} | {policy} | {step_ms:.1f} | {fmt(plan)} | {fmt(waits)} | "
                       f"{100 * statistics.median(waits) / step_ms:.2f}% |")
                if worker:
                    before_ms = statistics.mean(before_steps) * 1e3
                    row += (f" {fmt(before)} | {100 * statistics.median(before) / before_ms:.1f}% | "
                            f"{'same' if abs(before_ms - step_ms) < 1e-6 * step_ms else f'{before_ms:.1f}'} |")
                print(row, flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    if worker:
        worker.stdin.close()
        worker.wait()


def interference(reps=5):
    """A loop of small torch ops (a training loop launching kernels) timed alone, beside a thread that plans
    skrull_plus at 32 GPUs back to back, and beside the planner process doing the same."""
    import torch
    from planner import Planner
    from scheduler import CostModel, schedule
    import skrull_plus  # noqa: F401
    torch.set_num_threads(1)
    lengths = batches(32, 1)["lmsys"][0]
    kw = dict(dp=4, cp=CP, bucket_size=C, policy="skrull_plus", dp_rank=0)
    fn = partial(schedule, **kw)
    cost = CostModel("qwen2.5-0.5b")
    x = torch.randn(64, 64)

    def loop(n=2000):
        t0, y = time.perf_counter(), x
        for _ in range(n):
            y = torch.tanh(y @ x)
        return (time.perf_counter() - t0) * 1e3

    def beside(start, stop):
        start()
        try:
            return [loop() for _ in range(reps)]
        finally:
            stop()
    busy = threading.Event()

    def planning_thread():
        while busy.is_set():
            fn(lengths, seed=0, cost=cost)
    runs = {"alone": [loop() for _ in range(reps)]}
    th = threading.Thread(target=planning_thread)
    runs["beside a planning thread"] = beside(lambda: (busy.set(), th.start()), lambda: (busy.clear(), th.join()))
    p = Planner(kw)
    flood = lambda: [p.submit(k, lengths, 0, cost) for k in range(200)]  # noqa: E731  more than the loop lasts
    runs["beside the planner process"] = beside(flood, p._proc.kill)
    print(f"# interference: {reps} runs of 2000 small torch ops (64x64 matmul + tanh, 1 thread), ms, median "
          f"[min-max]; load average {os.getloadavg()[0]:.1f}; switch interval {sys.getswitchinterval() * 1e3:.0f} ms")
    for name, ts in runs.items():
        print(f"  {name:28s} {fmt(ts)}")


def split_rounds(args, reps=7):
    """The DP split alone (scheduler.gds_split, skrull's estimates): in numpy rounds (lpt_ranks, as shipped)
    and one sequence at a time off the heap (LPT_ROUND above the sequence count), alternating call by call
    on the same batches. Both give the same split (checked here too)."""
    import scheduler
    from scheduler import CostModel, gds_split, local_times
    cost, default = CostModel("qwen2.5-0.5b"), scheduler.LPT_ROUND
    print(f"# the DP split, rounds vs heap only: {reps} alternating calls per batch, {args.batches} batches per shape; "
          f"CPU ms, median [min-max]; load average {os.getloadavg()[0]:.1f}")
    print("| GPUs | DP | shape | rounds (ms) | heap only (ms) | heap / rounds |\n|---|---|---|---|---|---|")
    for gpus in args.gpus:
        dp = gpus // CP
        for ds, bs in batches(gpus, args.batches).items():
            t = {"rounds": [], "heap": []}
            for lengths in bs:
                t_local = local_times(lengths, cost)
                splits = {}
                for _ in range(reps):
                    for name, lpt_round in (("rounds", default), ("heap", len(lengths) + 1)):
                        scheduler.LPT_ROUND = lpt_round
                        try:
                            t[name] += cpu_ms(lambda: splits.__setitem__(name, gds_split(lengths, dp, CP, C, cost, t_local)), 1)
                        finally:
                            scheduler.LPT_ROUND = default
                assert splits["rounds"] == splits["heap"], "the rounds' split differs from the heap's"
            print(f"| {gpus} | {dp} | {ds} | {fmt(t['rounds'])} | {fmt(t['heap'])} | "
                  f"{statistics.median(t['heap']) / statistics.median(t['rounds']):.2f}x |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


def main():
    if "--worker" in sys.argv:
        return baseline_worker()
    ap = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="DIR", help="a checkout of the code before, measured beside ours")
    ap.add_argument("--gpus", default="32,128,512,4096", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batches", type=int, default=2, help="global batches per shape")
    ap.add_argument("--repeats", type=int, default=3, help="calls per batch and rank (1 at 4096 GPUs)")
    ap.add_argument("--interference", action="store_true", help="only the thread-vs-process interference")
    ap.add_argument("--split", action="store_true", help="only the DP split: numpy rounds vs the heap alone")
    args = ap.parse_args()
    if args.interference:
        return interference()
    if args.split:
        return split_rounds(args)
    table(args)


if __name__ == "__main__":
    main()
