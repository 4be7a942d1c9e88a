"""
What train.py checks before it trains: validate_config() looks at every config value before anything is
read or written (out_dir, the data, the checkpoint), so a bad value ends the run with one line and leaves
out_dir as it was; dry_run() plans a few global batches for a world of devices that need not exist and
prints whether each rank's memory fits. A new config key gets its check here, and a place in
checkpoint.RESUME_MUST_MATCH if it changes the data order or the model.
"""
import json
import math
import os
from types import SimpleNamespace

import torch

import run_guard
import scheduler
from checkpoint import RESUME_MUST_MATCH, read_metadata, resume_identity
from data.synthetic import MIN_LEN, TABLE1
from memory import USABLE
from model import PRESETS


def fail(msg):
    """End the run with a one-line message (no traceback) and a non-zero exit; only rank 0 prints."""
    raise SystemExit(f"error: {msg}" if int(os.environ.get("RANK", 0)) == 0 else 1)


def validate_config(config, world_size, ddp):
    """Check train.py's `config` (its values as given) for a run of `world_size` ranks (ddp: under torchrun).
    Returns the checkpoint's metadata when resuming (its header only), else None."""
    c = SimpleNamespace(**config)
    _check_numbers(c)
    _check_choices(c, world_size, ddp)
    _check_paths(c)
    return _check_out_dir(c, world_size // c.cp)


def _check_numbers(c):
    for k in ("batch_size", "log_interval", "cp", "synthetic_n", "eval_batches"):
        if getattr(c, k) < 1:
            fail(f"{k}={getattr(c, k)}: must be >= 1")
    for k in ("max_iters", "checkpoint_interval", "warmup_iters", "bucket_size", "eval_interval", "lora_rank"):
        if getattr(c, k) < 0:
            fail(f"{k}={getattr(c, k)}: must be >= 0")
    for k in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
        v = getattr(c, k)
        if not math.isfinite(v) or v < 0 or (k == "learning_rate" and v == 0) or (k.startswith("beta") and v >= 1):
            fail(f"{k}={v}: must be finite and " + ("in [0, 1)" if k.startswith("beta") else "> 0" if k == "learning_rate" else ">= 0"))
    for k in ("threads", "lr_decay_iters"):  # None defaults accept any literal: check the type here
        v = getattr(c, k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            fail(f"{k}={v!r}: must be an integer >= 1 (or None for the default)")
    for k in ("dataset", "profile"):
        if getattr(c, k) is not None and not isinstance(getattr(c, k), str):
            fail(f"{k}={getattr(c, k)!r}: expected a path")
    if not 0.0 <= c.eval_fraction < 1.0:
        fail(f"eval_fraction={c.eval_fraction}: must be in [0, 1)")


def _check_choices(c, world_size, ddp):
    if c.lora_rank:
        from lora import parse_targets
        if c.lora_alpha <= 0:
            fail(f"lora_alpha={c.lora_alpha}: must be > 0")
        try:
            parse_targets(c.lora_targets)
        except ValueError as e:
            fail(str(e))
    if c.schedule not in scheduler.POLICIES:
        fail(f"schedule={c.schedule!r}: expected one of {', '.join(scheduler.POLICIES)}")
    if c.model_preset not in PRESETS:
        fail(f"model_preset={c.model_preset!r}: expected one of {', '.join(PRESETS)}")
    if c.synthetic_dist not in TABLE1:
        fail(f"synthetic_dist={c.synthetic_dist!r}: expected one of {', '.join(TABLE1)}")
    if c.synthetic_max_len < MIN_LEN:
        fail(f"synthetic_max_len={c.synthetic_max_len}: must be >= {MIN_LEN} (the shortest synthetic sample)")
    if c.dtype == "float16":
        fail("dtype='float16' is not supported: there is no loss scaling here, and gradients of a loss divided by "
             "the global target count (~1e5 tokens) underflow in fp16. Use bfloat16 (or float32)")
    if c.dtype not in ("float32", "bfloat16"):
        fail(f"dtype={c.dtype!r}: expected bfloat16 or float32")
    if c.device != "cpu" and not (c.device == "cuda" or (c.device.startswith("cuda:") and c.device[5:].isdigit())):
        fail(f"device={c.device!r}: expected cpu, cuda or cuda:N")
    if c.device.startswith("cuda") and not torch.cuda.is_available() and not c.dry_run:  # a dry run plans for a GPU
        fail(f"device={c.device!r} but CUDA is not available here (torch {torch.__version__}); use --device=cpu")
    if c.device.startswith("cuda") and c.dtype != "bfloat16":
        fail(f"dtype={c.dtype!r} on CUDA: attention runs flash kernels, which need bfloat16 (autocast); use dtype='bfloat16'")
    if c.activation_checkpoint not in ("none", "full", "selective"):
        fail(f"activation_checkpoint={c.activation_checkpoint!r}: expected none, full or selective")
    if c.fsdp is not None and not isinstance(c.fsdp, bool):
        fail(f"fsdp={c.fsdp!r}: expected True or False (or None for the default)")
    if c.fsdp and not ddp and not c.dry_run:
        fail("fsdp=True needs a process group: launch with torchrun (--nproc_per_node=1 for one device)")
    if c.dry_run and ddp:
        fail("dry_run plans for dry_run_world ranks in one process: run it with python, not torchrun")
    if c.dry_run_world < 0 or c.device_memory < 0:
        fail(f"dry_run_world={c.dry_run_world}, device_memory={c.device_memory}: must be >= 0 (0 -> the default)")
    if world_size % c.cp:
        fail(f"world size {world_size} is not divisible by cp={c.cp}")


def _check_paths(c):
    if c.profile is not None and not os.path.isfile(c.profile):
        fail(f"profile={c.profile!r}: no such file (make one with `python calibrate.py`)")
    if c.dataset is not None and not os.path.isfile(os.path.join(c.dataset, "meta.json")):
        fail(f"dataset={c.dataset!r}: not a prepared dataset directory (make one with data/prepare.py), "
             f"or leave dataset unset for the synthetic set")
    if c.init_from not in ("scratch", "resume"):
        if os.path.exists(os.path.join(c.init_from, "ckpt.safetensors")):
            fail(f"init_from={c.init_from!r} is a training run's out_dir, not a Hugging Face checkpoint: "
                 f"to continue it use --init_from=resume --out_dir={c.init_from}")
        if not os.path.isfile(os.path.join(c.init_from, "config.json")):
            fail(f"init_from={c.init_from!r}: expected 'scratch', 'resume' or a local Hugging Face Qwen2 directory "
                 f"(config.json + model.safetensors)")
    if os.path.exists(c.out_dir) and not os.path.isdir(c.out_dir):
        fail(f"out_dir={c.out_dir!r} is a file, not a directory")


def _check_out_dir(c, dp):
    """Any run refuses an out_dir that a live run owns (run_guard's lock); a fresh run refuses an out_dir
    holding a run unless overwrite=True; a resumed run refuses a checkpoint whose RESUME_MUST_MATCH values
    differ from this config's. Returns the checkpoint's metadata when resuming. train.py runs this again
    under the lock (run_guard.RunGuard), for a run that started in between."""
    ckpt = os.path.join(c.out_dir, "ckpt.safetensors")
    run_files = [f for f in ("ckpt.safetensors", "metrics.jsonl") if os.path.exists(os.path.join(c.out_dir, f))]
    if c.dry_run:  # plans only: writes nothing, so out_dir may hold anything
        return None
    owner = run_guard.live_owner(c.out_dir)
    if owner is not None:
        fail(run_guard.refusal(c.out_dir, owner))
    if c.init_from != "resume":
        if run_files and not c.overwrite:
            fail(f"out_dir={c.out_dir!r} already holds a run ({', '.join(run_files)}): continue it with --init_from=resume, "
                 f"or start over with --overwrite=True (replaces its checkpoint and metrics)")
        return None
    if not os.path.isfile(ckpt):
        fail(f"init_from='resume' but {ckpt} does not exist")
    try:
        meta = read_metadata(ckpt)
    except ValueError as e:
        fail(str(e))
    if "resume_identity" not in meta:
        fail(f"{ckpt} records no run identity (written by an older train.py), so resume cannot check it continues "
             f"the same run")
    if int(meta["iter"]) > c.max_iters:
        fail(f"max_iters={c.max_iters} is below the checkpoint's iteration {meta['iter']}: raise max_iters to continue")
    saved = json.loads(meta["resume_identity"])
    ds_meta = {}
    if c.dataset is not None:
        with open(os.path.join(c.dataset, "meta.json")) as f:
            ds_meta = json.load(f)
    mine = resume_identity(vars(c), dp, ds_meta)
    diff = [f"{k} {saved.get(k)!r} -> {mine.get(k)!r}" for k in RESUME_MUST_MATCH if saved.get(k) != mine.get(k)]
    if diff:
        fail(f"resume would not continue the same run; these settings differ from the checkpoint's: {'; '.join(diff)}. "
             f"Keep them, or start a new run in another out_dir")
    return meta


def check_bucket(bucket_size, cp, longest, dataset):
    """bucket_size (resolved: 0 was replaced by the profile's or the memory model's) as an int, checked to
    hold the dataset's longest sample at this cp: fail now, not at the step that first draws it."""
    if not bucket_size or bucket_size < 0:
        fail(f"bucket_size={bucket_size}: give a positive bucket_size (0 takes it from the profile or the memory model, "
             f"which leaves no room for activations here)")
    bucket_size = int(bucket_size)
    try:  # the scheduler's own check
        scheduler.schedule([longest], dp=1, cp=cp, bucket_size=bucket_size, policy="naive")
    except ValueError as e:
        fail(f"dataset {dataset}, its longest sample ({longest} tokens): {e}. "
             f"Raise cp or bucket_size, or re-prepare with --max_len")
    return bucket_size


def dry_run(lengths_list, *, dp, cp, bucket_size, policy, seed, cost, mem, model_name, dataset, out=print):
    """Plan the global batches of lengths `lengths_list` (as training would: step i's plan seed is seed + i)
    and print each rank's predicted memory (memory.MemoryModel `mem`) and step time (scheduler.CostModel
    `cost`) against the device. Returns the exit code: 0 when every rank fits, 1 (after naming the worst
    rank and its excess) if not."""
    plans = [scheduler.schedule(lengths, dp=dp, cp=cp, bucket_size=bucket_size, policy=policy, cost=cost, seed=seed + it)
             for it, lengths in enumerate(lengths_list)]
    world = dp * cp
    out(f"dry run: {model_name} ({mem.static['n_params'] / 1e9:.2f}B params) | world {world} = dp {dp} x cp {cp} | "
        f"fsdp {mem.fsdp} | activation_checkpoint {mem.recompute} | bucket {bucket_size} | "
        f"{len(plans)} global batches of {dataset}")
    peak_tokens, step_time = _rank_peaks(plans, lengths_list, cp, cost)
    usable = USABLE * mem.device_memory
    static = mem.static["peak"]
    out(f"per rank: static = parameters, gradients, AdamW state + working set; activations = beta + alpha x peak tokens "
        f"(alpha {mem.alpha / 2**10:,.1f} KiB/token, beta {mem.beta / 2**30:.2f} GiB); "
        f"usable {USABLE:.0%} of {mem.device_memory / 1e9:.0f} GB = {usable / 2**30:.1f} GiB")
    out(f"{'rank':>5} {'dp':>3} {'cp':>3} {'static GiB':>10} {'peak tok':>9} {'activ GiB':>9} {'total GiB':>9} {'step s':>8}  fits")
    over = []
    for r in range(world):
        act = mem.beta + mem.alpha * peak_tokens[r]
        total = static + act
        fits = total <= usable
        if not fits:
            over.append((total - usable, r))
        out(f"{r:>5} {r // cp:>3} {r % cp:>3} {static / 2**30:>10.2f} {peak_tokens[r]:>9} {act / 2**30:>9.2f} "
            f"{total / 2**30:>9.2f} {step_time[r]:>8.2f}  {'yes' if fits else 'NO'}")
    if over:
        excess, r = max(over)
        out(f"does not fit: rank {r} (dp {r // cp}, cp {r % cp}) needs {(static + mem.beta + mem.alpha * peak_tokens[r]) / 2**30:.2f} GiB, "
            f"{excess / 2**30:.2f} GiB over the usable {usable / 2**30:.1f} GiB ({len(over)} of {world} ranks over); "
            f"lower bucket_size (the memory model's: {mem.bucket_size})"
            + (" or recompute more (activation_checkpoint)" if mem.recompute != "full" else ""))
        return 1
    out(f"fits: every rank within the usable {usable / 2**30:.1f} GiB (largest total "
        f"{(static + mem.beta + mem.alpha * max(peak_tokens)) / 2**30:.2f} GiB)")
    return 0


def _rank_peaks(plans, lengths_list, cp, cost):
    """Per rank, over the plans: the most tokens it holds in one micro-batch, and the longest step time."""
    world = len(plans[0]) * cp
    peak_tokens, step_time = [0] * world, [0.0] * world
    for plan, lengths in zip(plans, lengths_list):
        for d, mbs in enumerate(plan):
            t = cost.dp_rank_time(mbs, lengths) + cost.t_step(world)  # CP peers wait for each other at the ring
            tokens = [mb.rank_tokens(lengths) for mb in mbs]  # per micro-batch, per CP rank
            for c in range(cp):
                r = d * cp + c
                peak_tokens[r] = max([peak_tokens[r]] + [per_rank[c] for per_rank in tokens])
                step_time[r] = max(step_time[r], t)
    return peak_tokens, step_time
