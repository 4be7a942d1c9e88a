"""
Long-context SFT with Skrull's dynamic data scheduling (arXiv 2505.19609).

On a laptop CPU:
    python train.py config/long_sft_cpu.py
On one GPU node (8 ranks = DP x CP, e.g. cp=8 -> dp=1):
    torchrun --nproc_per_node=8 train.py config/long_sft.py
Multi-node: the same command with torchrun's rendezvous flags (--nnodes, --rdzv_endpoint, ...).

One optimizer step = one global batch of `batch_size` sequences per DP rank. Every rank draws the same
global batch, computes the same plan with scheduler.schedule (the scheduler is pure and deterministic),
and loads only its own tokens: its zigzag shards of the micro-batch's distributed sequences plus its
local sequences. The loss is a sum over this rank's target tokens divided by the global batch's target
count, so the gradient does not depend on the schedule: the schedule decides which rank computes what,
never what is computed (tests/test_train.py checks equal losses and gradients across schedules and cp).

Safety: every config value is checked in validate_config() before anything is read or written; a run
refuses an out_dir that already holds a run unless it resumes it (init_from='resume') or deliberately
starts over (overwrite=True); resume refuses a config that would change the data order or the model
(RESUME_MUST_MATCH); a non-finite loss or gradient norm stops the run before the optimizer step, so no
checkpoint ever holds NaN weights; every step checks that all ranks hold the same batch and plan.
"""

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# default config values; override with config/*.py then --key=value (configurator.py)
# I/O
out_dir = "out"
init_from = "scratch"  # 'scratch' | 'resume' (continue the run in out_dir) | path to a local Hugging Face Qwen2/Qwen2.5 directory
overwrite = False  # True: a fresh run may replace the checkpoint and metrics of an earlier run in out_dir
model_preset = "tiny"  # model.PRESETS key, used when init_from='scratch'
checkpoint_interval = 50  # iters between checkpoints (and always at the end); 0 = never
log_interval = 1
dump_grads = False  # write the all-reduced gradients of the first step to out_dir/grads.safetensors
# data
dataset = None  # prepared directory (data/prepare.py); None -> generate the synthetic set below
synthetic_dist = "lmsys"  # wikipedia | lmsys | chatqa2 (paper Table 1 length shapes)
synthetic_n = 2000  # number of synthetic samples
synthetic_max_len = 4096  # longest synthetic sample, in tokens
# held-out evaluation
eval_fraction = 0.0  # share of the dataset held out (a seeded choice) and never trained on; 0 = no eval
eval_interval = 50  # evaluate after every eval_interval optimizer steps and after the last; 0 = never
eval_batches = 4  # held-out global batches per evaluation, the same ones every time
# LoRA (lora.py)
lora_rank = 0  # 0 = full fine-tuning; r > 0 trains rank-r adapters only, every other weight frozen
lora_alpha = 16  # adapter scale alpha / r (PEFT's convention)
lora_targets = "q_proj,k_proj,v_proj,o_proj"  # comma-separated projections to adapt, or "all"
export = True  # at the end, write out_dir/hf/ (Hugging Face Qwen2; LoRA merged) and out_dir/adapter/ (PEFT)
# Skrull
cp = 1  # context-parallel degree; dp = world_size // cp
schedule = "skrull"  # one of scheduler.POLICIES: naive | sorted | dacp | skrull (the paper) | skrull_plus (ours)
bucket_size = 4096  # BucketSize C: max tokens one rank holds for a micro-batch; 0 -> from `profile`
profile = None  # path to a profile JSON from `python bench.py profile` (cost constants, bucket_size)
batch_size = 8  # sequences per DP rank per optimizer step
# optimizer
max_iters = 200  # 0 writes the initial weights as the checkpoint (to measure a model before training)
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
lr_decay_iters = None  # None -> max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
# scale: sharding, recompute, memory
# FSDP2 over all dp x cp ranks (parameters, gradients, AdamW state). None -> on with CUDA under torchrun;
# off on CPU, where the CPU config at 4 gloo ranks was slower than the all-reduce path in all 12 side-by-side
# runs of `python bench.py memory` (medians 1.18x-1.76x) to save 9 MiB per rank a laptop does not need.
fsdp = None
activation_checkpoint = "none"  # none | full | selective (model.Block explains what each recomputes)
device_memory = 0  # bytes of one device for the memory model and the dry run; 0 -> the profile's, else 80e9
dry_run = False  # plan a few global batches, print each rank's predicted memory and time, exit 0 iff all fit
dry_run_world = 0  # ranks the dry run plans for (no process group is started); 0 -> cp
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # compute dtype on CUDA (autocast, or FSDP2's): bfloat16 | float32
compile = False
threads = None  # torch.set_num_threads per process on CPU; None -> torch's default
seed = 1337
# -----------------------------------------------------------------------------
_train_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in _train_keys}  # for logging and checkpoints
# -----------------------------------------------------------------------------

# start-up checks. validate_config() runs before anything touches out_dir or the data: a new config key
# gets its check there, and a place in RESUME_MUST_MATCH if it changes the data order or the model.

# The config keys a resumed run must keep: they decide the data order (seed, the global batch, the
# dataset) or the model, so changing them would silently train a different run. Everything else may
# change on resume: cp, schedule, bucket_size, profile, threads and device change only who computes what
# (the same losses, tested), and the intervals, max_iters and optimizer settings are the user's to
# change deliberately. "global_batch_size" is dp * batch_size: dp and batch_size may trade places.
RESUME_MUST_MATCH = ("seed", "global_batch_size", "dataset", "synthetic_dist", "synthetic_n", "synthetic_max_len",
                     "model_preset", "eval_fraction", "lora_rank", "lora_alpha", "lora_targets")


def die(msg):
    """End the run with a one-line message (no traceback) and a non-zero exit; only rank 0 prints."""
    raise SystemExit(f"error: {msg}" if int(os.environ.get("RANK", 0)) == 0 else 1)


def resume_identity(dp, ds_meta):
    """The RESUME_MUST_MATCH values of this run. A prepared dataset is identified by its contents' sizes
    and tokenizer (meta.json), not its path, so a moved directory still resumes; reading all its tokens to
    hash them would cost minutes on a large set."""
    got = {k: config[k] for k in RESUME_MUST_MATCH if k in config}
    got["global_batch_size"] = dp * batch_size
    if config["dataset"] is not None:  # config keeps the value given; `dataset` later names the synthetic dir
        got["dataset"] = {k: ds_meta.get(k) for k in ("n_seqs", "n_tokens", "n_trained_tokens", "tokenizer")}
        for k in ("synthetic_dist", "synthetic_n", "synthetic_max_len"):
            got[k] = None  # unused with a prepared dataset
    return got


def validate_config(world_size):
    """Check every config value before anything is read or written (out_dir, the data directory, the
    checkpoint), so a bad value ends the run here with one line instead of inside the loop. Returns the
    checkpoint's metadata when resuming (its header only), else None."""
    from model import PRESETS
    from scheduler import POLICIES
    from data.synthetic import MIN_LEN, TABLE1
    for k in ("batch_size", "log_interval", "cp", "synthetic_n", "eval_batches"):
        if globals()[k] < 1:
            die(f"{k}={globals()[k]}: must be >= 1")
    for k in ("max_iters", "checkpoint_interval", "warmup_iters", "bucket_size", "eval_interval", "lora_rank"):
        if globals()[k] < 0:
            die(f"{k}={globals()[k]}: must be >= 0")
    for k in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
        v = globals()[k]
        if not math.isfinite(v) or v < 0 or (k == "learning_rate" and v == 0) or (k.startswith("beta") and v >= 1):
            die(f"{k}={v}: must be finite and " + ("in [0, 1)" if k.startswith("beta") else "> 0" if k == "learning_rate" else ">= 0"))
    for k in ("threads", "lr_decay_iters"):  # None defaults accept any literal: check the type here
        v = globals()[k]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            die(f"{k}={v!r}: must be an integer >= 1 (or None for the default)")
    for k in ("dataset", "profile"):
        if globals()[k] is not None and not isinstance(globals()[k], str):
            die(f"{k}={globals()[k]!r}: expected a path")
    if not 0.0 <= eval_fraction < 1.0:
        die(f"eval_fraction={eval_fraction}: must be in [0, 1)")
    if lora_rank:
        from lora import parse_targets
        if lora_alpha <= 0:
            die(f"lora_alpha={lora_alpha}: must be > 0")
        try:
            parse_targets(lora_targets)
        except ValueError as e:
            die(str(e))
    if schedule not in POLICIES:
        die(f"schedule={schedule!r}: expected one of {', '.join(POLICIES)}")
    if model_preset not in PRESETS:
        die(f"model_preset={model_preset!r}: expected one of {', '.join(PRESETS)}")
    if synthetic_dist not in TABLE1:
        die(f"synthetic_dist={synthetic_dist!r}: expected one of {', '.join(TABLE1)}")
    if synthetic_max_len < MIN_LEN:
        die(f"synthetic_max_len={synthetic_max_len}: must be >= {MIN_LEN} (the shortest synthetic sample)")
    if dtype == "float16":
        die("dtype='float16' is not supported: there is no loss scaling here, and gradients of a loss divided by "
            "the global target count (~1e5 tokens) underflow in fp16. Use bfloat16 (or float32)")
    if dtype not in ("float32", "bfloat16"):
        die(f"dtype={dtype!r}: expected bfloat16 or float32")
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        die(f"device={device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available() and not dry_run:  # a dry run plans for a GPU
        die(f"device={device!r} but CUDA is not available here (torch {torch.__version__}); use --device=cpu")
    if device.startswith("cuda") and dtype != "bfloat16":
        die(f"dtype={dtype!r} on CUDA: attention runs flash kernels, which need bfloat16 (autocast); use dtype='bfloat16'")
    if activation_checkpoint not in ("none", "full", "selective"):
        die(f"activation_checkpoint={activation_checkpoint!r}: expected none, full or selective")
    if fsdp is not None and not isinstance(fsdp, bool):
        die(f"fsdp={fsdp!r}: expected True or False (or None for the default)")
    if fsdp and not ddp and not dry_run:
        die("fsdp=True needs a process group: launch with torchrun (--nproc_per_node=1 for one device)")
    if dry_run and ddp:
        die("dry_run plans for dry_run_world ranks in one process: run it with python, not torchrun")
    if dry_run_world < 0 or device_memory < 0:
        die(f"dry_run_world={dry_run_world}, device_memory={device_memory}: must be >= 0 (0 -> the default)")
    if world_size % cp:
        die(f"world size {world_size} is not divisible by cp={cp}")
    if profile is not None and not os.path.isfile(profile):
        die(f"profile={profile!r}: no such file (make one with `python bench.py profile`)")
    if dataset is not None and not os.path.isfile(os.path.join(dataset, "meta.json")):
        die(f"dataset={dataset!r}: not a prepared dataset directory (make one with data/prepare.py), "
            f"or leave dataset unset for the synthetic set")
    if init_from not in ("scratch", "resume"):
        if os.path.exists(os.path.join(init_from, "ckpt.safetensors")):
            die(f"init_from={init_from!r} is a training run's out_dir, not a Hugging Face checkpoint: "
                f"to continue it use --init_from=resume --out_dir={init_from}")
        if not os.path.isfile(os.path.join(init_from, "config.json")):
            die(f"init_from={init_from!r}: expected 'scratch', 'resume' or a local Hugging Face Qwen2 directory "
                f"(config.json + model.safetensors)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"out_dir={out_dir!r} is a file, not a directory")
    ckpt = os.path.join(out_dir, "ckpt.safetensors")
    ours = [f for f in ("ckpt.safetensors", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if dry_run:  # plans only: writes nothing, so out_dir may hold anything
        return None
    if init_from != "resume":
        if ours and not overwrite:
            die(f"out_dir={out_dir!r} already holds a run ({', '.join(ours)}): continue it with --init_from=resume, "
                f"or start over with --overwrite=True (replaces its checkpoint and metrics)")
        return None
    if not os.path.isfile(ckpt):
        die(f"init_from='resume' but {ckpt} does not exist")
    from safetensors import safe_open
    try:
        with safe_open(ckpt, "pt") as f:  # reads the header only
            meta = f.metadata() or {}
    except Exception as e:  # a damaged file: say which one
        die(f"{ckpt}: cannot read the checkpoint ({e})")
    if "resume_identity" not in meta:
        die(f"{ckpt} records no run identity (written by an older train.py), so resume cannot check it continues "
            f"the same run")
    if int(meta["iter"]) > max_iters:
        die(f"max_iters={max_iters} is below the checkpoint's iteration {meta['iter']}: raise max_iters to continue")
    saved = json.loads(meta["resume_identity"])
    ds_meta = {}
    if dataset is not None:
        with open(os.path.join(dataset, "meta.json")) as f:
            ds_meta = json.load(f)
    mine = resume_identity(world_size // cp, ds_meta)
    diff = [f"{k} {saved.get(k)!r} -> {mine.get(k)!r}" for k in RESUME_MUST_MATCH if saved.get(k) != mine.get(k)]
    if diff:
        die(f"resume would not continue the same run; these settings differ from the checkpoint's: {'; '.join(diff)}. "
            f"Keep them, or start a new run in another out_dir")
    return meta


ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
meta_ckpt = validate_config(int(os.environ.get("WORLD_SIZE", 1)) if ddp else (dry_run_world or cp) if dry_run else 1)

from memory import MemoryModel, state_bytes  # noqa: E402
from model import PRESETS, ModelConfig, Transformer  # noqa: E402  (after the configurator: --help lists only config keys)
from scheduler import CostModel, schedule as make_plan  # noqa: E402

device_type = "cuda" if device.startswith("cuda") else "cpu"
if fsdp is None:  # on with CUDA under torchrun (or when planning for it); off on CPU (see `fsdp` above)
    fsdp = device_type == "cuda" and (ddp or dry_run)

# distributed: world = dp x cp on a DeviceMesh ("dp", "cp"). The mesh is row-major, so CP groups are runs of
# consecutive ranks and a ring stays inside a node. The dry run starts no process group: it only plans.
if ddp:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
else:
    rank, world_size, local_rank = 0, (dry_run_world or cp) if dry_run else 1, 0
master = rank == 0
dp = world_size // cp
dp_rank, cp_rank = rank // cp, rank % cp
cp_group = None
if ddp:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp"))
    cp_group = mesh["cp"].get_group() if cp > 1 else None
if threads is not None and not device.startswith("cuda"):
    torch.set_num_threads(threads)
torch.manual_seed(seed)  # same init on every rank
# the compute dtype on CUDA: FSDP2's mixed precision when sharding (parallelize), else autocast
autocast = torch.autocast(device_type, dtype=getattr(torch, dtype)) if device_type == "cuda" and dtype != "float32" and not fsdp else nullcontext()


def log(*args):
    if master:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# data: a prepared directory, or the synthetic set, generated by the first rank of every node (so nodes
# need no shared filesystem; on a shared one they race harmlessly: the first to finish publishes it)

from data.prepare import DataError, global_batch, heldout_split, load_dataset  # noqa: E402

if dataset is None:
    from data.synthetic import default_dir, make_synthetic
    dataset = default_dir(synthetic_dist, synthetic_n, synthetic_max_len, seed)
    if local_rank == 0 and not os.path.exists(os.path.join(dataset, "meta.json")):
        log(f"generating synthetic dataset -> {dataset}")
        make_synthetic(dataset, dist=synthetic_dist, n=synthetic_n, max_len=synthetic_max_len, seed=seed, verbose=master)
    if ddp:
        dist.barrier()
try:
    ds = load_dataset(dataset)
except DataError as e:
    die(str(e))
n_global = dp * batch_size  # sequences per optimizer step
# the held-out split is a pure function of (len, eval_fraction, seed): every rank, a resumed run and
# sample.py --eval_synthetic find the same held-out sequences without communicating
train_ids, eval_ids = heldout_split(len(ds), eval_fraction, seed)
if len(train_ids) < n_global:
    die(f"dataset {dataset} has {len(train_ids)} training sequences, fewer than one global batch ({n_global})")
eval_sets = [eval_ids[b * n_global:(b + 1) * n_global] for b in range(min(eval_batches, len(eval_ids) // n_global))]
if eval_fraction > 0 and eval_interval > 0 and not eval_sets:
    die(f"eval_fraction={eval_fraction} holds out {len(eval_ids)} of {len(ds)} sequences, fewer than one "
        f"global batch ({n_global}): raise eval_fraction")


def example(i):
    """Sequence i as (input ids, shifted targets with -100 off the loss mask, positions)."""
    tokens, mask = ds.get(int(i))
    x = torch.from_numpy(tokens.astype(np.int64))
    y = torch.full_like(x, -100)
    keep = torch.from_numpy(mask[1:].astype(bool))
    y[:-1] = torch.where(keep, x[1:], torch.full_like(x[1:], -100))
    return x, y, torch.arange(len(x))


def load_microbatch(mb, idx):
    """This rank's tokens for micro-batch `mb` (indices into the global batch `idx`): zigzag shards of the
    distributed sequences (padded to a multiple of 2*cp) followed by its whole local sequences, and the
    attention function every layer calls. Its AttnPlan is built here, once per micro-batch, from CPU
    lists: the layers then run without reading offsets back from the device (no host-device syncs)."""
    from context_parallel import AttnPlan, attention, pad_to_multiple, zigzag_shard
    parts, cu_dist = [], None
    if mb.distributed:
        xs, ys, ps = zip(*(example(idx[j]) for j in mb.distributed))
        lengths = [len(x) for x in xs]
        x, y, p, lengths = pad_to_multiple(torch.cat(xs), torch.cat(ys), torch.cat(ps), lengths, 2 * cp)
        cu_dist = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        parts.append([zigzag_shard(t, cu_dist, cp_rank, cp) for t in (x, y, p)])
    local = mb.local[cp_rank]
    if local:
        xs, ys, ps = zip(*(example(idx[j]) for j in local))
        parts.append([torch.cat(xs), torch.cat(ys), torch.cat(ps)])
    if not parts:
        return None
    cu_local = np.concatenate([[0], np.cumsum([int(ds.lengths[idx[j]]) for j in local], dtype=np.int64)]).tolist()
    x, y, p = (torch.cat(t).to(device) for t in zip(*parts))
    # the model calls this instead of its own attention: it never knows about CP
    plan = AttnPlan(cu_dist, cu_local, device, group=cp_group, world=cp, rank=cp_rank)
    return x[None], y[None], p[None], partial(attention, plan=plan)


# -----------------------------------------------------------------------------
# model config, memory model, cost model (all a dry run needs: nothing is allocated yet)

ckpt_path = os.path.join(out_dir, "ckpt.safetensors")
metrics_path = os.path.join(out_dir, "metrics.jsonl")
start_iter = 0
if init_from == "resume":
    model_config = ModelConfig(**json.loads(meta_ckpt["model_config"]))
elif init_from == "scratch":  # the preset's vocabulary, grown to the dataset tokenizer's rounded up to 64
    model_config = ModelConfig(**{**PRESETS[model_preset].__dict__,
                                  "vocab_size": max(PRESETS[model_preset].vocab_size, -(-ds.meta["vocab_size"] // 64) * 64)})
else:
    try:
        with open(os.path.join(init_from, "config.json")) as f:
            model_config = ModelConfig.from_hf(json.load(f))
    except (OSError, ValueError, KeyError) as e:
        die(f"init_from={init_from!r}: {e}")
if ds.meta["vocab_size"] > model_config.vocab_size:
    die(f"dataset vocab {ds.meta['vocab_size']} exceeds the model's {model_config.vocab_size}: "
        f"prepare the data with the model's tokenizer")

prof = {}
if profile is not None:
    with open(profile) as f:
        prof = json.load(f)
mem = MemoryModel(model_config, world=world_size, fsdp=fsdp, recompute=activation_checkpoint,
                  dtype=getattr(torch, dtype) if device_type == "cuda" else torch.float32,
                  device_memory=device_memory or prof.get("device_memory") or 80e9)
cost = CostModel.from_profile(model_config, profile, memory=mem) if profile is not None else CostModel(model_config, memory=mem)
if not bucket_size:  # 0: the profile's measured bucket, else the memory model's
    bucket_size = prof["bucket_size"] if profile is not None else mem.bucket_size
if not bucket_size or bucket_size < 0:
    die(f"bucket_size={bucket_size}: give a positive bucket_size (0 takes it from the profile or the memory model, "
        f"which leaves no room for activations here)")
bucket_size = int(bucket_size)
try:  # fail now, not at the step that first draws the longest sample (the scheduler's own check)
    make_plan([int(ds.lengths.max())], dp=1, cp=cp, bucket_size=bucket_size, policy="naive")
except ValueError as e:
    die(f"dataset {dataset}, its longest sample ({int(ds.lengths.max())} tokens): {e}. "
        f"Raise cp or bucket_size, or re-prepare with --max_len")

if dry_run:
    from memory import dry_run as print_dry_run
    # the first 5 global batches (or fewer): each rank's fullest micro-batch over them is what must fit
    batches = [train_ids[global_batch(len(train_ids), n_global, it, seed)] for it in range(min(5, max_iters))]  # as training draws them
    lengths_list = [[int(ds.lengths[i]) for i in idx] for idx in batches]
    plans = [make_plan(l, dp=dp, cp=cp, bucket_size=bucket_size, policy=schedule, cost=cost, seed=seed + it)
             for it, l in enumerate(lengths_list)]
    print(f"dry run: {model_preset if init_from == 'scratch' else init_from} ({mem.static['n_params'] / 1e9:.2f}B params) | "
          f"world {world_size} = dp {dp} x cp {cp} | fsdp {fsdp} | activation_checkpoint {activation_checkpoint} | "
          f"bucket {bucket_size} | {len(plans)} global batches of {dataset}")
    sys.exit(print_dry_run(plans, lengths_list, cp, mem, cost))

# -----------------------------------------------------------------------------
# model, optimizer

os.makedirs(out_dir, exist_ok=True)
if init_from in ("scratch", "resume"):
    model = Transformer(model_config)
else:
    try:
        model = Transformer.from_pretrained(init_from)
    except (OSError, ValueError, KeyError) as e:
        die(f"init_from={init_from!r}: {e}")
if lora_rank:  # adapters next to the chosen projections; every other parameter frozen (no grad)
    from lora import apply_lora
    apply_lora(model, lora_rank, lora_alpha, lora_targets)


def parallelize(model):
    """Activation checkpointing and FSDP2, applied from outside the model (as torchtitan does).

    FSDP2 shards every parameter, its gradient and its AdamW state over all dp x cp ranks (dim 0, one
    group per block plus one for the embeddings, final norm and lm_head). On CUDA it gathers bf16
    parameters and reduce-scatters fp32 gradients.

    The collective invariant: every rank must issue the same collectives in the same order, yet Skrull
    gives DP ranks different numbers of micro-batches and may leave a CP rank with nothing in a
    micro-batch. FSDP's default (gather before each forward and backward, reduce-scatter after each
    backward) would then hang. We use ZeRO-2-like behaviour instead: every rank gathers all parameters
    once at the start of the step (unshard_all), keeps them through its micro-batches, accumulates
    unsharded gradients without communicating, and reduce-scatters once, in the backward of its last
    micro-batch, which every rank runs (an empty one if it holds no tokens there). So each step is
    the same on every rank: one all-gather per group, then one reduce-scatter per group, as in
    the plain all-reduce path. Cost: the gathered parameters and their fp32 gradients stay for the
    whole step (memory.static_bytes "working"); the alternative, equal micro-batch counts with FSDP's
    per-layer gathers, would shard that too, but make every micro-batch a barrier across DP ranks.
    Evaluation keeps the same invariant: evaluate() gathers once, runs forwards only, and reshards.

    With LoRA (applied before this), a group mixes frozen weights and trainable adapters: FSDP2 shards
    both, gathers both, and reduce-scatters only the adapters' gradients, so the frozen weights get no
    gradient and no optimizer state here either (tests/test_train.py compares losses with fsdp=False)."""
    for block in model.layers:
        block.recompute = activation_checkpoint
    model.to(device)
    if not fsdp:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32) \
        if device_type == "cuda" and dtype != "float32" else MixedPrecisionPolicy()
    for block in model.layers:  # default mesh: all ranks, so the shards spread over dp x cp
        fully_shard(block, mp_policy=mp, reshard_after_forward=False)
    return fully_shard(model, mp_policy=mp, reshard_after_forward=False)


def unshard_all():
    for m in [*raw_model.layers, raw_model]:
        m.unshard()


def reshard_all():
    for m in [*raw_model.layers, raw_model]:
        m.reshard()


model = parallelize(model)
raw_model = model  # keep the uncompiled module for saving (no _orig_mod. prefixes)
if compile:
    model = torch.compile(model)

named_params = dict(raw_model.named_parameters())  # under FSDP2: the sharded DTensors, between steps
# only these get gradients, weight decay and AdamW state (with LoRA: the adapters; frozen weights none)
trainable = {n: p for n, p in named_params.items() if p.requires_grad}
decay = [p for p in trainable.values() if p.dim() >= 2]
no_decay = [p for p in trainable.values() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")


def full_params():
    """{name: full CPU tensor} of every parameter (frozen ones and LoRA adapters alike). Every rank must
    call it: under FSDP2 gathering the shards is a collective, and only rank 0 receives the tensors."""
    if not fsdp:
        return {n: p.detach().cpu() for n, p in named_params.items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(it):
    """Model + AdamW state in one safetensors file: written to a temp file, fsynced, renamed into place
    (and the directory fsynced), so a crash leaves the previous checkpoint or the new one, never half of
    one. A checkpoint with non-finite weights or state is never written: the previous one stays.
    Every rank calls it. Under FSDP2 the shards are first gathered into full tensors (on CPU, arriving at
    rank 0 only), so the file is the same with or without FSDP and resumes at any world size; the price
    is that rank 0 holds the full state in host memory while it writes (16 bytes per parameter, 122 GB
    for 7B; torch.distributed.checkpoint's sharded files would avoid that)."""
    from safetensors.torch import save_file
    params = full_params()
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(raw_model, optimizer, options=full).get("state", {})  # {} off rank 0
    else:
        state = {n: optimizer.state[p] for n, p in named_params.items() if p in optimizer.state}
    if not master:
        return
    tensors = {f"model.{n}": params[n].contiguous() for n in named_params}
    for n, st in state.items():
        for k, v in st.items():
            tensors[f"optim.{n}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        die(f"iter {it}: not writing a checkpoint with non-finite values in {', '.join(bad[:3])}; "
            f"{ckpt_path} keeps the last good one")
    meta = {"iter": str(it), "model_config": json.dumps(model_config.__dict__), "config": json.dumps(config),
            "resume_identity": json.dumps(resume_identity(dp, ds.meta)),
            "dataset": os.path.abspath(dataset)}  # resolved (config has None for synthetic data): sample.py reads it
    tmp = ckpt_path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_path)
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint():
    """Weights into the model, AdamW state through optimizer.load_state_dict, which puts every value
    where this optimizer needs it (fused AdamW on CUDA keeps `step` on the GPU; the plain one on the CPU).
    safe_open reads only the tensors asked for, not the whole file. Under FSDP2 every rank reads the full
    tensors and keeps its own shards of them."""
    from safetensors import safe_open
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict
        full = StateDictOptions(full_state_dict=True)
        with safe_open(ckpt_path, "pt", device="cpu") as f:
            keys = set(f.keys())
            set_model_state_dict(raw_model, {n: f.get_tensor(f"model.{n}") for n in named_params}, options=full)
            state = {n: {k: f.get_tensor(f"optim.{n}.{k}") for k in ("step", "exp_avg", "exp_avg_sq")}
                     for n in named_params if f"optim.{n}.step" in keys}
        if state:
            groups = get_optimizer_state_dict(raw_model, optimizer, options=full)["param_groups"]  # names, not ids
            set_optimizer_state_dict(raw_model, optimizer, {"state": state, "param_groups": groups}, options=full)
        return int(meta_ckpt["iter"])
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict numbers them so
    names = {id(p): n for n, p in named_params.items()}
    state = {}
    with safe_open(ckpt_path, "pt", device="cpu") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for n, p in named_params.items():
                p.copy_(f.get_tensor(f"model.{n}"))
        for i, p in enumerate(params):
            n = names[id(p)]
            if f"optim.{n}.step" in keys:
                state[i] = {k: f.get_tensor(f"optim.{n}.{k}") for k in ("step", "exp_avg", "exp_avg_sq")}
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return int(meta_ckpt["iter"])


if init_from == "resume":
    start_iter = load_checkpoint()
    log(f"resumed from {ckpt_path} at iter {start_iter}")

# metrics.jsonl numbers steps like the console and the checkpoint: "iter" k is the k-th optimizer step
# (1-based), and a checkpoint at iter k holds the state after step k.
if master:  # keep the history up to start_iter, drop anything a crashed run wrote after the checkpoint
    kept = []
    if start_iter > 0 and os.path.exists(metrics_path):
        for line in open(metrics_path):
            try:
                if json.loads(line)["iter"] <= start_iter:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line torn by a killed run
    elif init_from != "resume":  # overwrite=True (validate_config refused anything else): start over
        for f in ("ckpt.safetensors", "grads.safetensors"):
            if os.path.exists(os.path.join(out_dir, f)):
                os.remove(os.path.join(out_dir, f))
    with open(metrics_path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(metrics_path + ".tmp", metrics_path)

# -----------------------------------------------------------------------------


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def all_reduce_grads(measure=False):
    """Gradients are reduced over DP x CP: every rank's loss is already divided by the global target
    count, so a plain SUM over all ranks gives the full-batch gradient. One flat buffer, one call.
    (Under FSDP2 the same sum is the reduce-scatter inside the last backward.) measure: return the
    bytes of state held while the flat buffer exists."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable.values()]
    held = 0
    if world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        held = held_bytes(flat, optim=False) if measure else 0
        dist.all_reduce(flat)
        grads = list(torch.split(flat, [g.numel() for g in grads]))
    for p, g in zip(trainable.values(), grads):
        p.grad = g.view_as(p)
    return held


def held_bytes(*extra, optim=True):
    """Bytes of parameters, gradients and AdamW state this rank holds right now, counted from its tensors:
    the sharded parameters (named_params), whatever the modules hold now (the gathered parameters inside
    an FSDP2 step), all their gradients, `extra`, and (optim=True) the optimizer state."""
    params = [*named_params.values(), *raw_model.parameters()]
    states = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)] if optim else []
    return state_bytes([*params, *(p.grad for p in params), *extra, *states])


def empty_microbatch():
    """No tokens: under FSDP2 a rank with nothing to compute in its last micro-batch still runs this
    forward and backward, because the step's reduce-scatters happen inside that backward."""
    from context_parallel import AttnPlan, attention
    none = torch.zeros((1, 0), dtype=torch.long, device=device)
    return none, none, none, partial(attention, plan=AttnPlan(None, [0], device))


def check_ranks_agree(it, idx, lengths, plan):
    """Every rank computes the global batch and the plan on its own (no communication), so they must come
    out the same everywhere: if one node read a different dataset, profile JSON or numpy version, CP peers
    would exchange mismatched buffers (a hang, or silently wrong gradients). One all-gather of two 64-bit
    digests per step, called by every rank, catches it; on a mismatch every rank stops here."""
    if world_size == 1:
        return
    def digest(obj):
        return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little", signed=True)
    mine = torch.tensor([digest((idx.tolist(), lengths)), digest([[(mb.distributed, mb.local) for mb in mbs] for mbs in plan])],
                        dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()
    for col, what in ((0, "global batch (sample indices and lengths): is every rank reading the same dataset?"),
                      (1, "plan: do all ranks use the same --profile file, code and numpy version?")):
        odd = [r for r in range(world_size) if every[r, col] != every[0, col]]
        if odd:
            die(f"iter {it + 1}: ranks {odd} disagree with rank 0 on the {what} Stopping every rank before "
                f"mismatched data is exchanged")


def run_batch(it, idx, plan_seed, train, measure=False):
    """Schedule one global batch (dataset indices `idx`, the same on every rank) and run this rank's
    micro-batches; with train=True each micro-batch also backpropagates. Returns (this rank's summed loss,
    the global target count, plan, lengths, peak tokens per rank, the most state bytes held within the
    step when measure=True). Training and evaluation both come here, so the eval loss goes through the
    same scheduler, policy, sharding and attention as training. Under FSDP2 the caller has gathered the
    parameters (unshard_all): nothing in here may issue a collective that only some ranks reach."""
    lengths = [int(ds.lengths[i]) for i in idx]
    plan = make_plan(lengths, dp=dp, cp=cp, bucket_size=bucket_size, policy=schedule, cost=cost, seed=plan_seed)
    check_ranks_agree(it, idx, lengths, plan)
    # the loss is normalised by the global count of target tokens (every rank knows the global batch). A
    # batch with no target at all (every label -100) has loss 0 and zero gradients: divide by 1, not 0.
    n_targets = sum(int(ds.get(int(i))[1][1:].sum()) for i in idx)
    denom = max(n_targets, 1)
    peak = max(max(mb.rank_tokens(lengths)) for mbs in plan for mb in mbs)  # padded share + local tokens
    if peak > bucket_size:
        raise RuntimeError(f"plan puts {peak} tokens on one rank, over bucket_size={bucket_size}")
    held = 0  # the most state bytes seen held within this step (measure=True: the first step only)
    loss_sum = torch.zeros((), device=device)
    mbs = plan[dp_rank]
    for i, mb in enumerate(mbs):  # micro-batch counts may differ between DP ranks: no collective inside
        last = train and i == len(mbs) - 1
        if fsdp and train:  # accumulate unsharded gradients; reduce-scatter them and reshard only after the last
            raw_model.set_requires_gradient_sync(last)
            raw_model.set_reshard_after_backward(last)
        batch = load_microbatch(mb, idx)
        if batch is None:  # this CP rank holds nothing in this micro-batch (no distributed sequences)
            if not (fsdp and last):
                continue
            batch = empty_microbatch()
        x, y, p, attn_fn = batch
        with autocast:
            _, loss = model(x, y, position_ids=p, attn_fn=attn_fn, reduction="sum")
        if train:
            held = max(held, held_bytes(optim=False)) if measure else 0
            # FSDP2's reduce-scatter averages over ranks (gloo has no pre-scaled sum), so its ranks scale up
            # by the world size to keep the plain SUM the all-reduce path computes
            (loss * (world_size if fsdp else 1) / denom).backward()
            held = max(held, held_bytes(optim=False)) if measure and not last else held
        loss_sum += loss.detach().float()
    return loss_sum, n_targets, plan, lengths, peak, held


@torch.no_grad()
def evaluate(it):
    """Loss per target token over the held-out batches. Every rank runs every batch: the ring's P2P inside
    a CP group and the all-reduce below are collectives, so nanoGPT's rank-0-only eval would deadlock.
    Under FSDP2 every rank gathers all parameters once here and reshards them at the end, the same calls
    on every rank whatever its micro-batch counts; the forwards in between communicate only within CP."""
    if fsdp:
        unshard_all()
    total, count = torch.zeros((), device=device), 0
    for b, idx in enumerate(eval_sets):
        loss_sum, n_targets, *_ = run_batch(it, idx, seed + b, train=False)
        total += loss_sum
        count += n_targets
    if fsdp:
        reshard_all()
    if world_size > 1:
        dist.all_reduce(total)
    return total.item() / max(count, 1)


log(f"world {world_size} = dp {dp} x cp {cp} | schedule {schedule} | bucket {bucket_size} tokens/rank | "
    f"{mem.static['n_params'] / 1e6:.2f}M params"
    + (f" ({sum(p.numel() for p in trainable.values()) / 1e6:.3f}M trainable, LoRA r={lora_rank})" if lora_rank else "")
    + f" | dataset {dataset} ({len(train_ids)} train" + (f", {len(eval_ids)} held out" if eval_fraction else "") + " seqs)"
    + f" | fsdp {fsdp} | activation_checkpoint {activation_checkpoint}")
log(f"memory model per rank: state {mem.static['persistent'] / 2**20:,.1f} MiB between steps, "
    f"{mem.static['peak'] / 2**20:,.1f} MiB peak; activations {mem.alpha / 2**10:,.1f} KiB/token + "
    f"{mem.beta / 2**20:,.1f} MiB (state_bytes_per_rank and peak_state_bytes_per_rank follow the first step)")
state = {}  # state_bytes_per_rank, peak_state_bytes_per_rank: measured on the first step
t_start = time.time()
dts = []
last_saved = start_iter  # the iteration of the checkpoint in out_dir (0: none)
for it in range(start_iter, max_iters):  # `it` counts steps done; this is step it + 1 in the logs and metrics
    t0 = time.time()
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # max_memory_allocated in the metrics: this step's peak
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    idx = train_ids[global_batch(len(train_ids), n_global, it, seed)]  # the same on every rank
    measure = it == start_iter
    if fsdp:  # the step's all-gathers, the same on every rank (parallelize explains the invariant)
        unshard_all()
    loss_sum, n_targets, plan, lengths, peak, held = run_batch(it, idx, seed + it, train=True, measure=measure)
    denom = max(n_targets, 1)
    if not fsdp:
        held = max(held, all_reduce_grads(measure))
    if world_size > 1:
        dist.all_reduce(loss_sum)
    if dump_grads and it == start_iter:  # every rank: gathering FSDP2's gradient shards is a collective
        from safetensors.torch import save_file
        full = {n: (p.grad.full_tensor() if fsdp else p.grad).detach().cpu().contiguous() for n, p in trainable.items()}
        if master:
            save_file(full, os.path.join(out_dir, "grads.safetensors"))
    # clip_grad_norm_ returns the norm before clipping; with max_norm=inf it only measures it
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip if grad_clip > 0 else float("inf"))
    if fsdp:  # the norm over FSDP2's shards is a replicated DTensor: the same plain tensor on every rank
        grad_norm = grad_norm.full_tensor()
    loss_total, grad_norm = torch.stack([loss_sum, grad_norm.float()]).tolist()  # one device sync
    loss_val = loss_total / denom
    if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
        # every rank holds the same all-reduced loss and gradients, so every rank stops here, before the
        # optimizer step: the weights, the last checkpoint and metrics.jsonl stay as they were
        die(f"iter {it + 1}: loss {loss_val} / gradient norm {grad_norm} is not finite; stopped before the optimizer "
            f"step. Lower learning_rate or check the data. Last checkpoint: "
            f"{f'iter {last_saved} in {ckpt_path}' if last_saved else 'none'}")
    optimizer.step()
    if measure:  # what persists to the next step (gradients included), and the most held within this one
        # (AdamW's state is created by this first step: add it to what was held inside the step)
        after = held_bytes()
        optim_bytes = after - held_bytes(optim=False)
        b = torch.tensor([after, max(held + optim_bytes, after)], dtype=torch.int64, device=device)
        if world_size > 1:
            dist.all_reduce(b, op=dist.ReduceOp.MAX)
        state = {"state_bytes_per_rank": int(b[0]), "peak_state_bytes_per_rank": int(b[1])}
        log(f"state per rank (measured, max over ranks): {state['state_bytes_per_rank'] / 2**20:,.1f} MiB between steps, "
            f"{state['peak_state_bytes_per_rank'] / 2**20:,.1f} MiB peak within a step")
    optimizer.zero_grad(set_to_none=True)

    dt = time.time() - t0  # the step alone: evaluation is not counted in dt or tok/s
    dts.append(dt)
    last = it + 1 == max_iters
    eval_loss = evaluate(it) if eval_sets and eval_interval and ((it + 1) % eval_interval == 0 or last) else None
    if master:
        tokens = sum(lengths)
        rec = {"iter": it + 1, "loss": round(loss_val, 6), "tokens": tokens, "targets": n_targets,
               "grad_norm": round(grad_norm, 6), "dt_ms": round(dt * 1e3, 2), "tok_per_s": round(tokens / dt, 1),
               "n_microbatches": max(len(m) for m in plan), "peak_tokens_per_rank": peak,
               "rollbacks": sum(mb.rollbacks for mbs in plan for mb in mbs), "lr": lr}
        if eval_loss is not None:
            rec["eval_loss"] = round(eval_loss, 6)
        if measure:
            rec.update(state)
        if device_type == "cuda":  # this step's peak on rank 0, next to the memory model's prediction for it
            rec["max_memory_allocated"] = torch.cuda.max_memory_allocated()
            rec["predicted_memory"] = int(mem.peak(max(mb.rank_tokens(lengths)[cp_rank] for mb in plan[dp_rank])))
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")  # strict JSON: NaN never reaches the file
        if (it + 1) % log_interval == 0 or it == start_iter or it == max_iters - 1:
            recent = dts[-10:]
            eta = (max_iters - it - 1) * sum(recent) / len(recent)
            mem_s = f" | mem {rec['max_memory_allocated'] / 2**30:.1f}GiB" if device_type == "cuda" else ""
            ev = f" | eval {eval_loss:.4f}" if eval_loss is not None else ""
            log(f"iter {it + 1}/{max_iters} ({100 * (it + 1) / max_iters:.0f}%) | loss {loss_val:.4f}{ev} | lr {lr:.2e} | "
                f"dt {dt * 1e3:.0f}ms | tok/s {tokens / dt:,.0f} | mb {rec['n_microbatches']} | "
                f"peak {peak}/{bucket_size} tok{mem_s} | eta {eta / 60:.1f}min")
    if checkpoint_interval and ((it + 1) % checkpoint_interval == 0 or last):
        save_checkpoint(it + 1)  # every rank: under FSDP2 the gather is a collective
        last_saved = it + 1

if checkpoint_interval and max_iters == 0:  # no step: the initial weights (a "before training" model); every rank
    save_checkpoint(0)
if export:  # after the checkpoint: exporting a LoRA model merges the adapters in place
    from export import export_hf
    trained = raw_model
    if fsdp:  # every rank gathers the shards (a collective); rank 0 exports a plain CPU copy of the full model
        params = full_params()
        if master:
            trained = Transformer(model_config)
            if lora_rank:
                from lora import apply_lora
                apply_lora(trained, lora_rank, lora_alpha, lora_targets)
            with torch.no_grad():
                for n, p in trained.named_parameters():
                    p.copy_(params[n])
    if master:
        for path in export_hf(trained, out_dir, tokenizer=ds.meta["tokenizer"], base_model=init_from):
            log(f"exported {path}")
log(f"done: {max_iters - start_iter} iters in {time.time() - t_start:.1f}s")
if ddp:
    dist.destroy_process_group()
    # Skip the interpreter's finalisation: with gloo we saw about one 2-process run in 15 die with SIGABRT
    # there, after every step, metric and checkpoint was written (gloo worker threads still holding
    # tensors while Python tears down, as discussed in pytorch PR 179291). Everything is flushed first.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
