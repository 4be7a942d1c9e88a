"""
Context parallelism: variable-length zigzag ring attention, and the DACP entry point of Skrull.

A CP group of W ranks shares the distributed sequences of a micro-batch. Each such sequence is cut
into 2W equal chunks and rank r holds chunks r and 2W-1-r ("zigzag"): an early chunk with little
causal work and a late one with a lot, so every rank does the same attention work. K and V travel
around the ring (rank r sends to r+1); after W steps every rank has seen every rank's K, V.

Why zigzag needs no masks (chunk c of a sequence may attend chunk c' iff c' <= c; rank r holds
chunks r < W <= 2W-1-r). In the step where this rank holds the K, V of rank s:
    s == r : q chunks (r, 2W-1-r) vs k chunks (r, 2W-1-r): plain causal on the two concatenated
             chunks (the block is square, so top-left and bottom-right causal agree).
    s <  r : every q chunk sees k chunk s fully and never k chunk 2W-1-s  -> all q vs kv's first
             half, no mask.
    s >  r : q chunk r sees neither kv chunk; q chunk 2W-1-r sees both    -> q's second half vs all
             kv, no mask.
So only the global cu_seqlens (the same on every rank) and the step index are needed: the K/V hop
carries no mask metadata, and no block ever has a fully masked row (PyTorch's CPU flash kernel
reports lse = 0 for such a row instead of -inf, which would corrupt the merge).

Skrull's DACP (paper section 4.1): a micro-batch has distributed sequences (ring, above) and local
ones kept whole on one rank. `dacp_attention` computes the local ones while the ring's P2P is in
flight, one slice per ring step, so rank time ~ max(T_comm, T_local) + T_dist / W.

The step structure (forward and backward alike; scheduler.CostModel follows it), for step = 0..W-1:
    1. post the next hop (K/V; in backward also the dK/dV accumulators) on the side stream,
    2. compute this step's slice of the local sequences,
    3. compute the ring block for the K/V held now and merge it,
    4. wait for the hop.
Without distributed sequences there is one step, no hop, and all local sequences in one kernel call.

One kernel path. `_attn_fwd` / `_attn_bwd` (pure functions: no communication, no state) compute
every ring block and every local slice, and model.varlen_attention calls the same path: on CUDA one
flash varlen call per block, on CPU an exact per-sequence loop.

A plan per micro-batch. `AttnPlan` holds everything that depends only on the offsets (kernel
offsets on the device, max lengths, row indices, local slices), built once from CPU lists (train.py's
load_microbatch) and shared by every layer, so no layer reads offsets back from the GPU.
`attention(q, k, v, plan)` runs it; `ring_attention` / `dacp_attention` build one per call.

In-process ring. `emulated_attention` runs W ranks in one process through the same loop and
kernels, the hop handed over in memory: the CUDA kernels can be checked on one GPU, and CPU tests
need no processes. The gloo tests still check the real P2P.

Numerics: block outputs are merged in fp32 by log-sum-exp; dq and the circulating dK/dV
accumulators stay fp32 until the very end (ring-flash-attention rounds them to bf16 per step,
which makes the backward error grow with W).
"""
import contextlib
import math
from collections import namedtuple

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# sharding helpers


def _lengths(cu_seqlens):
    cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    return [int(b) - int(a) for a, b in zip(cu[:-1], cu[1:])]


def _zigzag_index(cu_seqlens, rank, world_size, device=None):
    """Global row indices (dim 0 of the packed tensor) owned by `rank`: chunks r and 2W-1-r."""
    cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    n2 = 2 * world_size
    parts = []
    for a, length in zip(cu[:-1], _lengths(cu)):
        if length % n2:
            raise ValueError(f"sequence at offset {a} has length {length}, not a multiple of 2*W={n2}")
        c = length // n2
        for chunk in (rank, n2 - 1 - rank):
            parts.append(torch.arange(a + chunk * c, a + (chunk + 1) * c, device=device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def zigzag_shard(x, cu_seqlens, rank, world_size):
    """This rank's rows of a packed tensor x (dim 0 = tokens); every sequence length % (2W) == 0."""
    return x.index_select(0, _zigzag_index(cu_seqlens, rank, world_size, x.device))


def zigzag_unshard(shards, cu_seqlens, world_size):
    """Inverse of zigzag_shard: shards[r] is rank r's tensor; returns the packed tensor."""
    out = shards[0].new_empty((sum(s.shape[0] for s in shards),) + tuple(shards[0].shape[1:]))
    for r, s in enumerate(shards):
        out[_zigzag_index(cu_seqlens, r, world_size, s.device)] = s
    return out


def pad_to_multiple(input_ids, labels, position_ids, lengths, multiple):
    """Pad every sequence of a 1-D packed batch at its end to a multiple of `multiple` (2W for the
    ring): token id 0, label -100 (never trained on), positions continuing past the last token."""
    ids, labs, pos, new_lengths, start = [], [], [], [], 0
    for length in (int(n) for n in lengths):
        pad = -length % multiple
        end = start + length
        ids += [input_ids[start:end], input_ids.new_zeros(pad)]
        labs += [labels[start:end], labels.new_full((pad,), -100)]
        last = position_ids[end - 1] if length else position_ids.new_tensor(-1)
        pos += [position_ids[start:end], last + 1 + torch.arange(pad, dtype=position_ids.dtype, device=position_ids.device)]
        new_lengths.append(length + pad)
        start = end
    if torch.is_tensor(lengths):
        new_lengths = torch.tensor(new_lengths, dtype=lengths.dtype, device=lengths.device)
    return torch.cat(ids), torch.cat(labs), torch.cat(pos), new_lengths

# -----------------------------------------------------------------------------
# per-block attention kernels: the ONE attention path of the repo (model.py's local-only batches and
# every ring block call these). q (Tq, H, D), k/v (Tk, H_kv, D), varlen offsets cu_q/cu_k (same
# number of sequences). _attn_fwd returns out (Tq, H, D) and lse (H, Tq) fp32; _attn_bwd takes the
# MERGED out and lse, so each block's gradient is its exact share of the full gradient. Both are pure
# functions of their inputs (no communication, no state), so a block can be recomputed at will.
#
# CUDA: PyTorch's own FlashAttention-2 varlen kernels (aten._flash_attention_forward/_backward), one
# call for all sequences of a block, GQA handled inside the kernel. They exist in torch 2.11 and 2.13;
# torch.nn.attention.varlen (2.13) wraps the same op but exposes no backward that accepts an outside
# (merged) lse, which the ring needs. The flash-attn package is not used: its equivalent entry points
# are private and have changed signature between releases, and PyTorch ships the same FA2 kernels.
# CPU: torch's flash op per sequence, in fp32 or fp64: exact, and the reference the GPU is held to.

# varlen offsets of one block: `host` python ints (the CPU loop), `cuda` the same as int32 on the CUDA
# device (the flash kernels; None on CPU), `max_len` the longest sequence
Offsets = namedtuple("Offsets", "host cuda max_len")


def to_device(t, device):
    """A CPU tensor on `device`. To CUDA through pinned memory and a non-blocking copy: PyTorch finishes a
    copy from pageable memory with a stream sync, so the host would wait for every kernel queued before it
    and could not prepare the next micro-batch while the GPU runs this one. On CPU: `t` itself."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _offsets(offsets, device):
    offsets = [int(x) for x in offsets]
    lens = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    on_cuda = to_device(torch.tensor(offsets, dtype=torch.int32), device) if torch.device(device).type == "cuda" else None
    return Offsets(offsets, on_cuda, max(lens, default=0))


_NO_DROPOUT_RNG = {}  # the backward's philox seed/offset arguments: unused without dropout, one per device


def _attn_fwd(q, k, v, cu_q, cu_k, causal, scale):
    if q.is_cuda:
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"attention on CUDA runs flash kernels: q/k/v must be bf16 or fp16 (use autocast), got {q.dtype}")
        out, lse = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q.cuda, cu_k.cuda, cu_q.max_len, cu_k.max_len, 0.0, causal, False, scale=scale)[:2]
        # the merge and the backward index lse as (H, Tq); some torch releases returned a padded
        # (batch, H, max_q) layout here instead. A shape check costs no device sync.
        if lse.shape != (q.shape[1], q.shape[0]):
            raise RuntimeError(f"torch {torch.__version__}: flash varlen lse has shape {tuple(lse.shape)}, "
                               f"expected (heads, tokens) = {(q.shape[1], q.shape[0])}")
        return out, lse
    # CPU: torch's flash op per sequence, (B, H, S, D) layout, no GQA support -> expand kv heads.
    # bf16/fp16 blocks run in fp32 here: exact block results, only the final output is rounded
    # (the bf16 CPU kernel rounds each head's dk/dv before the GQA sum: ~2x the error).
    g, acc = q.shape[1] // k.shape[1], torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    out, lse = torch.zeros_like(q), q.new_full((q.shape[1], q.shape[0]), -math.inf)
    for a, b, c, d in zip(cu_q.host[:-1], cu_q.host[1:], cu_k.host[:-1], cu_k.host[1:]):
        if b > a and d > c:
            seq_out, seq_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _bhsd(q[a:b]), _bhsd(k[c:d], g), _bhsd(v[c:d], g), 0.0, causal, scale=scale)
            out[a:b], lse[:, a:b] = seq_out[0].transpose(0, 1), seq_lse[0]
    return out, lse


def _attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
    """-> dq, dk, dv of this block (dk, dv already summed over the query heads of each kv head)."""
    if q.is_cuda:
        if q.device not in _NO_DROPOUT_RNG:
            _NO_DROPOUT_RNG[q.device] = torch.zeros(2, dtype=torch.uint64, device=q.device)
        rng = _NO_DROPOUT_RNG[q.device]
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), cu_q.cuda, cu_k.cuda, cu_q.max_len, cu_k.max_len,
            0.0, causal, rng, rng, scale=scale)
    g, acc = q.shape[1] // k.shape[1], torch.promote_types(q.dtype, torch.float32)
    dout, q, k, v, out = (x.to(acc) for x in (dout, q, k, v, out))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b, c, d in zip(cu_q.host[:-1], cu_q.host[1:], cu_k.host[:-1], cu_k.host[1:]):
        if b > a and d > c:
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _bhsd(dout[a:b]), _bhsd(q[a:b]), _bhsd(k[c:d], g), _bhsd(v[c:d], g),
                _bhsd(out[a:b]), lse[None, :, a:b].contiguous(), 0.0, causal, scale=scale)
            dq[a:b] = gq[0].transpose(0, 1)
            dk[c:d] = gk[0].transpose(0, 1).unflatten(1, (k.shape[1], g)).sum(2)
            dv[c:d] = gv[0].transpose(0, 1).unflatten(1, (k.shape[1], g)).sum(2)
    return dq, dk, dv


def _bhsd(x, groups=1):  # (S, H, D) -> (1, H * groups, S, D), kv head j serving q heads j*g..j*g+g-1
    return x.repeat_interleave(groups, dim=1).transpose(0, 1)[None] if groups > 1 else x.transpose(0, 1)[None]


def _merge(out, lse, block_out, block_lse, rows=None):
    """Fold a block's (out, lse) into the fp32 accumulators, in place (only `rows` if given)."""
    old_out, old_lse = (out, lse) if rows is None else (out[rows], lse[:, rows])
    new = torch.logaddexp(old_lse, block_lse)
    safe = new.masked_fill(new == -math.inf, 0.0)  # both sides empty: keep out 0, lse -inf (no NaN)
    merged = (old_out * torch.exp(old_lse - safe).T[..., None]
              + block_out.to(old_out.dtype) * torch.exp(block_lse - safe).T[..., None])
    if rows is None:
        out.copy_(merged)
        lse.copy_(new)
    else:
        out[rows], lse[:, rows] = merged, new

# -----------------------------------------------------------------------------
# the plan: everything about a micro-batch's attention that depends only on its offsets


class AttnPlan:
    """Offsets, kernel arguments and row indices of one micro-batch on one CP rank, built ONCE from
    CPU lists (train.py's load_microbatch) and shared by every layer's forward and backward. Building
    it from CPU lists copies a few small tensors to the device, pinned and non-blocking (to_device), so
    neither it nor any layer after it makes the host wait for the device (a plan built from CUDA offsets
    pays one sync, reading them back).

    cu_seqlens_dist: GLOBAL offsets of the distributed sequences (same on every CP rank), or None.
    cu_seqlens_local: offsets of this rank's whole local sequences, from 0, or None.
    world, rank: the CP group's size and this rank's index; by default read from `group` (or the
    default process group) when there are distributed sequences, else 1 and 0."""

    def __init__(self, cu_seqlens_dist, cu_seqlens_local, device="cpu", group=None, world=None, rank=None):
        dev = torch.device(device)
        lens = _lengths(cu_seqlens_dist) if cu_seqlens_dist is not None else []
        if world is None:
            world, rank = 1, 0
            if lens and (group is not None or dist.is_initialized()):
                g = group if group is not None else dist.group.WORLD
                world, rank = dist.get_world_size(g), dist.get_rank(g)
        self.group, self.world, self.rank, self.device = group, int(world), int(rank or 0), dev
        W, n2 = self.world, 2 * self.world
        if W > 1 and any(n % n2 for n in lens):  # W == 1: one causal block per whole sequence
            raise ValueError(f"distributed lengths {lens} must be multiples of 2*W={n2}; see pad_to_multiple")
        full = [0] + [sum(lens[:i + 1]) // W for i in range(len(lens))]  # this rank's offsets (2 chunks/seq)
        half = [0] + [sum(lens[:i + 1]) // n2 for i in range(len(lens))]  # one chunk per seq
        self.n_dist, self.full, self.half = full[-1], _offsets(full, dev), _offsets(half, dev)
        first = [torch.arange(full[i], full[i] + half[i + 1] - half[i]) for i in range(len(lens))]
        second = [torch.arange(full[i] + half[i + 1] - half[i], full[i + 1]) for i in range(len(lens))]
        self.first = to_device(torch.cat(first), dev) if first else None
        self.second = to_device(torch.cat(second), dev) if second else None
        self.steps = W if lens else 1
        # local sequences: split into one group per ring step, of ~equal attention cost (sum L^2);
        # without distributed sequences that is one group: one kernel call for all of them
        loc = _lengths(cu_seqlens_local) if cu_seqlens_local is not None and len(cu_seqlens_local) > 1 else []
        self.n_local = sum(loc)
        slots, total, done, start = self.steps, sum(n * n for n in loc), 0, self.n_dist
        groups = [[] for _ in range(self.steps)]
        for n in loc:
            groups[min(slots - 1, done * slots // total) if total else 0].append((start, start + n))
            done, start = done + n * n, start + n
        self.local = [(g[0][0], g[-1][1], _offsets([0] + [b - g[0][0] for _, b in g], dev)) if g else None
                      for g in groups]

    def check(self, q, k):
        if q.shape[0] != self.n_dist + self.n_local:
            raise ValueError(f"q has {q.shape[0]} rows, expected {self.n_dist} distributed + {self.n_local} local")
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"{q.shape[1]} query heads not divisible by {k.shape[1]} kv heads")

    def block(self, src):
        """(q rows, kv rows, cu_q, cu_k, causal) for the step holding rank src's K, V (module doc)."""
        if src == self.rank:
            return None, None, self.full, self.full, True
        if src < self.rank:
            return None, self.first, self.full, self.half, False
        return self.second, None, self.half, self.full, False


def _rows(x, idx):
    return x if idx is None else x.index_select(0, idx)


def _add_rows(dst, idx, src):
    if idx is None:
        dst.add_(src)
    else:
        dst.index_add_(0, idx, src.to(dst.dtype))

# -----------------------------------------------------------------------------
# the ring: send to rank+1, receive from rank-1, one flat buffer per hop. post(bufs, tag) takes the
# buffers of the ranks this process runs (one, or all W when emulated) and returns wait() -> the
# buffers each of them receives.


_P2P_STREAMS = {}  # one side stream per device, shared by all layers


class _Ring:
    """Real P2P (gloo or NCCL) between the processes of a CP group. On CUDA every stream it touches is
    one of `device`'s, the device the buffers live on: torch.cuda.current_stream() alone would be the
    CURRENT device's, a different one in a process that never called torch.cuda.set_device, and then
    nothing would order the hop after the kernels that wrote the buffer (a silent race)."""

    def __init__(self, group, device):
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)  # P2P takes global ranks
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)
        self.device, self.stream = torch.device(device), None  # CPU (gloo): no streams, P2P is already asynchronous
        if self.device.type == "cuda":
            if self.device not in _P2P_STREAMS:
                _P2P_STREAMS[self.device] = torch.cuda.Stream(self.device)
            self.stream = _P2P_STREAMS[self.device]

    def post(self, bufs, tag):
        """Start sending bufs[0] to next and receiving the same shape from prev."""
        (buf,), stream = bufs, self.stream
        if buf.device != self.device:
            raise ValueError(f"ring on {self.device} was given a buffer on {buf.device}")
        recv = torch.empty_like(buf)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # buf is fully written before it leaves
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, buf, self.next, self.group, tag),
                                           dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)])
        if stream is not None:  # the caching allocator must not reuse them while the side stream runs
            buf.record_stream(stream)
            recv.record_stream(stream)

        def wait():
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for req in reqs:
                    req.wait()
            if stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)  # an event: compute waits for recv
            return [recv]
        return wait


class _MemoryRing:
    """W emulated ranks in one process: the hop is a hand-over of references. Every rank's buffer is
    complete when post() is called (the step loop posts before it computes), and a sender never
    writes to a buffer it has posted, so handing over the tensor itself is exact."""

    def post(self, bufs, tag):
        return lambda: bufs[-1:] + bufs[:-1]  # rank r receives rank r-1's buffer

# -----------------------------------------------------------------------------
# forward and backward. The step structure, identical in both directions and for every rank:
#     1. post the next K/V hop (and, in backward, the dK/dV hop) so it travels while we compute,
#     2. compute this step's slice of the local sequences (DACP: local work hides the hop),
#     3. compute the ring block for the K/V held now and merge it,
#     4. wait for the hop.
# The loops run over the ranks this process holds: one rank with real P2P, or W emulated ranks with
# the hop handed over in memory (emulated_attention), so the emulation runs the very same blocks.


class _PlannedAttention(torch.autograd.Function):
    """Attention of one micro-batch run from each rank's AttnPlan: ring blocks for the distributed rows
    (the plain ring when there are no local ones), local slices while the hops travel (DACP), or one
    local call when nothing is distributed. `plans` holds one rank's plan, or W emulated ranks'."""

    @staticmethod
    def forward(ctx, ring, plans, *qkv):
        n, p0 = len(plans), plans[0]
        qs, ks, vs = qkv[:n], qkv[n:2 * n], qkv[2 * n:]
        scale, acc, nd = qs[0].shape[-1] ** -0.5, torch.promote_types(qs[0].dtype, torch.float32), p0.n_dist
        outs = [torch.empty_like(q) for q in qs]
        lses = [q.new_empty((q.shape[1], q.shape[0]), dtype=acc) for q in qs]
        o_accs = [q.new_zeros((nd,) + q.shape[1:], dtype=acc) for q in qs]
        l_accs = [q.new_full((q.shape[1], nd), -math.inf, dtype=acc) for q in qs]
        kvs = [torch.stack([k[:nd], v[:nd]]) for k, v in zip(ks, vs)]  # one contiguous buffer per hop
        for step in range(p0.steps):
            wait = ring.post(kvs, tag=0) if step + 1 < p0.steps else None  # 1. next hop before compute
            for p, q, k, v, out, lse, o_acc, l_acc, kv in zip(plans, qs, ks, vs, outs, lses, o_accs, l_accs, kvs):
                if p.local[step]:  # 2.
                    a, b, cu = p.local[step]
                    out[a:b], lse[:, a:b] = _attn_fwd(q[a:b], k[a:b], v[a:b], cu, cu, True, scale)
                if nd:  # 3.
                    qi, ki, cu_q, cu_k, causal = p.block((p.rank - step) % p.world)
                    bo, bl = _attn_fwd(_rows(q[:nd], qi), _rows(kv[0], ki), _rows(kv[1], ki), cu_q, cu_k, causal, scale)
                    _merge(o_acc, l_acc, bo, bl, qi)
            if wait:  # 4.
                kvs = wait()
        for out, lse, o_acc, l_acc in zip(outs, lses, o_accs, l_accs):
            out[:nd], lse[:, :nd] = o_acc, l_acc
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses)
        ctx.plans, ctx.ring, ctx.scale = plans, ring, scale
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        plans, ring, scale = ctx.plans, ctx.ring, ctx.scale
        n, p0 = len(plans), plans[0]
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (saved[i * n:(i + 1) * n] for i in range(5))
        acc, nd = torch.promote_types(qs[0].dtype, torch.float32), p0.n_dist
        douts = [d.contiguous() for d in douts]
        dqs, dks, dvs = ([torch.empty_like(x) for x in xs] for xs in (qs, ks, vs))
        dq_accs = [q.new_zeros((nd,) + q.shape[1:], dtype=acc) for q in qs]
        kvs = [torch.stack([k[:nd], v[:nd]]) for k, v in zip(ks, vs)]  # restart from each rank's own K, V
        dkv_wait = None
        for step in range(p0.steps):
            wait = ring.post(kvs, tag=0) if step + 1 < p0.steps else None  # 1.
            if nd:  # 3. before 2. here: the dK/dV hop it produces can then travel during the local slice
                # dK/dV of the K, V held now travel with them: by the end they are back at their owner
                dkvs = dkv_wait() if dkv_wait else [kv.new_zeros(kv.shape, dtype=acc) for kv in kvs]
                for p, q, dout, out, lse, kv, dq_acc, dkv in zip(plans, qs, douts, outs, lses, kvs, dq_accs, dkvs):
                    qi, ki, cu_q, cu_k, causal = p.block((p.rank - step) % p.world)
                    gq, gk, gv = _attn_bwd(_rows(dout[:nd], qi), _rows(q[:nd], qi), _rows(kv[0], ki), _rows(kv[1], ki),
                                           _rows(out[:nd], qi), _rows(lse[:, :nd].T, qi).T, cu_q, cu_k, causal, scale)
                    _add_rows(dq_acc, qi, gq)
                    _add_rows(dkv[0], ki, gk)
                    _add_rows(dkv[1], ki, gv)
                dkv_wait = ring.post(dkvs, tag=1) if ring else (lambda dkvs=dkvs: dkvs)
            for p, q, k, v, dout, out, lse, dq, dk, dv in zip(plans, qs, ks, vs, douts, outs, lses, dqs, dks, dvs):
                if p.local[step]:  # 2. overlaps the K/V hop and the dK/dV hop in flight (also the last one)
                    a, b, cu = p.local[step]
                    dq[a:b], dk[a:b], dv[a:b] = _attn_bwd(dout[a:b], q[a:b], k[a:b], v[a:b], out[a:b], lse[:, a:b],
                                                          cu, cu, True, scale)
            if wait:  # 4.
                kvs = wait()
        if nd:
            for dq, dk, dv, dq_acc, dkv in zip(dqs, dks, dvs, dq_accs, dkv_wait()):
                dq[:nd], dk[:nd], dv[:nd] = dq_acc, dkv[0], dkv[1]
        return (None, None, *dqs, *dks, *dvs)


def attention(q, k, v, plan):
    """Causal attention of one micro-batch on this rank with a prebuilt AttnPlan: rows [0, n_dist)
    are this rank's zigzag shards of the distributed sequences (ring), the rest its local sequences.
    q (T, H, D), k/v (T, H_kv, D) -> out (T, H, D), differentiable in q, k, v."""
    plan.check(q, k)
    ring = _Ring(plan.group, q.device) if plan.world > 1 and plan.n_dist else None
    return _PlannedAttention.apply(ring, [plan], q, k, v)[0]


def ring_attention(q, k, v, cu_seqlens, group=None):
    """Causal zigzag ring attention. q (T_local, H, D), k/v (T_local, H_kv, D): this rank's
    zigzag_shard of packed sequences with GLOBAL int32 offsets cu_seqlens. -> out (T_local, H, D).
    Builds its AttnPlan on every call; for many layers, build one and call attention()."""
    return attention(q, k, v, AttnPlan(cu_seqlens, None, q.device, group))


def dacp_attention(q, k, v, cu_seqlens_dist, cu_seqlens_local, group=None):
    """Skrull DACP attention for one micro-batch. Rows [0, cu_seqlens_dist[-1] // W) are this rank's
    zigzag shards of the distributed sequences (GLOBAL offsets, same on every CP rank); the rest are
    this rank's whole local sequences (offsets from 0). Local attention runs while the ring's P2P is
    in flight. Either part may be empty; with no distributed sequence there is no communication.
    Builds its AttnPlan on every call; for many layers, build one and call attention()."""
    return attention(q, k, v, AttnPlan(cu_seqlens_dist, cu_seqlens_local, q.device, group))


def emulated_attention(qs, ks, vs, cu_seqlens_dist, cu_seqlens_locals=None):
    """dacp_attention for W = len(qs) emulated CP ranks in ONE process: qs[r], ks[r], vs[r] are what
    rank r would pass (its zigzag shards, then its local sequences with offsets cu_seqlens_locals[r]).
    The same per-block kernels and step loop run; each hop is handed over in memory instead of P2P.
    Returns the W outputs, differentiable. For testing kernels on one device, e.g. one GPU."""
    W = len(qs)
    locals_ = cu_seqlens_locals if cu_seqlens_locals is not None else [None] * W
    plans = [AttnPlan(cu_seqlens_dist, locals_[r], qs[r].device, world=W, rank=r) for r in range(W)]
    for p, q, k in zip(plans, qs, ks):
        p.check(q, k)
    return list(_PlannedAttention.apply(_MemoryRing() if W > 1 else None, plans, *qs, *ks, *vs))
