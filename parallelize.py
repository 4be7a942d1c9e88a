"""
Parallelism applied from outside the model, as torchtitan's parallelize.py does: activation checkpointing,
FSDP2 over all dp x cp ranks, and the collectives train.py issues once per step.

The collective invariant: every rank must issue the same collectives in the same order, yet Skrull gives
DP ranks different numbers of micro-batches and may leave a CP rank with nothing in a micro-batch. So
FSDP2 runs ZeRO-2-like here: every rank gathers all parameters once per step (unshard_all), accumulates
unsharded gradients through its micro-batches without communicating, and reduce-scatters once, in the
backward of its last micro-batch, which every rank runs (empty_microbatch if it holds no tokens there).
Without FSDP2 the step's one collective is all_reduce_grads. docs/memory.md has what this costs.
"""
import hashlib
from functools import partial

import torch
import torch.distributed as dist

from preflight import fail


def init_distributed(device_type, local_rank):
    """Start the default process group of a torchrun job; returns this rank's device. CUDA: NCCL bound to
    GPU `local_rank`, both as the current device and as init_process_group's device_id (without it NCCL's
    first collective guesses the GPU as rank % local GPUs, wrong when nproc_per_node is below the node's
    GPU count). CPU: gloo."""
    if device_type != "cuda":
        dist.init_process_group(backend="gloo")
        return "cpu"
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl", device_id=device)
    return str(device)


def parallelize(model, *, fsdp, recompute, device, compute_dtype=None):
    """Set every block's activation checkpointing (`recompute`: none | full | selective), move the model to
    `device` and, with fsdp, shard each block and then the rest (embeddings, final norm, lm_head) over the
    default mesh, i.e. all ranks. compute_dtype: FSDP2 gathers parameters in it and reduce-scatters fp32
    gradients (None: the parameters' own dtype). With LoRA, FSDP2 shards and gathers the frozen weights
    too, but only the adapters get gradients, so only they are reduce-scattered and get optimizer state.
    A model built on the meta device (a resumed run: every weight comes from the checkpoint) is sharded
    first and allocated after, uninitialised, so no rank ever holds all of it."""
    for block in model.layers:
        block.recompute = recompute
    on_meta = next(model.parameters()).is_meta
    if not on_meta:
        model.to(device)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp, reshard_after_forward=False)
        model = fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    if on_meta:
        model.to_empty(device=device)
        if model.config.tie_embeddings:  # to_empty gave each module its own tensor: share one again
            model.lm_head.weight = model.embed_tokens.weight
    return model


def unshard_all(model):
    """Gather every FSDP2 group's parameters: once per step, on every rank."""
    for m in [*model.layers, model]:
        m.unshard()


def reshard_all(model):
    for m in [*model.layers, model]:
        m.reshard()


def empty_microbatch(device):
    """A micro-batch without tokens, (x, y, positions, attention function): the last micro-batch of a rank
    that holds nothing there, still run under FSDP2 because the step's reduce-scatters happen in its backward."""
    from context_parallel import AttnPlan, attention
    none = torch.zeros((1, 0), dtype=torch.long, device=device)
    return none, none, none, partial(attention, plan=AttnPlan(None, [0], device))


def all_reduce_grads(params, world_size, meter=None):
    """Sum the gradients of `params` over all DP x CP ranks: every rank's loss is already divided by the
    global target count, so the sum is the full-batch gradient. One flat buffer, one call. (Under FSDP2 the
    same sum is the reduce-scatter inside the last backward.) meter: a memory.StateMeter, which counts the
    flat buffer while it exists."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        if meter is not None:
            meter.sample(flat)
        dist.all_reduce(flat)
        grads = list(torch.split(flat, [g.numel() for g in grads]))
    for p, g in zip(params, grads):
        p.grad = g.view_as(p)


def plan_figures(planned, lengths):
    """What the log reports of this rank's plan: micro-batches, the fullest CP rank's tokens, roll-backs,
    planning and waiting time (ms), and its DP rank's predicted time (us, by the CostModel that planned it):
    a planner.Planned of a scheduler.RankPlan."""
    mbs = planned.plan.microbatches
    return [len(mbs), max((max(mb.rank_tokens(lengths)) for mb in mbs), default=0), sum(mb.rollbacks for mb in mbs),
            round(planned.plan_ms, 3), round(planned.wait_ms, 3), round(planned.cost.dp_rank_time(mbs, lengths) * 1e6)]


def check_ranks_agree(it, idx, lengths, planned, world_size, cp, device):
    """Every rank computes the global batch and its plan on its own (no communication), so they must come
    out the same everywhere: if one node read a different dataset, profile JSON or numpy version, CP peers
    would exchange mismatched buffers (a hang, or silently wrong gradients). Every rank plans the DP split
    and its own DP rank's micro-batches (a scheduler.RankPlan in planned.plan): all ranks must agree on the
    batch and the split, and CP peers on their DP rank's micro-batches. One all-gather per step of three
    64-bit digests and the plan's figures (plan_figures), called by every rank, checks it; on a mismatch
    every rank stops here. Returns the step's figures over all ranks, for the log: micro-batches and the
    fullest rank (max), roll-backs (sum over DP ranks), planning and waiting time (max: the step goes at
    the pace of the slowest rank), and pred_ms, the step time the planning CostModel predicts: the slowest
    DP rank's micro-batches plus the gradient exchange and optimizer (CostModel.predict_step_time)."""
    mine = plan_figures(planned, lengths)
    t_step_ms = planned.cost.t_step(world_size) * 1e3
    if world_size == 1:
        return {**dict(zip(("n_microbatches", "peak_tokens_per_rank", "rollbacks", "plan_ms", "plan_wait_ms"), mine[:5])),
                "pred_ms": round(mine[5] / 1e3 + t_step_ms, 3)}

    def digest(obj):
        return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little", signed=True)
    plan = planned.plan
    row = torch.tensor([digest((idx.tolist(), lengths)), digest(plan.split),
                        digest([(mb.distributed, mb.local) for mb in plan.microbatches]),
                        *mine[:3], *(round(ms * 1e3) for ms in mine[3:5]), mine[5]], dtype=torch.int64, device=device)
    every = [torch.empty_like(row) for _ in range(world_size)]
    dist.all_gather(every, row)
    every = torch.stack(every).cpu().tolist()
    for col, what in ((0, "with rank 0 on the global batch (sample indices and lengths): is every rank reading the same dataset?"),
                      (1, "with rank 0 on the plan (the DP split): do all ranks use the same --profile file, code and numpy version?"),
                      (2, "with their CP peers on the plan (their DP rank's micro-batches): do all ranks use the same "
                          "--profile file, code and numpy version?")):
        odd = [r for r in range(world_size) if every[r][col] != every[0 if col < 2 else r - r % cp][col]]
        if odd:
            fail(f"iter {it + 1}: ranks {odd} disagree {what} Stopping every rank before mismatched data is exchanged")
    firsts = every[::cp]  # one rank per DP rank: CP peers hold the same plan
    return {"n_microbatches": max(r[3] for r in every), "peak_tokens_per_rank": max(r[4] for r in every),
            "rollbacks": sum(r[5] for r in firsts), "plan_ms": max(r[6] for r in every) / 1e3,
            "plan_wait_ms": max(r[7] for r in every) / 1e3,
            "pred_ms": round(max(r[8] for r in every) / 1e3 + t_step_ms, 3)}  # the slowest DP rank, then t_step
