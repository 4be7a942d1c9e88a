"""
Long-context SFT with Skrull's dynamic data scheduling (arXiv 2505.19609).

    python train.py config/long_sft_cpu.py                    # a laptop CPU
    torchrun --nproc_per_node=8 train.py config/long_sft.py   # one GPU node: 8 ranks = dp x cp
Multi-node: the same command with torchrun's rendezvous flags (--nnodes, --rdzv_endpoint, ...).

One optimizer step = one global batch of `batch_size` sequences per DP rank. Every rank draws the same
global batch, computes the same plan with scheduler.schedule, and loads only its own tokens. The loss is
a sum over this rank's target tokens divided by the global batch's target count, so the schedule decides
which rank computes what, never what is computed. preflight.py checks the config first (and runs the dry
run); parallelize.py applies FSDP2 and the per-step collectives; checkpoint.py saves and resumes.
"""

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
from torch.distributed.device_mesh import init_device_mesh

# -----------------------------------------------------------------------------
# default config values; override with config/*.py then --key=value (configurator.py)
# I/O
out_dir = "out"
init_from = "scratch"  # 'scratch' | 'resume' (continue the run in out_dir) | a local Hugging Face Qwen2/Qwen2.5, Qwen3 or Llama 3 directory
overwrite = False  # True: a fresh run may replace the checkpoint and metrics of an earlier run in out_dir
model_preset = "tiny"  # model.PRESETS key, or a Hugging Face config.json (or its directory): the shape when init_from='scratch'
# context extension: override the checkpoint's RoPE (None keeps it; the export's config.json carries the result)
rope_theta = None  # RoPE base
rope_scaling_type = None  # default (plain RoPE) | linear | yarn | llama3
rope_scaling_factor = None  # how many times the original context the scaling stretches to
rope_original_max_position = None  # the context length the checkpoint was trained at (yarn, llama3)
checkpoint_interval = 50  # iters between checkpoints (and always at the end); 0 = never
async_save = False  # write checkpoints in the background (torch.distributed.checkpoint.async_save) while training goes on
log_interval = 1  # iters between console lines (metrics.jsonl gets every step)
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
export = True  # at the end, write out_dir/hf/ (Hugging Face, the model's family; LoRA merged) and out_dir/adapter/ (PEFT)
# Skrull
cp = 1  # context-parallel degree; dp = world_size // cp
schedule = "skrull"  # one of scheduler.POLICIES: naive | sorted | dacp | skrull (the paper) | skrull_plus (ours)
bucket_size = 4096  # BucketSize C: max tokens one rank holds for a micro-batch; 0 -> from `profile`
profile = None  # path to a profile JSON from `python calibrate.py` (cost constants, bucket_size)
calibrate = True  # fit the cost model's constants (compute, the ring's exposed hop time) to this run's micro-batch times (costfit.py), the profile's or defaults as prior
calibrate_interval = 1  # steps between fits (each: one all_gather of the times, one broadcast of the constants)
calibrate_freeze = 100  # the constants stop changing after this many steps; 0 = never
batch_size = 8  # sequences per DP rank per optimizer step
plan_ahead = True  # plan the next step and the held-out batches in a planner process while this step runs (planner.py)
# optimizer
max_iters = 200  # 0 writes the initial weights as the checkpoint (to measure a model before training)
learning_rate = 1e-3  # peak learning rate, after warmup
min_lr = 1e-4  # the cosine decay ends here
warmup_iters = 20  # linear warmup steps
lr_decay_iters = None  # None -> max_iters
weight_decay = 0.1  # AdamW, on matrices only (not norms or biases)
beta1 = 0.9  # AdamW's decay of its gradient average
beta2 = 0.95  # AdamW's decay of its squared-gradient average
grad_clip = 1.0  # 0 = off
# scale: sharding, recompute, memory
# FSDP2 over all dp x cp ranks (parameters, gradients, AdamW state). None -> on with CUDA under torchrun;
# off on CPU, where it ran slower than the all-reduce path and saves little (docs/results.md)
fsdp = None
activation_checkpoint = "none"  # none | full | selective (model.Block explains what each recomputes)
device_memory = 0  # bytes of one device for the memory model and the dry run; 0 -> the profile's, else 80e9
dry_run = False  # plan a few global batches, print each rank's predicted memory and time, exit 0 iff all fit
dry_run_world = 0  # ranks the dry run plans for (no process group is started); 0 -> cp
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # compute dtype on CUDA (autocast, or FSDP2's): bfloat16 | float32
compile = False  # torch.compile the model (checkpoints keep the uncompiled names)
threads = None  # torch.set_num_threads per process on CPU; None -> torch's default
seed = 1337  # data order, held-out split, init and plans: the same on every rank
peak_flops = 0.0  # one device's peak FLOP/s, for MFU; 0 -> mfu.PEAK_BF16 by GPU name (none on CPU: no mfu)
# -----------------------------------------------------------------------------
_train_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in _train_keys}  # for logging and checkpoints
# -----------------------------------------------------------------------------
# after the configurator: --help lists only the config keys above, not these names
import checkpoint  # noqa: E402
import costfit  # noqa: E402
import preflight  # noqa: E402
import scheduler  # noqa: E402
import skrull_plus  # noqa: E402,F401  registers "skrull_plus" in scheduler.POLICIES (ours, beside the paper's)
from memory import MemoryModel, StateMeter, host_peaks  # noqa: E402
from mfu import device_peak_flops, step_mfu  # noqa: E402
from model import Transformer  # noqa: E402
from parallelize import (all_reduce_grads, check_ranks_agree, empty_microbatch, init_distributed, parallelize,  # noqa: E402
                         reshard_all, unshard_all)
from planner import Planner  # noqa: E402
from preflight import fail  # noqa: E402
from run_guard import RunGuard, resume_hint  # noqa: E402

ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
world_size = int(os.environ.get("WORLD_SIZE", 1)) if ddp else (dry_run_world or cp) if dry_run else 1
meta_ckpt = preflight.validate_config(config, world_size, ddp)  # before anything is read or written

device_type = "cuda" if device.startswith("cuda") else "cpu"
if fsdp is None:  # on with CUDA under torchrun (or when planning for it); off on CPU (see `fsdp` above)
    fsdp = device_type == "cuda" and (ddp or dry_run)
# the planner process (planner.py) is forked here, before any socket, CUDA context or data file exists
planner = Planner(ahead=plan_ahead and not dry_run)

# distributed: world = dp x cp on a DeviceMesh ("dp", "cp"). The mesh is row-major, so CP groups are runs of
# consecutive ranks and a ring stays inside a node. The dry run starts no process group: it only plans.
rank, local_rank = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])) if ddp else (0, 0)
master = rank == 0
dp = world_size // cp
dp_rank, cp_rank = rank // cp, rank % cp
cp_group = None
if ddp:
    device = init_distributed(device_type, local_rank)  # CUDA: NCCL on GPU local_rank; CPU: gloo
    mesh = init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp"))
    cp_group = mesh["cp"].get_group() if cp > 1 else None
if threads is not None and not device.startswith("cuda"):
    torch.set_num_threads(threads)
torch.manual_seed(seed)  # same init on every rank
# the compute dtype on CUDA: FSDP2's mixed precision when sharding (parallelize), else autocast
compute_dtype = getattr(torch, dtype) if device_type == "cuda" and dtype != "float32" else None
autocast = torch.autocast(device_type, dtype=compute_dtype) if compute_dtype and not fsdp else nullcontext()


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
    fail(str(e))
n_global = dp * batch_size  # sequences per optimizer step
# the held-out split is a pure function of (len, eval_fraction, seed): every rank, a resumed run and
# sample.py --eval_synthetic find the same held-out sequences without communicating
train_ids, eval_ids = heldout_split(len(ds), eval_fraction, seed)
if len(train_ids) < n_global:
    fail(f"dataset {dataset} has {len(train_ids)} training sequences, fewer than one global batch ({n_global})")
eval_sets = [eval_ids[b * n_global:(b + 1) * n_global] for b in range(min(eval_batches, len(eval_ids) // n_global))]
if eval_fraction > 0 and eval_interval > 0 and not eval_sets:
    fail(f"eval_fraction={eval_fraction} holds out {len(eval_ids)} of {len(ds)} sequences, fewer than one "
         f"global batch ({n_global}): raise eval_fraction")


def sequence_tensors(i):
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
    from context_parallel import AttnPlan, attention, pad_to_multiple, to_device, zigzag_shard
    parts, cu_dist = [], None
    if mb.distributed:
        xs, ys, ps = zip(*(sequence_tensors(idx[j]) for j in mb.distributed))
        lengths = [len(x) for x in xs]
        x, y, p, lengths = pad_to_multiple(torch.cat(xs), torch.cat(ys), torch.cat(ps), lengths, 2 * cp)
        cu_dist = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        parts.append([zigzag_shard(t, cu_dist, cp_rank, cp) for t in (x, y, p)])
    local = mb.local[cp_rank]
    if local:
        xs, ys, ps = zip(*(sequence_tensors(idx[j]) for j in local))
        parts.append([torch.cat(xs), torch.cat(ys), torch.cat(ps)])
    if not parts:
        return None
    cu_local = np.concatenate([[0], np.cumsum([int(ds.lengths[idx[j]]) for j in local], dtype=np.int64)]).tolist()
    x, y, p = (to_device(torch.cat(t), device) for t in zip(*parts))  # CUDA: pinned, non-blocking
    # the model calls this instead of its own attention: it never knows about CP
    plan = AttnPlan(cu_dist, cu_local, device, group=cp_group, world=cp, rank=cp_rank)
    return x[None], y[None], p[None], partial(attention, plan=plan)


# -----------------------------------------------------------------------------
# model config, memory model, cost model (all a dry run needs: nothing is allocated yet)

metrics_path = os.path.join(out_dir, "metrics.jsonl")
model_config = preflight.model_config(config, meta_ckpt, ds.meta["vocab_size"])  # a preset, config.json or checkpoint's, RoPE overridden

profile_data = {}  # the profile JSON: measured cost constants, bucket_size, device_memory
if profile is not None:
    with open(profile) as f:
        profile_data = json.load(f)
mem = MemoryModel(model_config, world=world_size, fsdp=fsdp, recompute=activation_checkpoint,
                  dtype=compute_dtype or torch.float32, device_memory=device_memory or profile_data.get("device_memory") or 80e9)
cost = scheduler.CostModel.from_profile(model_config, profile, memory=mem) if profile else scheduler.CostModel(model_config, memory=mem)
if profile is not None:  # a warning when calibrate.py measured another regime (fsdp, recompute, dtype, world)
    preflight.check_profile_regime(profile_data, fsdp=fsdp, activation_checkpoint=activation_checkpoint,
                                   dtype=dtype if device_type == "cuda" else "float32", world=world_size, out=log)
if not bucket_size:  # 0: the profile's measured bucket, else the memory model's
    bucket_size = profile_data["bucket_size"] if profile is not None else mem.bucket_size
bucket_size = preflight.check_bucket(bucket_size, cp, int(ds.lengths.max()), dataset)
calib = costfit.Calibrator(cost, enabled=calibrate, interval=calibrate_interval, freeze=calibrate_freeze, world=world_size,
                           cp=cp, rank=rank, device=device, cuda=device_type == "cuda")  # cost_for(it): the model planning step it

if dry_run:  # the first 5 global batches (or fewer), as training draws them
    batches = [train_ids[global_batch(len(train_ids), n_global, it, seed)] for it in range(min(5, max_iters))]
    sys.exit(preflight.dry_run([[int(ds.lengths[i]) for i in idx] for idx in batches], dp=dp, cp=cp,
                               bucket_size=bucket_size, policy=schedule, seed=seed, cost=cost, mem=mem,
                               model_name=model_preset if init_from == "scratch" else init_from, dataset=dataset))

# each global batch's plan for this rank (the DP split and its DP rank's micro-batches), made one step ahead
planner.plan_kwargs = dict(dp=dp, cp=cp, bucket_size=bucket_size, policy=schedule, dp_rank=dp_rank)  # scheduler.schedule's

# -----------------------------------------------------------------------------
# model, optimizer

# one run owns out_dir (run_guard): rank 0 locks it and checks it again under the lock, and every rank agrees.
# From here on SIGTERM, SIGINT and SIGUSR1 stop the run after the current step, with a checkpoint
guard = RunGuard(out_dir, master, world_size, device, recheck=lambda: preflight.validate_config(config, world_size, ddp))
os.makedirs(out_dir, exist_ok=True)
if init_from in ("scratch", "resume"):  # resume: on meta, allocated after sharding and filled from the checkpoint
    with torch.device("meta" if init_from == "resume" else "cpu"):
        model = Transformer(model_config)
else:
    try:
        model = Transformer.from_pretrained(init_from, config=model_config)
    except (OSError, ValueError, KeyError) as e:
        fail(f"init_from={init_from!r}: {e}")
if lora_rank:  # adapters next to the chosen projections; every other parameter frozen (no grad)
    from lora import apply_lora
    apply_lora(model, lora_rank, lora_alpha, lora_targets)
raw_model = parallelize(model, fsdp=fsdp, recompute=activation_checkpoint, device=device, compute_dtype=compute_dtype)
model = torch.compile(raw_model) if compile else raw_model  # raw_model is saved: no _orig_mod. prefixes

named_params = dict(raw_model.named_parameters())  # under FSDP2: the sharded DTensors, between steps
# only these get gradients, weight decay and AdamW state (with LoRA: the adapters; frozen weights none)
trainable = {n: p for n, p in named_params.items() if p.requires_grad}
groups = [{"params": [p for p in trainable.values() if p.dim() >= 2], "weight_decay": weight_decay},  # matrices
          {"params": [p for p in trainable.values() if p.dim() < 2], "weight_decay": 0.0}]  # norms, biases
optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")
meter = StateMeter(raw_model, named_params.values(), optimizer)  # measures the first step's state bytes

start_iter = 0
ckpt_dir = os.path.join(out_dir, "ckpt")  # one folder per saved step, ckpt/step-N/ (checkpoint.py)
if init_from == "resume":  # each rank reads only its own shards (DCP reshards to this world, dp and cp)
    ckpt = checkpoint.latest(out_dir)
    meta = checkpoint.load(ckpt, raw_model, optimizer)
    start_iter = meta["iter"]
    calib.load_state(meta.get("calibration"))  # the constants and fit the run had reached
    log(f"resumed from {ckpt} at iter {start_iter}")
guard.checked_write(metrics_path, lambda: checkpoint.start_metrics(out_dir, start_iter, resume=init_from == "resume"),
                    resume_hint(ckpt_dir, start_iter), rank0_only=True)


def save_checkpoint(it, background=async_save):  # every rank writes its own shards
    # a storage error, or non-finite weights (ValueError), on any rank stops every rank; the last checkpoint stays
    guard.checked_write(ckpt_dir, lambda: checkpoint.save(out_dir, raw_model, optimizer, it=it, config=config, dataset=dataset,
                        identity=checkpoint.resume_identity(config, dp, ds.meta), async_save=background,
                        extra={"calibration": calib.state()}), resume_hint(ckpt_dir, last_saved))


# -----------------------------------------------------------------------------
# the step: learning rate, plan, micro-batches; evaluation


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def plan_batch(it, key, idx, plan_seed, plan_cost, keep=False):
    """(lengths, planner.Planned, the plan's figures for the log) of the global batch `idx` (dataset indices,
    the same on every rank): the plan submitted as `key` (else made now under plan_cost), checked to be the
    same on every rank."""
    lengths = [int(ds.lengths[i]) for i in idx]
    planned = planner.take(key, lengths, plan_seed, plan_cost, keep)
    return lengths, planned, check_ranks_agree(it, idx, lengths, planned, world_size, cp, device)


def run_batch(idx, plan, train):
    """Run this rank's micro-batches of `plan` over the global batch `idx`; with train=True each one also
    backpropagates. Returns (this rank's summed loss, the global target count). Training and evaluation
    both come here, so the eval loss goes through the same scheduler, sharding and attention as training.
    No collective in here may be reached by only some ranks (parallelize explains the invariant)."""
    # the loss is normalised by the global count of target tokens (every rank knows the global batch). A
    # batch with no target at all (every label -100) has loss 0 and zero gradients: divide by 1, not 0.
    n_targets = sum(int(ds.get(int(i))[1][1:].sum()) for i in idx)
    denom = max(n_targets, 1)
    loss_sum = torch.zeros((), device=device)
    # a DP rank the plan gives no micro-batch still runs one empty one under FSDP2: its reduce-scatter
    mbs = plan.microbatches or ([None] if fsdp and train else [])  # plan: a scheduler.RankPlan, this DP rank's part
    for i, mb in enumerate(mbs):  # micro-batch counts may differ between DP ranks: no collective inside
        last = train and i == len(mbs) - 1
        mark = calib.start(train)  # times the micro-batch for the online fit
        if fsdp and train:  # accumulate unsharded gradients; reduce-scatter them and reshard only after the last
            raw_model.set_requires_gradient_sync(last)
            raw_model.set_reshard_after_backward(last)
        batch = load_microbatch(mb, idx) if mb is not None else None
        if batch is None:  # this CP rank holds nothing in this micro-batch (no distributed sequences)
            if not (fsdp and last):
                continue
            batch = empty_microbatch(device)
        x, y, p, attn_fn = batch
        with autocast:
            _, loss = model(x, y, position_ids=p, attn_fn=attn_fn, reduction="sum")
        if train:
            meter.sample()
            # FSDP2's reduce-scatter averages over ranks (gloo has no pre-scaled sum), so its ranks scale up
            # by the world size to keep the plain SUM the all-reduce path computes
            (loss * (world_size if fsdp else 1) / denom).backward()
            if not last:
                meter.sample()
        loss_sum += loss.detach().float()
        calib.stop(mark, i)
    return loss_sum, n_targets


@torch.no_grad()
def evaluate(it, plan_cost):
    """Loss per target token over the held-out batches, planned under plan_cost (the constants that planned
    step it). Every rank runs every batch: the ring's P2P inside a CP group and the all-reduce below are
    collectives, so nanoGPT's rank-0-only eval would deadlock. Under FSDP2 the parameters are gathered once
    around them, as in a training step."""
    if fsdp:
        unshard_all(raw_model)
    total, count = torch.zeros((), device=device), 0
    for b, idx in enumerate(eval_sets):
        _, planned, _ = plan_batch(it, ("eval", b), idx, seed + b, plan_cost, keep=True)
        loss_sum, n_targets = run_batch(idx, planned.plan, train=False)
        total += loss_sum
        count += n_targets
    if fsdp:
        reshard_all(raw_model)
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
device_peak = device_peak_flops(device, peak_flops)  # FLOP/s, for MFU; None: unknown (CPU), no mfu
t_start, dts = time.time(), []  # dts: step times, for the eta
last_saved = start_iter  # the iteration of the checkpoint in out_dir (0: none)
for it in range(start_iter, max_iters):  # `it` counts steps done; this is step it + 1 in the logs and metrics
    t0 = time.time()
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # max_memory_allocated in the metrics: this step's peak
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    idx = train_ids[global_batch(len(train_ids), n_global, it, seed)]  # the same on every rank
    cost = calib.cost_for(it)  # a fit after step t plans steps t+2 on (costfit.Calibrator): known one step ahead
    measure = it == start_iter
    if measure:
        meter.start()
    if fsdp:  # the step's all-gathers, the same on every rank (parallelize explains the invariant)
        unshard_all(raw_model)
    lengths, planned, figures = plan_batch(it, it, idx, seed + it, cost)
    last = it + 1 == max_iters
    eval_now = bool(eval_sets and eval_interval and ((it + 1) % eval_interval == 0 or last))
    # plan ahead while this step runs (planner.py): the held-out batches evaluated after it, under the
    # constants that planned it; then the next step, under the constants that plan it (costfit: known now)
    for b, eval_idx in enumerate(eval_sets if eval_now else []):
        planner.submit(("eval", b), [int(ds.lengths[i]) for i in eval_idx], seed + b, planned.cost)
    if not last:
        nxt = train_ids[global_batch(len(train_ids), n_global, it + 1, seed)]
        planner.submit(it + 1, [int(ds.lengths[i]) for i in nxt], seed + it + 1, calib.cost_for(it + 1))
    plan = planned.plan
    loss_sum, n_targets = run_batch(idx, plan, train=True)
    if not fsdp:
        all_reduce_grads(list(trainable.values()), world_size, meter)
    if world_size > 1:
        dist.all_reduce(loss_sum)
    if dump_grads and it == start_iter:  # every rank: gathering FSDP2's gradient shards is a collective
        checkpoint.save_grads(os.path.join(out_dir, "grads.safetensors"), trainable, fsdp, master)
    # clip_grad_norm_ returns the norm before clipping; with max_norm=inf it only measures it
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip if grad_clip > 0 else float("inf"))
    if fsdp:  # the norm over FSDP2's shards is a replicated DTensor: the same plain tensor on every rank
        grad_norm = grad_norm.full_tensor()
    loss_total, grad_norm = torch.stack([loss_sum, grad_norm.float()]).tolist()  # one device sync
    loss_val = loss_total / max(n_targets, 1)
    if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
        # every rank holds the same all-reduced loss and gradients, so every rank stops here, before the
        # optimizer step: the weights, the last checkpoint and metrics.jsonl stay as they were
        fail(f"iter {it + 1}: loss {loss_val} / gradient norm {grad_norm} is not finite; stopped before the optimizer "
             f"step. Lower learning_rate or check the data. Last checkpoint: "
             f"{f'iter {last_saved} in {checkpoint.latest(out_dir)}' if last_saved else 'none'}")
    optimizer.step()
    if measure:  # what persists to the next step (gradients included), and the most held within this one
        state = meter.finish(world_size, device)
        log(f"state per rank (measured, max over ranks): {state['state_bytes_per_rank'] / 2**20:,.1f} MiB between steps, "
            f"{state['peak_state_bytes_per_rank'] / 2**20:,.1f} MiB peak within a step")
    optimizer.zero_grad(set_to_none=True)

    dt = time.time() - t0  # the step alone: evaluation is not counted in dt or tok/s
    dts.append(dt)
    saving = bool(checkpoint_interval and ((it + 1) % checkpoint_interval == 0 or last))
    calib.after_step(it, lengths, plan, dt, figures, outlier=eval_now or saving)  # every rank: may gather and fit
    eval_loss = evaluate(it, planned.cost) if eval_now else None
    host = host_peaks(world_size, device)  # every rank: since the last record (so the previous save counts here)
    if master:
        tokens = sum(lengths)
        peak = figures["peak_tokens_per_rank"]  # padded share + local tokens
        rec = {"iter": it + 1, "loss": round(loss_val, 6), "tokens": tokens, "targets": n_targets,
               "grad_norm": round(grad_norm, 6), "dt_ms": round(dt * 1e3, 2), "tok_per_s": round(tokens / dt, 1),
               **figures, "lr": lr}  # figures: n_microbatches, peak_tokens_per_rank, rollbacks, plan_ms, plan_wait_ms
        if device_peak:  # the cost model's FLOPs of this step's sequences over world_size devices' peak
            rec["mfu"] = round(step_mfu(cost, lengths, dt, world_size, device_peak, lora=bool(lora_rank)), 5)
        if eval_loss is not None:
            rec["eval_loss"] = round(eval_loss, 6)
        rec.update(host)
        if measure:
            rec.update(state)
        rec.update(calib.metrics(it, figures, dt))  # pred_ms, pred_err; cost_constants when they change
        if device_type == "cuda":  # this step's peak on rank 0, next to the memory model's prediction for it
            rec["max_memory_allocated"] = torch.cuda.max_memory_allocated()
            rec["predicted_memory"] = int(mem.peak(max((mb.rank_tokens(lengths)[cp_rank] for mb in plan.microbatches), default=0)))
        guard.append_record(metrics_path, json.dumps(rec, allow_nan=False))  # strict JSON, one write (run_guard.append_line)
        if (it + 1) % log_interval == 0 or it == start_iter or it == max_iters - 1:
            eta = (max_iters - it - 1) * sum(dts[-10:]) / len(dts[-10:])
            mem_s = f" | mem {rec['max_memory_allocated'] / 2**30:.1f}GiB" if device_type == "cuda" else ""
            mem_s += f" | mfu {rec['mfu']:.1%}" if device_peak else ""
            ev = f" | eval {eval_loss:.4f}" if eval_loss is not None else ""
            log(f"iter {it + 1}/{max_iters} ({100 * (it + 1) / max_iters:.0f}%) | loss {loss_val:.4f}{ev} | lr {lr:.2e} | "
                f"dt {dt * 1e3:.0f}ms (pred {rec['pred_err']:+.0%}) | tok/s {tokens / dt:,.0f} | mb {rec['n_microbatches']} | "
                f"peak {peak}/{bucket_size} tok{mem_s} | eta {eta / 60:.1f}min")
    stop = guard.agree_to_stop()  # every rank: a signal, or a failed metrics write, on any rank stops all of them here
    if stop == "signal" or saving:
        save_checkpoint(it + 1, background=async_save and not stop)  # every rank writes its own shards
        last_saved = it + 1
    if stop:
        guard.stop(stop, it + 1, ckpt_dir, last_saved)  # one line saying how to resume; a non-zero exit

if checkpoint_interval and max_iters == 0:  # no step: the initial weights (a "before training" model); every rank
    save_checkpoint(0)
guard.checked_write(ckpt_dir, checkpoint.wait, resume_hint(ckpt_dir, last_saved))  # an async save still writing
if export:  # streamed: FSDP2's shards are gathered one tensor at a time (every rank), rank 0 writes
    from export import export_hf, live_reader

    def export_model():
        for path in export_hf(out_dir, model_config, live_reader(raw_model), lora=checkpoint.lora_of(config),
                              tokenizer=ds.meta["tokenizer"], base_model=init_from, write=master):
            log(f"exported {path}")
    guard.checked_write(os.path.join(out_dir, "hf"), export_model, then=f"export again with `python export.py "
                        f"--out_dir={out_dir}`" if last_saved else "train again (no checkpoint was written)")
log(f"done: {max_iters - start_iter} iters in {time.time() - t_start:.1f}s")
guard.release()
if ddp:
    dist.destroy_process_group()
    # skip the interpreter's finalisation, where gloo's worker threads still holding tensors can end a run
    # that wrote everything with SIGABRT (pytorch PR 179291); everything is flushed first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
