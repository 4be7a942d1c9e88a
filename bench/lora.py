"""LoRA vs full fine-tuning in one command: train.py config/long_sft_cpu.py (skrull schedule, 1 process,
1 thread) with and without adapters on the same global batches, the two alternating. Trainable
parameters and optimizer-state bytes are read back from each run's checkpoint (the AdamW tensors it
holds: exp_avg, exp_avg_sq, step); tokens/s is the median over the timed steps of a run, and the table
gives the median and the range over --reps runs.

    python -m bench.lora [--iters 30] [--warmup 3] [--reps 3] [--lora_rank 8] [--lora_targets all] [--model_preset tiny]
"""
import argparse
import math
import os
import statistics
import tempfile

from bench.common import median_range, train_run

def optimizer_state(out_dir):
    """-> (trainable parameters, optimizer-state bytes) from the AdamW tensors of a run's newest checkpoint
    (DCP's .metadata lists every tensor's full shape and dtype; no tensor is read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from checkpoint import latest
    items = FileSystemReader(latest(out_dir)).read_metadata().state_dict_metadata
    optim = {k: v for k, v in items.items() if k.startswith("optim.state.")}
    trainable = sum(math.prod(v.size) for k, v in optim.items() if k.endswith(".exp_avg"))
    nbytes = sum(math.prod(v.size) * v.properties.dtype.itemsize for v in optim.values())
    return trainable, nbytes


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the timing")
    ap.add_argument("--reps", type=int, default=3, help="runs per setting, alternating LoRA and full")
    ap.add_argument("--lora_rank", type=int, default=8)
    ap.add_argument("--lora_targets", default="all")
    ap.add_argument("--model_preset", default="tiny", help="model.PRESETS key")
    args = ap.parse_args(argv)
    settings = {"full": {}, "lora": {"lora_rank": args.lora_rank, "lora_alpha": 2 * args.lora_rank,
                                     "lora_targets": args.lora_targets}}
    tmp = tempfile.mkdtemp(prefix="skrull_lora_")  # kept: run logs for inspection
    tps, state = {k: [] for k in settings}, {}
    for rep in range(args.reps):
        for name in (settings if rep % 2 == 0 else list(settings)[::-1]):
            out = os.path.join(tmp, f"{name}_{rep}")
            m = train_run(out, 1, dict(max_iters=args.iters, checkpoint_interval=args.iters, threads=1, export=False,
                                       model_preset=args.model_preset, eval_interval=0, **settings[name]))
            tps[name].append(statistics.median(r["tok_per_s"] for r in m[args.warmup:]))
            state[name] = optimizer_state(out)
            print(f"  {name} rep {rep}: {tps[name][-1]:,.0f} tok/s (median of steps {args.warmup}..{args.iters - 1})", flush=True)
    print(f"\nLoRA (r={args.lora_rank}, alpha={2 * args.lora_rank}, targets {args.lora_targets}) vs full fine-tuning, "
          f"model preset {args.model_preset}, train.py config/long_sft_cpu.py, 1 process x 1 thread, "
          f"{args.iters - args.warmup} timed steps x {args.reps} runs each, alternating")
    print("| setting | trainable params | vs full | optimizer-state bytes | tok/s median | tok/s range |")
    print("|---|---|---|---|---|---|")
    for name in settings:
        trainable, nbytes = state[name]
        median, lo, hi = median_range(tps[name])
        print(f"| {name} | {trainable:,} | {100 * trainable / state['full'][0]:.1f}% | {nbytes:,} | "
              f"{median:,.0f} | {lo:,.0f}-{hi:,.0f} |")
    ratio = statistics.median(tps["lora"]) / statistics.median(tps["full"])
    print(f"LoRA / full: {state['lora'][0] / state['full'][0]:.3f}x trainable parameters, "
          f"{state['lora'][1] / state['full'][1]:.3f}x optimizer state, {ratio:.2f}x tokens/s")


if __name__ == "__main__":
    main()
