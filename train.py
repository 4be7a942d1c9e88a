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
count, so the gradient does not depend on the schedule (DESIGN.md "Equivalence").
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

from model import PRESETS, ModelConfig, Transformer
from scheduler import CostModel, schedule as make_plan

# -----------------------------------------------------------------------------
# default config values; override with config/*.py then --key=value (configurator.py)
# I/O
out_dir = "out"
init_from = "scratch"  # 'scratch' | 'resume' | path to a local Hugging Face Qwen2/Qwen2.5 directory
model_preset = "tiny"  # model.PRESETS key, used when init_from='scratch'
checkpoint_interval = 50  # iters between checkpoints (and always at the end); 0 = never
log_interval = 1
dump_grads = False  # write the all-reduced gradients of the first step to out_dir/grads.safetensors
# data
dataset = None  # prepared directory (data/prepare.py); None -> generate the synthetic set below
synthetic_dist = "lmsys"  # wikipedia | lmsys | chatqa2 (paper Table 1 length shapes)
synthetic_n = 2000  # number of synthetic samples
synthetic_max_len = 4096  # longest synthetic sample, in tokens
# Skrull
cp = 1  # context-parallel degree; dp = world_size // cp
schedule = "skrull"  # one of scheduler.POLICIES: naive | sorted | dacp | skrull (the paper) | skrull_plus (ours)
bucket_size = 4096  # BucketSize C: max tokens one rank holds for a micro-batch; 0 -> from `profile`
profile = None  # path to a profile JSON from `python bench.py profile` (cost constants, bucket_size)
batch_size = 8  # sequences per DP rank per optimizer step
# optimizer
max_iters = 200
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
lr_decay_iters = None  # None -> max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA
compile = False
threads = None  # torch.set_num_threads per process on CPU; None -> torch's default
seed = 1337
# -----------------------------------------------------------------------------
_train_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in _train_keys}  # for logging and checkpoints
# -----------------------------------------------------------------------------

# distributed: world = dp x cp. CP groups are runs of consecutive ranks so the ring stays inside a node.
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
else:
    rank, world_size, local_rank = 0, 1, 0
master = rank == 0
if world_size % cp != 0:
    raise SystemExit(f"world size {world_size} is not divisible by cp={cp}")
dp = world_size // cp
dp_rank, cp_rank = rank // cp, rank % cp
cp_group = None
if ddp and cp > 1:
    for d in range(dp):  # every rank must take part in creating every group
        g = dist.new_group(list(range(d * cp, (d + 1) * cp)))
        if d == dp_rank:
            cp_group = g
if threads is not None and not device.startswith("cuda"):
    torch.set_num_threads(threads)
torch.manual_seed(seed)  # same init on every rank
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda" and dtype not in ("bfloat16", "float16"):
    raise SystemExit(f"dtype={dtype!r} on CUDA: attention runs flash kernels, use dtype='bfloat16' or 'float16' (autocast)")
autocast = torch.autocast(device_type, dtype=getattr(torch, dtype)) if device_type == "cuda" and dtype != "float32" else nullcontext()


def log(*args):
    if master:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# data: a prepared directory, or the synthetic set generated once by rank 0

from data.prepare import global_batch, load_dataset

if dataset is None:
    from data.synthetic import default_dir, make_synthetic
    dataset = default_dir(synthetic_dist, synthetic_n, synthetic_max_len, seed)
    if master and not os.path.exists(os.path.join(dataset, "meta.json")):
        log(f"generating synthetic dataset -> {dataset}")
        make_synthetic(dataset, dist=synthetic_dist, n=synthetic_n, max_len=synthetic_max_len, seed=seed)
    if ddp:
        dist.barrier()
ds = load_dataset(dataset)
n_global = dp * batch_size  # sequences per optimizer step
if len(ds) < n_global:
    raise SystemExit(f"dataset {dataset} has {len(ds)} sequences, fewer than one global batch ({n_global})")


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
# model, optimizer, cost model

os.makedirs(out_dir, exist_ok=True)
ckpt_path = os.path.join(out_dir, "ckpt.safetensors")
start_iter = 0
if init_from in ("scratch", "resume"):
    meta_ckpt = None
    if init_from == "resume":
        from safetensors import safe_open
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"init_from='resume' but {ckpt_path} does not exist")
        with safe_open(ckpt_path, "pt") as f:
            meta_ckpt = f.metadata()
        model_config = ModelConfig(**json.loads(meta_ckpt["model_config"]))
    else:  # from scratch the vocabulary is the dataset tokenizer's, rounded up to a multiple of 64
        model_config = ModelConfig(**{**PRESETS[model_preset].__dict__, "vocab_size": -(-ds.meta["vocab_size"] // 64) * 64})
    model = Transformer(model_config)
else:
    model = Transformer.from_pretrained(init_from)
    model_config = model.config
if ds.meta["vocab_size"] > model_config.vocab_size:
    raise SystemExit(f"dataset vocab {ds.meta['vocab_size']} exceeds the model's {model_config.vocab_size}: "
                     f"prepare the data with the model's tokenizer")
model.to(device)
raw_model = model  # keep the uncompiled module for saving (no _orig_mod. prefixes)
if compile:
    model = torch.compile(model)

decay = [p for p in raw_model.parameters() if p.dim() >= 2]
no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")
named_params = dict(raw_model.named_parameters())

if profile is not None:
    cost = CostModel.from_profile(model_config, profile)
    if not bucket_size:
        with open(profile) as f:
            bucket_size = json.load(f)["bucket_size"]
else:
    cost = CostModel(model_config)
if not bucket_size or bucket_size < 0:
    raise SystemExit(f"bucket_size={bucket_size}: give a positive bucket_size, or 0 together with a profile JSON")
bucket_size = int(bucket_size)
try:  # fail now, not at the step that first draws the longest sample (the scheduler's own check)
    make_plan([int(ds.lengths.max())], dp=1, cp=cp, bucket_size=bucket_size, policy="naive")
except ValueError as e:
    raise SystemExit(f"dataset {dataset}, its longest sample ({int(ds.lengths.max())} tokens): {e}. "
                     f"Raise cp or bucket_size, or re-prepare with --max_len")


def save_checkpoint(it):
    """Model + AdamW state in one safetensors file, written to a temp file and renamed into place."""
    from safetensors.torch import save_file
    tensors = {f"model.{n}": p.detach().cpu().contiguous() for n, p in named_params.items()}
    for n, p in named_params.items():
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"optim.{n}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    meta = {"iter": str(it), "model_config": json.dumps(model_config.__dict__), "config": json.dumps(config)}
    tmp = ckpt_path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, ckpt_path)


def load_checkpoint():
    from safetensors.torch import load_file
    tensors = load_file(ckpt_path)
    with torch.no_grad():
        for n, p in named_params.items():
            p.copy_(tensors[f"model.{n}"])
    # through load_state_dict, which puts each state tensor where this optimizer wants it (fused AdamW
    # on CUDA keeps `step` on the device, the for-each one on the CPU)
    state = optimizer.state_dict()  # its "state" is keyed by position in param_groups
    position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for n, p in named_params.items():
        if f"optim.{n}.step" in tensors:
            state["state"][position[id(p)]] = {k: tensors[f"optim.{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
    optimizer.load_state_dict(state)
    return int(meta_ckpt["iter"])


if init_from == "resume":
    start_iter = load_checkpoint()
    log(f"resumed from {ckpt_path} at iter {start_iter}")

metrics_path = os.path.join(out_dir, "metrics.jsonl")
if master:  # keep the history before start_iter, drop anything a crashed run wrote after the checkpoint
    kept = []
    if start_iter > 0 and os.path.exists(metrics_path):
        kept = [l for l in open(metrics_path) if l.strip() and json.loads(l)["iter"] < start_iter]
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


def all_reduce_grads():
    """Gradients are reduced over DP x CP: every rank's loss is already divided by the global target
    count, so a plain SUM over all ranks gives the full-batch gradient. One flat buffer, one call."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in named_params.values()]
    if world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        grads = list(torch.split(flat, [g.numel() for g in grads]))
    for p, g in zip(named_params.values(), grads):
        p.grad = g.view_as(p)


log(f"world {world_size} = dp {dp} x cp {cp} | schedule {schedule} | bucket {bucket_size} tokens/rank | "
    f"{raw_model.num_params() / 1e6:.2f}M params | dataset {dataset} ({len(ds)} seqs)")
t_start = time.time()
dts = []
for it in range(start_iter, max_iters):
    t0 = time.time()
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # max_memory_allocated in the metrics: this step's peak
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    idx = global_batch(len(ds), n_global, it, seed)  # the same on every rank
    lengths = [int(ds.lengths[i]) for i in idx]
    plan = make_plan(lengths, dp=dp, cp=cp, bucket_size=bucket_size, policy=schedule, cost=cost, seed=seed + it)
    # the loss is normalised by the global count of target tokens (every rank knows the global batch)
    n_targets = sum(int(ds.get(int(i))[1][1:].sum()) for i in idx)
    peak = max(max(mb.rank_tokens(lengths)) for mbs in plan for mb in mbs)  # padded share + local tokens
    if peak > bucket_size:
        raise RuntimeError(f"plan puts {peak} tokens on one rank, over bucket_size={bucket_size}")

    loss_sum = torch.zeros((), device=device)
    for mb in plan[dp_rank]:  # micro-batch counts may differ between DP ranks: no collective inside
        batch = load_microbatch(mb, idx)
        if batch is None:  # this CP rank holds nothing in this micro-batch (no distributed sequences)
            continue
        x, y, p, attn_fn = batch
        with autocast:
            _, loss = model(x, y, position_ids=p, attn_fn=attn_fn, reduction="sum")
        (loss / n_targets).backward()
        loss_sum += loss.detach().float()
    all_reduce_grads()
    if dump_grads and it == start_iter and master:
        from safetensors.torch import save_file
        save_file({n: p.grad.detach().cpu().contiguous() for n, p in named_params.items()}, os.path.join(out_dir, "grads.safetensors"))
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world_size > 1:
        dist.all_reduce(loss_sum)
    loss_val = loss_sum.item() / n_targets  # .item() also waits for the step to finish

    dt = time.time() - t0
    dts.append(dt)
    if master:
        tokens = sum(lengths)
        rec = {"iter": it, "loss": round(loss_val, 6), "tokens": tokens, "dt_ms": round(dt * 1e3, 2),
               "tok_per_s": round(tokens / dt, 1), "n_microbatches": max(len(m) for m in plan),
               "peak_tokens_per_rank": peak, "rollbacks": sum(mb.rollbacks for mbs in plan for mb in mbs), "lr": lr}
        if device_type == "cuda":
            rec["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if it % log_interval == 0 or it == max_iters - 1:
            recent = dts[-10:]
            eta = (max_iters - it - 1) * sum(recent) / len(recent)
            mem = f" | mem {rec['max_memory_allocated'] / 2**30:.1f}GiB" if device_type == "cuda" else ""
            log(f"iter {it + 1}/{max_iters} ({100 * (it + 1) / max_iters:.0f}%) | loss {loss_val:.4f} | lr {lr:.2e} | "
                f"dt {dt * 1e3:.0f}ms | tok/s {tokens / dt:,.0f} | mb {rec['n_microbatches']} | "
                f"peak {peak}/{bucket_size} tok{mem} | eta {eta / 60:.1f}min")
    last = it + 1 == max_iters
    if checkpoint_interval and ((it + 1) % checkpoint_interval == 0 or last) and master:
        save_checkpoint(it + 1)

log(f"done: {max_iters - start_iter} iters in {time.time() - t_start:.1f}s")
if ddp:
    dist.destroy_process_group()
    # Skip the interpreter's finalisation: with gloo we saw about one 2-process run in 15 die with SIGABRT
    # there, after every step, metric and checkpoint was written (gloo worker threads still holding
    # tensors while Python tears down, as discussed in pytorch PR 179291). Everything is flushed first.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
