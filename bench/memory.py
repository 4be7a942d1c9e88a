"""FSDP2 (train.py fsdp=True) against the plain all-reduce, and the memory model against a GPU.

CPU (default): config/long_sft_cpu.py on 4 gloo processes (dp 2 x cp 2, 1 thread each), fsdp off and on
alternately, `--reps` times: median step time (steps after the first) and the state each rank holds.
--gpu: config/long_sft.py on one CUDA GPU (dp 1 x cp 1, the bucket cut to what one rank holds) with
fsdp=True, in each activation_checkpoint mode: torch.cuda.max_memory_allocated of every step next to
memory.py's prediction for that step (static state + beta + alpha x the rank's peak tokens).

    python -m bench.memory [--iters 6] [--reps 3]
    python -m bench.memory --gpu [--iters 3] [--bucket_size 26000] [--batch_size 16]
"""
import argparse
import statistics
import tempfile

from bench.common import median_range, train_run


def gpu_memory(args, tmp):
    iters = args.iters or 3
    print(f"config/long_sft.py, 1 GPU, fsdp=True, bucket {args.bucket_size}, batch {args.batch_size}, {iters} steps per mode")
    print(f"{'mode':>10} {'step':>4} {'peak tok':>8} {'measured GiB':>12} {'predicted GiB':>13} {'measured/pred':>13}")
    for mode in ("none", "full", "selective"):
        recs = train_run(f"{tmp}/{mode}", 1, dict(cp=1, fsdp=True, activation_checkpoint=mode, max_iters=iters,
                                                 bucket_size=args.bucket_size, synthetic_max_len=args.bucket_size,
                                                 batch_size=args.batch_size, checkpoint_interval=0,
                                                 eval_interval=0, export=False),
                         config="config/long_sft.py")
        for r in recs:
            m, p = r["max_memory_allocated"], r["predicted_memory"]
            print(f"{mode:>10} {r['iter']:>4} {r['peak_tokens_per_rank']:>8} {m / 2**30:>12.2f} {p / 2**30:>13.2f} {m / p:>13.3f}")


def cpu_fsdp_vs_allreduce(args, tmp):
    iters = args.iters or 6
    print(f"config/long_sft_cpu.py, 4 gloo ranks (dp 2 x cp 2), {iters} steps, median step time of steps 2..{iters}")
    print(f"{'rep':>3} {'all-reduce ms':>13} {'fsdp ms':>8} {'fsdp/all-reduce':>15}")
    ratios, state = [], {}
    for rep in range(args.reps):
        ms = {}
        for fsdp in (False, True):
            recs = train_run(f"{tmp}/{rep}_{fsdp}", 4, dict(cp=2, fsdp=fsdp, max_iters=iters, checkpoint_interval=0, threads=1,
                                                           eval_interval=0, export=False))
            ms[fsdp] = statistics.median(r["dt_ms"] for r in recs[1:])
            state[fsdp] = (recs[0]["state_bytes_per_rank"], recs[0]["peak_state_bytes_per_rank"])
        ratios.append(ms[True] / ms[False])
        print(f"{rep:>3} {ms[False]:>13.1f} {ms[True]:>8.1f} {ratios[-1]:>15.2f}")
    median, lo, hi = median_range(ratios)
    print(f"fsdp/all-reduce step time: median {median:.2f} (min {lo:.2f}, max {hi:.2f})")
    for fsdp in (False, True):
        print(f"fsdp={fsdp}: state_bytes_per_rank {state[fsdp][0]:,}  peak_state_bytes_per_rank {state[fsdp][1]:,}")
    print(f"state with fsdp / without: {state[True][0] / state[False][0]:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket_size", type=int, default=26000)
    ap.add_argument("--batch_size", type=int, default=16)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    if args.gpu:
        gpu_memory(args, tmp)
    else:
        cpu_fsdp_vs_allreduce(args, tmp)


if __name__ == "__main__":
    main()
