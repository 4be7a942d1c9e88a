"""
Memory of one rank, measured on the model itself: does a configuration fit, and how many tokens fit.

    peak bytes of a rank = static + beta + alpha * tokens        (the paper's M = alpha S + beta, plus state)

    alpha, beta   activation bytes per packed token and the constant part, per checkpoint mode. Measured:
                  the real Transformer runs forward on the meta device (no memory, no FLOPs, any shape,
                  well under a second) while torch.autograd.graph.saved_tensors_hooks sees every tensor
                  autograd keeps for the backward. Attention is swapped for a stand-in that keeps what a
                  flash kernel keeps (q, k, v, out, fp32 lse): on meta, SDPA would take its math path and
                  "keep" the T x T matrix, 71 MB per token at 26K tokens, which no real kernel stores.
    static        parameters, gradients and AdamW state a rank holds, counted from the parameter shapes
                  with FSDP2's own dim-0 sharding, plus the unsharded working set the step needs.
    bucket_size   (usable device memory - static - beta) / alpha: the BucketSize C the scheduler plans with.
    StateMeter    the static part measured from a real run's tensors over its first step, to check it.

Only the memory the autograd graph and the training state hold is modelled. What it leaves out, so a
real run peaks above the prediction: the allocator's fragmentation, NCCL buffers and the CUDA context
(`usable` keeps 10% of the device for them), and transient buffers inside a kernel.
"""
import math

import torch
from torch.fx.experimental import _config as fx_config
from torch.utils.checkpoint import CheckpointPolicy

from model import Block, Transformer

USABLE = 0.9  # share of device memory the model may plan for; the rest is fragmentation, NCCL, context


class _FlashLikeAttention(torch.autograd.Function):
    """Causal attention stand-in for the meta device: keeps exactly what flash attention keeps for its
    backward (q, k, v, out and the fp32 log-sum-exp, one per head and token), nothing else."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def meta_model(config, dtype=torch.bfloat16):
    with torch.device("meta"):
        return Transformer(config).to(dtype)


def saved_bytes(model, n_tokens, recompute):
    """Bytes autograd keeps for the backward after one forward of n_tokens packed tokens (all of them
    loss targets, the worst case) through `model` (on the meta device, or a real one to check the
    count), with activation checkpointing `recompute`. Tensors are counted once per storage (views and
    tensors saved twice cost nothing extra); parameters are static memory, not activations: left out.
    Selective recompute keeps the outputs its policy marks MUST_SAVE in the checkpoint's own cache,
    where no hook sees them; the policy is wrapped here to count them."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, alive = {}, []

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            seen[s._cdata] = s.nbytes()
            alive.append(t)  # keep it referenced so its storage id cannot be reused while we count
        return t

    def counting_policy(ctx, op, *args, **kwargs):  # selective recompute: what the policy keeps
        decision = Block.selective_policy(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            out = op(*args, **kwargs)  # the output the cache will hold (on meta: only its shape and dtype)
            seen[out.untyped_storage()._cdata] = out.untyped_storage().nbytes()
            alive.append(out)
        return decision

    for block in model.layers:
        block.recompute, block.selective_policy = recompute, counting_policy
    dev = next(model.parameters()).device  # meta, or a real device to check the count against
    idx = torch.ones((1, n_tokens), dtype=torch.long, device=dev)
    cu = torch.tensor([0, n_tokens], dtype=torch.int32, device=dev)
    pos = torch.arange(n_tokens, device=dev)
    # x[targets != -100] has a data-dependent size; on meta, let it be all tokens (the worst case)
    if not hasattr(fx_config, "meta_nonzero_assume_all_nonzero"):
        raise RuntimeError(f"torch {torch.__version__} cannot index by a mask on the meta device "
                           "(torch.fx.experimental._config.meta_nonzero_assume_all_nonzero): the memory model needs it")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            model(idx, idx, cu_seqlens=cu, position_ids=pos, reduction="sum", attn_fn=_FlashLikeAttention.apply)
    finally:
        for block in model.layers:
            block.recompute = "none"
            del block.selective_policy  # back to the class's policy
    return sum(seen.values())


def activation_model(config, recompute="none", dtype=torch.bfloat16, tokens=(4096, 8192)):
    """(alpha, beta): bytes per token and constant bytes of a rank's activations at its peak, measured at
    two token counts on the meta device (saved_bytes is exactly linear in tokens, so two points fit it).

    alpha = what the forward keeps for the backward, per token, plus, when blocks are recomputed, the one
            block whose recomputed activations are alive during its backward (measured as the difference
            between a block's bytes without and with checkpointing).
    beta  = the measured constant part, plus one chunk of the loss's logits alive in the backward (the
            model recomputes the lm_head a chunk at a time): logits in `dtype`, their fp32 copy and its
            fp32 gradient, loss_chunk x vocab each."""
    model = meta_model(config, dtype)
    t0, t1 = tokens
    points = {}
    for mode in {"none", recompute}:
        b0, b1 = saved_bytes(model, t0, mode), saved_bytes(model, t1, mode)
        points[mode] = ((b1 - b0) / (t1 - t0), b0 - (b1 - b0) / (t1 - t0) * t0)
    alpha, beta = points[recompute]
    if recompute != "none":
        alpha += (points["none"][0] - alpha) / config.n_layer
    elem = torch.finfo(dtype).bits // 8
    beta += Transformer.loss_chunk * config.vocab_size * (elem + 4 + 4)
    return alpha, beta


def fsdp_shard_numel(shape, world):
    """Elements of the largest shard FSDP2 gives a rank: dim 0 split in `world` chunks (torch.chunk's
    sizes, ceil(d0 / world) rows), padded to that size on every rank."""
    rows = math.ceil(shape[0] / world) if shape else 1
    return rows * math.prod(shape[1:])


def static_bytes(config, world=1, fsdp=False, param_bytes=4):
    """Parameters, gradients and AdamW state on the most loaded rank, as a dict of
        persistent  what stays from one step to the next: fp32 parameters, fp32 gradients, AdamW's two
                    fp32 moments (16 bytes per parameter), sharded over `world` ranks under FSDP2;
        working     the unsharded set one step adds. FSDP2 (kept for the whole step: parallelize.py says
                    why): the gathered parameters in the compute dtype (`param_bytes`: 2 for bf16) and the
                    gradients they accumulate in fp32. Without FSDP: the flat fp32 buffer of the gradient
                    all-reduce.
        peak        persistent + working.
    param_bytes=4 is the CPU/fp32 case (no mixed precision)."""
    model = meta_model(config, torch.float32)
    shapes = [tuple(p.shape) for p in model.parameters()]  # a tied embedding is listed once
    numel = sum(math.prod(s) for s in shapes)
    if fsdp:
        persistent = 16 * sum(fsdp_shard_numel(s, world) for s in shapes)
        working = (param_bytes + 4) * numel
    else:
        persistent, working = 16 * numel, 4 * (numel if world > 1 else 0)
    return {"n_params": numel, "persistent": persistent, "working": working, "peak": persistent + working}


class MemoryModel:
    """One configuration's memory: peak(tokens) = static peak + beta + alpha * tokens, and the bucket."""

    def __init__(self, config, world=1, fsdp=False, recompute="none", dtype=torch.bfloat16, device_memory=80e9):
        self.alpha, self.beta = activation_model(config, recompute, dtype)
        self.fsdp, self.param_bytes = fsdp, torch.finfo(dtype).bits // 8 if fsdp else 4  # gathered dtype
        self.static = static_bytes(config, world, fsdp, self.param_bytes)
        self.device_memory, self.recompute = float(device_memory), recompute

    def peak(self, tokens):
        return self.static["peak"] + self.beta + self.alpha * tokens

    @property
    def bucket_size(self):
        """Tokens per rank that fit in USABLE of the device next to the static state (0: none fit)."""
        return max(0, int((USABLE * self.device_memory - self.static["peak"] - self.beta) / self.alpha))


def state_bytes(tensors):
    """Bytes of distinct storages among `tensors` (a DTensor counts its local shard): what a rank holds."""
    seen = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


class StateMeter:
    """Measures what the memory model predicts as static["persistent"] and static["peak"]: the bytes of
    parameters, gradients and AdamW state this rank holds between steps, and the most it holds within a
    step. Counted from the tensors themselves over one step (train.py: the first), so the prediction is
    checked on every run (metrics.jsonl: state_bytes_per_rank, peak_state_bytes_per_rank)."""

    def __init__(self, model, params, optimizer):
        self.model, self.params, self.optimizer = model, list(params), optimizer  # params: the sharded ones
        self.held = None  # the most bytes seen within the step being measured; None: not measuring

    def bytes(self, *extra, optim=True):
        """Held now: the sharded parameters, whatever the modules hold now (the gathered parameters inside
        an FSDP2 step), all their gradients, `extra`, and (optim=True) the optimizer state."""
        params = [*self.params, *self.model.parameters()]
        states = [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)] if optim else []
        return state_bytes([*params, *(p.grad for p in params), *extra, *states])

    def start(self):
        self.held = 0

    def sample(self, *extra):
        """Within the measured step, before its optimizer step (a no-op when not measuring)."""
        if self.held is not None:
            self.held = max(self.held, self.bytes(*extra, optim=False))

    def finish(self, world_size, device):
        """After the measured step's optimizer step, on every rank (a collective): the max over ranks of
        {"state_bytes_per_rank": what persists to the next step, "peak_state_bytes_per_rank": the most
        held within it}. AdamW's state is created by the first step: it is added to what was held inside."""
        after = self.bytes()
        optim_bytes = after - self.bytes(optim=False)
        b = torch.tensor([after, max(self.held + optim_bytes, after)], dtype=torch.int64, device=device)
        if world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(b, op=dist.ReduceOp.MAX)
        self.held = None
        return {"state_bytes_per_rank": int(b[0]), "peak_state_bytes_per_rank": int(b[1])}


def host_peak():
    """This process's peak resident host memory in bytes since the previous call, and the clock restarted:
    Linux's VmHWM, reset by writing "5" to /proc/self/clear_refs. Where that file is not writable (or off
    Linux) the peak since the process started (VmHWM, else getrusage), which never goes down."""
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource
        import sys
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak


def host_peaks(world_size, device):
    """host_peak() of every rank -> {"host_peak_max", "host_peak_min"} in bytes, on every rank. One
    all_reduce of two integers (a collective: every rank calls it)."""
    b = torch.tensor([host_peak()] * 2, dtype=torch.int64, device=device)
    b[1] = -b[1]
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(b, op=dist.ReduceOp.MAX)
    return {"host_peak_max": int(b[0]), "host_peak_min": -int(b[1])}


if __name__ == "__main__":  # python memory.py [world] [device GB]: the README's memory table
    import sys

    from model import PRESETS
    from scheduler import PAPER_BUCKET
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    device_memory = float(sys.argv[2]) * 1e9 if len(sys.argv) > 2 else 80e9
    print(f"bf16, {world} ranks, {device_memory / 1e9:.0f} GB per device ({USABLE:.0%} usable); KiB = 1024 bytes, GiB = 2^30")
    print(f"{'model':<13} {'mode':<10} {'act KiB/token':>13} {'beta GiB':>8} {'static GiB fsdp':>15} "
          f"{'(kept/working)':>14} {'bucket fsdp':>11} {'static GiB replicated':>21} {'bucket repl.':>12} {'paper C':>7}")
    for name in ("qwen2.5-0.5b", "qwen2.5-7b"):
        for mode in ("none", "selective", "full"):
            sharded = MemoryModel(PRESETS[name], world, True, mode, device_memory=device_memory)
            replicated = MemoryModel(PRESETS[name], world, False, mode, device_memory=device_memory)
            s = sharded.static
            print(f"{name:<13} {mode:<10} {sharded.alpha / 2**10:>13,.1f} {sharded.beta / 2**30:>8.2f} {s['peak'] / 2**30:>15.2f} "
                  f"{s['persistent'] / 2**30:>6.2f}/{s['working'] / 2**30:<7.2f} {sharded.bucket_size:>11,} "
                  f"{replicated.static['peak'] / 2**30:>21.2f} {replicated.bucket_size:>12,} {PAPER_BUCKET[name]:>7,}")
