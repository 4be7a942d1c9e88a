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
from checkpoint import OLD_FILE, RESUME_MUST_MATCH, find, latest, read_metadata, resume_identity
from data.synthetic import MIN_LEN, TABLE1
from memory import USABLE
from model import PRESETS, ROPE_TYPES, ModelConfig


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
    for k in ("batch_size", "log_interval", "cp", "synthetic_n", "eval_batches", "calibrate_interval"):
        if getattr(c, k) < 1:
            fail(f"{k}={getattr(c, k)}: must be >= 1")
    for k in ("max_iters", "checkpoint_interval", "warmup_iters", "bucket_size", "eval_interval", "lora_rank", "calibrate_freeze"):
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
    if not (isinstance(c.peak_flops, (int, float)) and math.isfinite(c.peak_flops) and c.peak_flops >= 0):
        fail(f"peak_flops={c.peak_flops!r}: must be a finite number of FLOP/s >= 0 (0: the table of known GPUs)")
    if not 0.0 <= c.eval_fraction < 1.0:
        fail(f"eval_fraction={c.eval_fraction}: must be in [0, 1)")
    for k in ("rope_theta", "rope_scaling_factor", "rope_original_max_position"):  # None keeps the checkpoint's
        v, integer = getattr(c, k), k == "rope_original_max_position"
        if v is not None and (isinstance(v, bool) or not isinstance(v, int if integer else (int, float))
                              or not math.isfinite(v) or v < 1):
            fail(f"{k}={v!r}: must be {'an integer' if integer else 'a number'} >= 1 (or None: the checkpoint's)")
    if c.rope_scaling_type is not None and c.rope_scaling_type not in ROPE_TYPES:
        fail(f"rope_scaling_type={c.rope_scaling_type!r} is not implemented; expected one of {', '.join(ROPE_TYPES)}")


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
    if c.model_preset not in PRESETS and not _hf_config_file(c.model_preset):
        fail(f"model_preset={c.model_preset!r}: expected one of {', '.join(PRESETS)}, or a Hugging Face config.json "
             f"(or a directory holding one)")
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
    if not isinstance(c.async_save, bool):
        fail(f"async_save={c.async_save!r}: expected True or False")
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
        if os.path.isdir(os.path.join(c.init_from, "ckpt")) or os.path.exists(os.path.join(c.init_from, OLD_FILE)):
            fail(f"init_from={c.init_from!r} is a training run's out_dir, not a Hugging Face checkpoint: "
                 f"to continue it use --init_from=resume --out_dir={c.init_from}")
        if not os.path.isfile(os.path.join(c.init_from, "config.json")):
            fail(f"init_from={c.init_from!r}: expected 'scratch', 'resume' or a local Hugging Face Qwen2, Qwen3 or Llama 3 "
                 f"directory (config.json + model.safetensors)")
        weights = ("model.safetensors", "model.safetensors.index.json")
        if not c.dry_run and not any(os.path.isfile(os.path.join(c.init_from, w)) for w in weights):
            fail(f"init_from={c.init_from!r} has a config.json but no model.safetensors or model.safetensors.index.json "
                 f"(a config.json alone is enough for --dry_run=True)")
    if os.path.exists(c.out_dir) and not os.path.isdir(c.out_dir):
        fail(f"out_dir={c.out_dir!r} is a file, not a directory")


def _check_out_dir(c, dp):
    """Any run refuses an out_dir that a live run owns (run_guard's lock); a fresh run refuses an out_dir
    holding a run unless overwrite=True; a resumed run refuses a checkpoint whose RESUME_MUST_MATCH values
    differ from this config's. Returns the checkpoint's metadata when resuming. train.py runs this again
    under the lock (run_guard.RunGuard), for a run that started in between."""
    run_files = [f for f in ("ckpt", OLD_FILE, "metrics.jsonl") if os.path.exists(os.path.join(c.out_dir, f))]
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
    if latest(c.out_dir) is None and not os.path.exists(os.path.join(c.out_dir, OLD_FILE)):
        fail(f"init_from='resume' but {os.path.join(c.out_dir, 'ckpt')} holds no checkpoint (it does not exist)")
    try:
        ckpt = find(c.out_dir)
        meta = read_metadata(ckpt)
    except ValueError as e:
        fail(str(e))
    if "resume_identity" not in meta:
        fail(f"{ckpt} records no run identity (written by an older train.py), so resume cannot check it continues "
             f"the same run")
    if int(meta["iter"]) > c.max_iters:
        fail(f"max_iters={c.max_iters} is below the checkpoint's iteration {meta['iter']}: raise max_iters to continue")
    saved = meta["resume_identity"]
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


def _hf_config_file(path):
    """The config.json that `path` names (the file, or a directory holding it), or None."""
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    return path if os.path.isfile(path) else None


def model_config(config, meta_ckpt, dataset_vocab):
    """The ModelConfig of train.py's run (`config`, its values): the checkpoint's when resuming (metadata
    `meta_ckpt`), model_preset's when starting from scratch (a preset or a config.json, its vocabulary grown
    to the dataset tokenizer's rounded up to 64), else init_from's config.json; then the rope_* keys over its
    RoPE. Reads no weights, so a dry run needs a config.json only."""
    c = SimpleNamespace(**config)
    source = "model_preset" if c.init_from == "scratch" else "init_from"
    try:
        if c.init_from == "resume":
            mc = ModelConfig(**meta_ckpt["model_config"])
        elif c.init_from == "scratch" and c.model_preset in PRESETS:
            mc = PRESETS[c.model_preset]
        else:
            with open(_hf_config_file(c.model_preset if c.init_from == "scratch" else c.init_from)) as f:
                mc = ModelConfig.from_hf(json.load(f))
        if c.init_from == "scratch":
            mc = ModelConfig(**{**mc.__dict__, "vocab_size": max(mc.vocab_size, -(-dataset_vocab // 64) * 64)})
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{source}={getattr(c, source)!r}: {e}")
    try:
        mc = mc.with_rope(c.rope_theta, c.rope_scaling_type, c.rope_scaling_factor, c.rope_original_max_position)
    except ValueError as e:
        fail(f"RoPE of {getattr(c, source)!r} with rope_theta={c.rope_theta}, rope_scaling_type={c.rope_scaling_type!r}, "
             f"rope_scaling_factor={c.rope_scaling_factor}, rope_original_max_position={c.rope_original_max_position}: {e}")
    if dataset_vocab > mc.vocab_size:
        fail(f"dataset vocab {dataset_vocab} exceeds the model's {mc.vocab_size}: prepare the data with the model's tokenizer")
    return mc


def check_profile_regime(profile, *, fsdp, activation_checkpoint, dtype, world, out=print):
    """Warn (one line through `out`) when the profile JSON from calibrate.py was measured in another regime
    than this run's (fsdp, activation_checkpoint, dtype; under FSDP2 also the world size, which sets the
    state per rank): its compute constants and bucket_size then describe that other regime. Returns the
    warning, or None."""
    regime = profile.get("regime")
    if regime is None:
        msg = ("the profile records no regime (made by an older calibrate.py): its constants and bucket_size may "
               "describe another regime than this run's; rerun `python calibrate.py`")
    else:
        mine = {"fsdp": bool(fsdp), "activation_checkpoint": activation_checkpoint, "dtype": dtype}
        if fsdp and regime.get("fsdp"):
            mine["world"] = world
        diff = [f"{k} {regime.get(k)!r} there, {v!r} here" for k, v in mine.items() if regime.get(k) != v]
        if not diff:
            return None
        msg = (f"the profile was measured in another regime than this run's ({'; '.join(diff)}): its compute "
               f"constants and bucket_size describe that one; rerun `python calibrate.py` with "
               f"--fsdp/--activation_checkpoint/--procs to match")
    out(f"warning: {msg}")
    return msg


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
    out(f"dry run: {model_name} ({mem.static['n_params'] / 1e9:.2f}B params, {_family_and_rope(cost.config)}) | "
        f"world {world} = dp {dp} x cp {cp} | "
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


def _family_and_rope(config):
    """'qwen3, RoPE theta 1e+06 yarn factor=2 original_max_position_embeddings=32768': the dry run's header."""
    scaling, theta = dict(getattr(config, "rope_scaling", None) or {}), getattr(config, "rope_theta", None)
    words = [f"{getattr(config, 'model_type', 'qwen2')}" + (f", RoPE theta {theta:g}" if theta is not None else "")]
    if scaling:
        words.append(scaling.pop("rope_type"))
        words += [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in scaling.items()]
    return " ".join(words)


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
