"""
Skrull's data scheduler (Xu et al., arXiv 2505.19609): which rank computes which sequence.

Pieces, top to bottom:
  1. MicroBatch, padded_len        the plan's vocabulary (what schedule() returns)
  2. CostModel                     FLOPs; a rank's time in a micro-batch following dacp_attention step by
                                   step (rank_time), written once and used by everything below
  3. dacp                          Algorithm 1: local vs distributed per micro-batch, with roll-back
     refine, balance_dp            ours, not in the paper: cost-aware local searches inside a micro-batch
                                   and across DP ranks
  4. gds, schedule                 Algorithm 2 (global batch -> DP ranks -> micro-batches), the baselines,
     skrull_plus                   and ours
The simulator of the paper's setups and the exact MILP optimum live in simulate.py.

Pure Python + numpy: no torch, no torch.distributed. Every rank calls schedule() with the same
lengths and gets the same plan (all ties broken by index, randomness only from `seed`).
"""
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

# -----------------------------------------------------------------------------
# 1. the plan


@dataclass
class MicroBatch:
    distributed: list = field(default_factory=list)  # indices into lengths, zigzag-sharded over the CP group
    local: list = field(default_factory=list)        # cp lists: indices kept whole on CP rank j
    rollbacks: int = 0                               # DACP roll-backs it took to place (for logging)

    def rank_tokens(self, lengths):
        """Tokens each CP rank holds: padded share of the distributed sequences + its local ones."""
        cp = len(self.local)
        d = sum(padded_len(lengths[k], cp) for k in self.distributed) // cp
        return [d + sum(lengths[k] for k in loc) for loc in self.local]


def padded_len(s, cp):
    """Distributed length: s padded up to a multiple of 2*cp (zigzag cuts a sequence into 2*cp chunks)."""
    m = 2 * cp
    return -(-int(s) // m) * m

# -----------------------------------------------------------------------------
# 2. cost model
#
# FLOPs of one sequence of length s, forward, one layer (2 FLOPs per multiply-add; h = n_embd,
# h_kv = n_kv_head * head_dim, I = intermediate_size, V = vocab_size):
#   q and o projections            2 * 2*s*h*h        = 4 s h^2
#   k and v projections (GQA)      2 * 2*s*h*h_kv     = 4 s h h_kv
#   SwiGLU MLP: gate, up, down     3 * 2*s*h*I        = 6 s h I
#   attention QK^T and PV          2 * 2*h*s^2 / 2    = 2 h s^2   (causal: half of the s x s pairs)
# plus the lm_head once per token, 2 s h V. Norms, RoPE, softmax and the loss are O(s h), ignored.
# Backward is twice the forward (grads w.r.t. inputs and weights), so forward+backward = 3x:
#   F_lin(s)  = 3 s (n_layer (4 h^2 + 4 h h_kv + 6 h I) + 2 h V)
#   F_attn(s) = 3 n_layer 2 h s^2        (1/3 of it in the forward, 2/3 in the backward)
# For Qwen2.5-0.5B the quadratic term overtakes the per-layer linear one at s = 2h + 2h_kv + 3I = 16.6K
# tokens (23K counting the lm_head). The ~4.6K often quoted for this model counts a narrower MLP (4h)
# and no causal halving. Measured time is what matters: a, a_attn, a_ring are fitted.

SHAPES = {  # the paper's two models (Hugging Face config.json shapes), so this file needs no torch import
    "qwen2.5-0.5b": dict(n_layer=24, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864,
                         vocab_size=151936, tie_embeddings=True),
    "qwen2.5-7b": dict(n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, intermediate_size=18944,
                       vocab_size=152064, tie_embeddings=False),
}
PAPER_BUCKET = {"qwen2.5-0.5b": 26_000, "qwen2.5-7b": 13_000}  # paper: C = 26K / 13K on H100 80GB

# H100 defaults. ASSUMPTIONS, not measurements (no H100 was available to profile): replace them with
# `python bench.py profile` on the target machine. Provenance of each number:
H100 = dict(
    peak_flops=989e12,      # H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet)
    mfu=0.5,                # assumed fraction of peak reached by GEMMs and flash-attn at these sizes
    b_call=15e-6,           # assumed fixed cost of one attention call, one layer, forward or backward
                            # (launch + varlen bookkeeping; the backward's two kernels counted once)
    b_seq=0.0,              # per sequence inside a call: the varlen flash kernels take all sequences at once
    c_mb=2e-3,              # assumed fixed cost of one micro-batch (launch-bound ops), s
    t_optim=5e-3,           # assumed optimizer step (ZeRO-2 sharded AdamW), s
    p2p_latency=20e-6,      # assumed NCCL P2P latency intra-node, s
    p2p_bandwidth=150e9,    # assumed achieved NVLink-4 P2P bandwidth (450 GB/s nominal per direction), B/s
    comm_overlap=1.0,       # assumed: the P2P side stream runs fully beside the compute stream
    comm_bytes=2,           # bf16 K/V on the wire; the dK/dV accumulators travel in fp32
    grad_bytes=2,           # bf16 gradient all-reduce
    device_memory=80e9,
)
CONSTANTS = ("a", "a_attn", "a_ring", "b_call", "b_seq", "c_mb", "p2p_latency", "p2p_bandwidth", "comm_overlap",
             "t_optim", "comm_bytes", "grad_bytes", "mem_per_token", "mem_static", "device_memory", "bucket_size")


def _shape(config):
    """A ModelConfig, a dict of its fields, or a SHAPES key -> namespace with the fields used here."""
    if config is None:
        config = "qwen2.5-0.5b"
    if isinstance(config, str):
        config = SHAPES[config]
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    return config


def _preset_name(c):
    for name, s in SHAPES.items():
        if all(getattr(c, k) == s[k] for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size")):
            return name
    return None


def local_slots(local_lengths, cp):
    """How dacp_attention spreads a rank's local sequences over the cp ring steps (context_parallel.AttnPlan,
    mirrored): in order, by cumulative attention cost sum(L^2), a sequence never split.
    -> {step: lengths} for the steps that get any."""
    slots = {}
    for i, s in zip(_slot_steps(local_lengths, cp), local_lengths):
        slots.setdefault(i, []).append(s)
    return slots


def _slot_steps(local_lengths, cp):
    """The ring step of each local sequence (local_slots): non-decreasing."""
    total = sum(s * s for s in local_lengths)
    steps, done = [], 0
    for s in local_lengths:
        steps.append(min(cp - 1, done * cp // total))
        done += s * s
    return steps


class CostModel:
    """Time and memory of a micro-batch on one CP rank, following context_parallel.dacp_attention step by
    step (the paper's cost model, re-derived for this code). Every constant is per layer and
    per pass unless said; `bench.py profile` fits them all on its own runs.

    A rank's time in a micro-batch (rank_time):
        c_mb + a F_lin(tokens)                      linear layers + lm_head: no hop is in flight, nothing
                                                    overlaps them (tokens = padded share of the
                                                    distributed sequences + the rank's local ones)
      no distributed sequence: one varlen attention call per layer and pass, no communication:
        + n_layer * 2 (b_call + b_seq n) + a_attn F_attn(local)
      distributed sequences D over a ring of N ranks, per layer, forward then backward, N steps each:
        step i computes the i-th slice of the local sequences (local_slots, one call) and the ring block
        (one call for all of D: b_call + b_seq |D| + a_ring F_attn(D) / N^2, each rank holding 1/N of
        every sequence and meeting 1/N of the others' K,V per step) while hops are in flight:
          forward  step i < N-1: the next K,V hop (bf16/fp32 K and V of the rank's shares)
          backward step i < N-1: the next K,V hop, and every step: the fp32 dK,dV hop it posts
        step time = compute + comm - comm_overlap * min(compute, comm)
        a hop = p2p_latency + bytes / p2p_bandwidth
      comm_overlap = 1 is the paper's max(T_comm, T_compute); 0 is compute + comm (nothing hidden).
    CP ranks of a ring wait for each other every step, so a micro-batch with distributed sequences ends
    when its slowest rank does; without them ranks run independently. A DP rank's micro-batches run back
    to back; the step ends with the gradient all-reduce and the optimizer (t_step).
    """

    def __init__(self, config=None, profile=None, memory=None):
        c = self.config = _shape(config)
        h, L, I, V = c.n_embd, c.n_layer, c.intermediate_size, c.vocab_size
        h_kv = c.n_kv_head * (c.n_embd // c.n_head)
        self.n_layer, self.h_kv = L, h_kv
        self.lin_flops = 3 * (L * (4 * h * h + 4 * h * h_kv + 6 * h * I) + 2 * h * V)  # per token
        self.attn_flops = 3 * L * 2 * h                                                # per token^2
        self.n_params = L * (2 * h * h + 2 * h * h_kv + 3 * h * I + h + 2 * h_kv + 2 * h) + h + \
            V * h * (1 if getattr(c, "tie_embeddings", True) else 2)
        p = dict(H100)
        self.a = 1.0 / (p["peak_flops"] * p["mfu"])  # s per FLOP, linear layers
        self.a_attn = self.a                         # s per FLOP, local attention
        self.a_ring = self.a                         # s per FLOP, the ring's blocks (rectangular, merged)
        for k in ("b_call", "b_seq", "c_mb", "t_optim", "p2p_latency", "p2p_bandwidth", "comm_overlap",
                  "comm_bytes", "grad_bytes", "device_memory"):
            setattr(self, k, p[k])
        # memory terms come from memory.MemoryModel (measured on the model; train.py passes it), never
        # from an estimate here: M = mem_per_token S + mem_beta on top of mem_static, and the bucket
        self.mem_per_token = self.mem_beta = self.mem_static = None
        self.bucket_size = PAPER_BUCKET.get(_preset_name(c))  # the paper's C, until a memory model says
        self.source = "H100 defaults (assumptions, see scheduler.H100)"
        if profile is not None:
            if isinstance(profile, str):
                with open(profile) as f:
                    profile = json.load(f)
            unknown = [k for k in ("b", "b_ring") if profile.get(k) is not None]
            if unknown:
                raise ValueError(f"profile has {', '.join(unknown)} from an older cost model: rerun `python bench.py profile`")
            for k in CONSTANTS:
                if profile.get(k) is not None:
                    setattr(self, k, profile[k])
            if profile.get("a_attn") is None:
                self.a_attn = self.a
            if profile.get("a_ring") is None:
                self.a_ring = self.a_attn
            self.source = f"profile ({profile.get('device', '?')})"
        self.step_bytes = 2 * self.grad_bytes
        if memory is not None:
            self.mem_per_token, self.mem_beta = memory.alpha, memory.beta
            self.mem_static, self.device_memory = memory.static["peak"], memory.device_memory
            self.bucket_size = memory.bucket_size
            if memory.fsdp:
                self.step_bytes = memory.param_bytes + 4

    @classmethod
    def from_profile(cls, config, profile, memory=None):
        """config: ModelConfig (or None: the shape stored in the profile); profile: JSON path or dict;
        memory: a memory.MemoryModel whose terms replace the profile's."""
        if isinstance(profile, str):
            with open(profile) as f:
                profile = json.load(f)
        return cls(config if config is not None else profile["model"], profile, memory)

    def flops(self, s):
        return self.lin_flops * s + self.attn_flops * s * s

    # --- the one formula: a rank's time in a micro-batch ---
    def ring(self, dist_lengths, cp):
        """What a rank needs to know about the distributed sequences of a micro-batch, seconds per layer:
        n (sequences), share (this rank's padded tokens), block (one ring block call, one pass: fixed
        cost), attn (its attention, forward + backward), hop (one K,V hop), hop32 (one fp32 dK,dV hop),
        and empty (the forward and backward of a ring step with no local slice: (non-last, last))."""
        sp = [padded_len(s, cp) for s in dist_lengths]
        share = sum(sp) // cp
        kv_bytes = share * 2 * self.h_kv
        r = SimpleNamespace(n=len(sp), share=share, cp=cp, block=self.b_call + self.b_seq * len(sp),
                            attn=self.a_ring * self.attn_flops / self.n_layer * sum(s * s for s in sp) / (cp * cp),
                            hop=self.p2p_latency + kv_bytes * self.comm_bytes / self.p2p_bandwidth,
                            hop32=self.p2p_latency + kv_bytes * 4 / self.p2p_bandwidth)
        r.empty = (self._step(r, 0.0, 0.0, last=False), self._step(r, 0.0, 0.0, last=True))
        return r

    def _step(self, ring, call, attn, last):
        """One ring step, forward + backward, one layer: this step's local slice (fixed cost `call` per
        pass, attention `attn` fwd+bwd) and the ring block run while the hops are in flight."""
        o = self.comm_overlap
        fwd = call + ring.block + (attn + ring.attn) / 3
        bwd = call + ring.block + 2 * (attn + ring.attn) / 3
        comm_f = 0.0 if last else ring.hop                     # forward: the next K,V hop
        comm_b = ring.hop32 + (0.0 if last else ring.hop)      # backward: next K,V hop + this dK,dV hop
        return fwd + comm_f - o * min(fwd, comm_f) + bwd + comm_b - o * min(bwd, comm_b)

    def rank_time(self, tokens, local_lengths, ring=None):
        """Seconds of one CP rank in a micro-batch: `tokens` it holds, its whole `local_lengths` (in the
        order dacp_attention gets them), and the ring (CostModel.ring) of the distributed sequences or
        None. The class docstring, line by line."""
        if not tokens:
            return 0.0
        t = self.c_mb + self.a * self.lin_flops * tokens
        a_attn = self.a_attn * self.attn_flops / self.n_layer  # per token^2, one layer, fwd+bwd
        if ring is None or ring.n == 0:
            n = len(local_lengths)
            return t + self.n_layer * (2 * (self.b_call + self.b_seq * n) * (n > 0) + a_attn * sum(s * s for s in local_lengths))
        N = ring.cp
        per_layer = (N - 1) * ring.empty[0] + ring.empty[1]  # every step without a local slice ...
        slot = n = sq = 0
        for i, s in zip(_slot_steps(local_lengths, N), local_lengths):  # ... then each step with one
            if i != slot and n:  # steps come in order: step `slot` is complete
                per_layer += self._step(ring, self.b_call + self.b_seq * n, a_attn * sq, False) - ring.empty[0]
                n = sq = 0
            slot, n, sq = i, n + 1, sq + s * s
        if n:
            last = slot == N - 1
            per_layer += self._step(ring, self.b_call + self.b_seq * n, a_attn * sq, last) - ring.empty[last]
        return t + self.n_layer * per_layer

    def rank_time_bound(self, tokens, n_local, sq_local, ring=None):
        """A lower bound on rank_time from sums alone (tokens, how many local sequences, their sum of
        L^2), for pruning searches: rank_time with the local slices' placement over the ring steps
        forgotten. Each step takes max(x + (1-o) c, c + (1-o) x) for compute x and communication c, and a
        sum of maxima is at least the max of the sums; the local work needs at least one call per pass.
        Without a ring it is rank_time exactly."""
        if not tokens:
            return 0.0
        t = self.c_mb + self.a * self.lin_flops * tokens
        a_attn = self.a_attn * self.attn_flops / self.n_layer
        call = (self.b_call + self.b_seq * n_local) * (n_local > 0)
        if ring is None or ring.n == 0:
            return t + self.n_layer * (2 * call + a_attn * sq_local)
        N, o = ring.cp, self.comm_overlap
        x = 2 * call + 2 * N * ring.block + a_attn * sq_local + N * ring.attn  # compute, fwd + bwd, every step
        c = 2 * (N - 1) * ring.hop + N * ring.hop32                           # communication
        return t + self.n_layer * max(x + (1 - o) * c, c + (1 - o) * x)

    def rank_times(self, mb, lengths):
        """Estimated seconds of micro-batch mb on each CP rank (0 for a rank with nothing to do)."""
        cp = len(mb.local)
        ring = self.ring([lengths[k] for k in mb.distributed], cp) if mb.distributed else None
        share = ring.share if ring else 0
        if not any(mb.local):  # every rank holds the same shares
            return [self.rank_time(share, [], ring)] * cp
        return [self.rank_time(share + sum(lengths[k] for k in loc), [lengths[k] for k in loc], ring)
                for loc in mb.local]

    # --- per sequence estimates (GDS's DP balance, the bound): communication hidden, calls shared ---
    def t_local(self, s):
        """One sequence kept whole on a rank: its compute plus its share of the per-call costs."""
        return self.a * self.lin_flops * s + self.a_attn * self.attn_flops * s * s + 2 * self.n_layer * self.b_seq

    def t_dist(self, s, cp):
        """One rank's part of a distributed sequence: 1/cp of its compute (the ring's cp steps each meet
        1/cp^2 of the sequence's query-key pairs), one sequence in every ring call."""
        sp = padded_len(s, cp)
        return (self.a * self.lin_flops * sp + self.a_ring * self.attn_flops * sp * sp) / cp + \
            2 * self.n_layer * cp * self.b_seq

    def t_step(self, world):
        """Per optimizer step: the gradient exchange over all ranks, then the optimizer. A ring all-reduce
        is a reduce-scatter plus an all-gather of the gradients; FSDP2 (train.py) all-gathers the
        parameters and reduce-scatters fp32 gradients instead: the same 2 (world - 1) hops, and per
        parameter `step_bytes` in all (2 grad_bytes, or FSDP2's gathered dtype + 4)."""
        if world <= 1:
            return self.t_optim
        nbytes = self.n_params * self.step_bytes
        return self.t_optim + (world - 1) * (2 * self.p2p_latency + nbytes / world / self.p2p_bandwidth)

    # --- plans ---
    def dp_rank_time(self, mbs, lengths, sync=False, times=None):
        """Seconds for one DP rank's micro-batches, run back to back. CP ranks synchronise inside a
        micro-batch with distributed sequences (the ring); sync=True makes every micro-batch a barrier
        (the MILP's objective, slightly pessimistic). times: the micro-batches' rank_times, if known."""
        clocks = None
        for k, mb in enumerate(mbs):
            times_k = times[k] if times is not None else self.rank_times(mb, lengths)
            clocks = clocks or [0.0] * len(times_k)
            if mb.distributed or sync:
                clocks = [max(clocks) + max(times_k)] * len(times_k)
            else:
                clocks = [c + t for c, t in zip(clocks, times_k)]
        return max(clocks) if clocks else 0.0

    def predict_step_time(self, plan, lengths, sync=False, include_step=True):
        """Estimated seconds of one optimizer step of `plan` (schedule()'s output): slowest DP rank
        (DP ranks only meet at the gradient all-reduce) plus the all-reduce and optimizer."""
        t = max(self.dp_rank_time(mbs, lengths, sync) for mbs in plan)
        if include_step:
            cp = next((len(mb.local) for mbs in plan for mb in mbs), 1)
            t += self.t_step(len(plan) * cp)
        return t

    def ideal_step_time(self, lengths, dp, cp, bucket_size, include_step=True):
        """Lower bound for any plan: the slowest rank is at least the average rank, whose busy time is at
        least the total work, each sequence in its cheapest form (local if it fits, or distributed), spread
        over dp*cp ranks, plus the fixed costs every working rank pays (perfect balance, no exposed
        communication, the fewest calls and micro-batches); and at least a micro-batch holding only the costliest
        sequence in its cheaper form (rank_time grows with everything added to a micro-batch: every
        ring step's time grows with its compute and its communication)."""
        work, longest = 0.0, 0.0
        for s in lengths:
            work += min(([self.t_local(s)] if s <= bucket_size else []) + ([cp * self.t_dist(s, cp)] if cp > 1 else []))
            alone = []  # rank_time of a micro-batch holding only s, local or distributed: whatever else
            if s <= bucket_size:  # shares its micro-batch only adds to it
                alone.append(self.rank_time(s, [s]))
            if cp > 1:
                ring = self.ring([s], cp)
                alone.append(self.rank_time(ring.share, [], ring))
            longest = max(longest, min(alone))
        # every rank that works pays at least one micro-batch (c_mb) and one attention call per layer and
        # pass, and the ranks pay one c_mb per C tokens between them
        mbs_per_rank = sum(lengths) / (dp * cp * bucket_size)
        fixed = max(1.0, mbs_per_rank) * self.c_mb + 2 * self.n_layer * self.b_call
        t = max(work / (dp * cp) + fixed, longest)
        return t + (self.t_step(dp * cp) if include_step else 0.0)


_DEFAULT_COST = None


def default_cost():
    global _DEFAULT_COST
    if _DEFAULT_COST is None:
        _DEFAULT_COST = CostModel()
    return _DEFAULT_COST
# -----------------------------------------------------------------------------
# 3. DACP: Algorithm 1 of the paper, one micro-batch


def dacp(idx, lengths, cp, bucket_size, cost=None, t=None):
    """Place the sequences `idx` (indices into lengths) of one micro-batch on a CP group of `cp` ranks.
    Returns (MicroBatch, n_rollbacks), or (None, n_rollbacks) when the heuristic fails.

    Sorted ascending, each sequence goes, in order of preference (paper Algorithm 1):
      whole on the least-loaded rank argmin(L) if it fits; else whole on the rank with the most room
      argmax(RB) if it fits; else distributed if its padded share fits on every rank; else roll back:
      demote the shortest local sequence on the tightest rank argmin(RB) to distributed and retry.
    Our fixes to the printed listing: a demotion frees S - S'/N on its own rank and charges S'/N on
    every other rank (the listing adds on one rank only, with the sign flipped), and the shares are
    padded (S' = padded_len(S)). A demotion may overcharge another rank; then we keep rolling back
    (on the now tightest rank) before placing anything. Fails when the tightest rank has nothing left
    to demote. Sequences shorter than their padded share (length 1) are never demoted: that would
    cost memory, not free it."""
    if cp == 1:  # no CP group: everything is local on the only rank
        ok = sum(lengths[k] for k in idx) <= bucket_size
        return (MicroBatch([], [sorted(idx)]) if ok else None), 0
    cost = cost or default_cost()
    tl = t if t is not None else {k: cost.t_local(lengths[k]) for k in idx}
    share = {k: padded_len(lengths[k], cp) // cp for k in idx}
    order = sorted(idx, key=lambda k: (lengths[k], k))
    rb = [bucket_size] * cp  # remaining bucket per rank
    load = [0.0] * cp        # estimated local compute per rank
    local = [[] for _ in range(cp)]
    dist = []
    rollbacks, i = 0, 0
    ranks = range(cp)
    while i < len(order):
        k = order[i]
        s = lengths[k]
        if min(rb) >= 0:
            j = min(ranks, key=load.__getitem__)
            if s > rb[j]:
                j = max(ranks, key=rb.__getitem__)
            if s <= rb[j]:
                local[j].append(k)
                rb[j] -= s
                load[j] += tl[k]
                i += 1
                continue
            if share[k] <= min(rb):
                dist.append(k)
                rb = [r - share[k] for r in rb]
                i += 1
                continue
        # roll back (Algorithm 1, lines "else ... rollback")
        j = min(ranks, key=rb.__getitem__)
        victims = [v for v in local[j] if lengths[v] > share[v]]
        if not victims:
            return None, rollbacks
        v = min(victims, key=lambda v: (lengths[v], v))
        local[j].remove(v)
        rb[j] += lengths[v]
        load[j] -= tl[v]
        rb = [r - share[v] for r in rb]
        dist.append(v)
        rollbacks += 1
    return MicroBatch(sorted(dist), [sorted(loc) for loc in local], rollbacks), rollbacks


def refine(mb, lengths, bucket_size, cost=None):
    """Ours, not in the paper (skrull_plus): cost-aware local search after Algorithm 1. Algorithm 1 keeps
    a sequence whole whenever it fits, so a 20K-token sequence under a 26K bucket stays on one rank and
    that rank's quadratic attention sets the micro-batch's time. Repeatedly apply the best of these
    moves while it lowers the micro-batch's slowest rank j (CostModel.rank_time), within the bucket:
      move     one of j's local sequences (its 4 longest and 2 shortest) to the least busy rank that
               can hold it (only two ranks change);
      dist     distribute one of j's 2 longest;
      local    make one of the 2 shortest distributed sequences local on the least busy rank that can
               hold it (these two change the ring, so every rank changes).
    Each rank lists its local sequences longest first, so dacp_attention's per-step slices
    (local_slots) are spread over the ring steps instead of piling the long ones into one step.
    Kept to a millisecond or so per micro-batch without changing the result: every candidate is first
    bounded from per-rank sums (CostModel.rank_time_bound, O(1)) and computed only if the bound can
    beat the best so far, moves in order of their bound (branch and bound); a rank's time is
    remembered per (its sequences, the ring), since rounds revisit the same ranks; and a candidate is
    dropped as soon as one rank reaches the best time found so far."""
    cp = len(mb.local)
    if cp == 1:
        return mb
    cost = cost or default_cost()
    key = lambda k: (-lengths[k], k)  # noqa: E731  longest first
    local = [sorted(loc, key=key) for loc in mb.local]
    dist = tuple(sorted(mb.distributed))
    ltok = [sum(lengths[k] for k in loc) for loc in local]        # per rank: local tokens, sum of L^2
    lsq = [sum(lengths[k] ** 2 for k in loc) for loc in local]
    rings, memo = {}, {}

    def ring_of(dist):  # (CostModel.ring, this rank's share of it, a number naming it), once per set
        if dist not in rings:
            ring = cost.ring([lengths[k] for k in dist], cp) if dist else None
            rings[dist] = (ring, ring.share if ring else 0, len(rings))
        return rings[dist]

    def rt(loc, R):  # CostModel.rank_time of one rank, remembered
        k = (R[2], tuple(loc))
        if k not in memo:
            memo[k] = cost.rank_time(R[1] + sum(lengths[x] for x in loc), [lengths[x] for x in loc], R[0])
        return memo[k]

    def bound(tok, n, sq, R):
        return cost.rank_time_bound(R[1] + tok, n, sq, R[0])

    R = ring_of(dist)
    times = [rt(loc, R) for loc in local]
    for _ in range(2 * cp):
        order = sorted(range(cp), key=lambda i: (times[i], i))
        j = order[-1]
        move, move_t, move_n = None, times[j] * (1 - 1e-9), -1
        cands = []  # moves, bounded: (bound, n, v, i, the slowest unchanged rank)
        for n, v in enumerate(dict.fromkeys(local[j][:4] + local[j][-2:])):
            s = lengths[v]
            i = next((i for i in order[:-1] if R[1] + ltok[i] + s <= bucket_size), None)
            if i is None:
                continue
            others = next((times[x] for x in reversed(order) if x not in (i, j)), 0.0)
            lb = max(others, bound(ltok[j] - s, len(local[j]) - 1, lsq[j] - s * s, R),
                     bound(ltok[i] + s, len(local[i]) + 1, lsq[i] + s * s, R))
            cands.append((lb, n, v, i, others))
        for lb, n, v, i, others in sorted(cands):  # the same choice as computing all in order n
            if lb > move_t:
                break
            m = max(others, rt([x for x in local[j] if x != v], R), rt(sorted(local[i] + [v], key=key), R))
            if (m, n) < (move_t, move_n):
                move, move_t, move_n = ("move", v, i), m, n
        shortest = sorted(dist, key=lambda k: (lengths[k], k))[:2]
        for kind, v in [("dist", v) for v in local[j][:2]] + [("local", v) for v in shortest]:
            s = lengths[v]
            new_dist = tuple(sorted(dist + (v,))) if kind == "dist" else tuple(x for x in dist if x != v)
            Rn = ring_of(new_dist)  # every rank's share of the ring changes by Rn[1] - R[1]
            tok, n, sq = list(ltok), [len(loc) for loc in local], list(lsq)
            if kind == "dist":
                r = j
                tok[j], n[j], sq[j] = tok[j] - s, n[j] - 1, sq[j] - s * s
                if Rn[1] + max(tok) > bucket_size:
                    continue
                # the other ranks keep their sequences under a larger ring: each is at least as slow as
                # now, plus the linear layers' time on the added share (every ring step's time grows)
                if cp > 1 and times[order[-2]] + cost.a * cost.lin_flops * (Rn[1] - R[1]) >= move_t:
                    continue
            else:
                r = next((i for i in order if Rn[1] + ltok[i] + s <= bucket_size), None)
                if r is None:
                    continue
                tok[r], n[r], sq[r] = tok[r] + s, n[r] + 1, sq[r] + s * s
            if any(bound(tok[i], n[i], sq[i], Rn) >= move_t for i in reversed(order)):
                continue
            new_local = [sorted(loc + [v], key=key) if kind == "local" and i == r else
                         [x for x in loc if x != v] for i, loc in enumerate(local)]
            m = 0.0
            for i in reversed(order):  # the slowest rank so far first; give up once it cannot win
                m = max(m, rt(new_local[i], Rn))
                if m >= move_t:
                    break
            if m < move_t:
                move, move_t = (kind, new_dist, new_local), m
        if move is None:
            break
        if move[0] == "move":
            _, v, i = move
            local[j] = [x for x in local[j] if x != v]
            local[i] = sorted(local[i] + [v], key=key)
            changed = (i, j)
        else:
            _, dist, local = move
            R, changed = ring_of(dist), range(cp)
        for i in changed:
            ltok[i], lsq[i] = sum(lengths[k] for k in local[i]), sum(lengths[k] ** 2 for k in local[i])
            times[i] = rt(local[i], R)
    return MicroBatch(list(dist), local, mb.rollbacks)

def balance_dp(plan, lengths, bucket_size, cost, rounds=16):
    """Ours, not in the paper (skrull_plus): Algorithm 2 balances DP ranks by per-sequence estimates,
    but a DP rank's real time also holds what those leave out (its micro-batches' fixed costs, a
    ring's calls and hops, how evenly its CP ranks came out), and the step waits for the slowest DP
    rank (they meet at the gradient all-reduce). Repeatedly move one local sequence from the slowest
    CP rank of a micro-batch of the slowest DP rank a to the least busy CP rank that can hold it in a
    micro-batch of the fastest DP rank b: the move that lowers max(T_a, T_b) most, while it lowers it
    below T_a. Only two CP ranks change per candidate; nothing else moves, so no DP rank gets slower
    than the slowest was."""
    dp = len(plan)
    if dp == 1:
        return plan
    cp = next((len(mb.local) for mbs in plan for mb in mbs), 1)
    key = lambda k: (-lengths[k], k)  # noqa: E731  a rank that gets a sequence lists them longest first
    plan = [[MicroBatch(list(mb.distributed), [list(loc) for loc in mb.local], mb.rollbacks) for mb in mbs] for mbs in plan]
    rings = [[cost.ring([lengths[k] for k in mb.distributed], cp) if mb.distributed else None for mb in mbs] for mbs in plan]
    times = [[cost.rank_times(mb, lengths) for mb in mbs] for mbs in plan]
    T = [cost.dp_rank_time(mbs, lengths, times=times[r]) for r, mbs in enumerate(plan)]

    def rank_time(r, m, loc):
        ring = rings[r][m]
        return cost.rank_time((ring.share if ring else 0) + sum(lengths[k] for k in loc), [lengths[k] for k in loc], ring)

    def sums(r, m, loc):  # the rank's tokens (its share of the ring included), sequences, sum of L^2
        ring = rings[r][m]
        return (ring.share if ring else 0) + sum(lengths[k] for k in loc), len(loc), sum(lengths[k] ** 2 for k in loc)

    def bound(r, m, tok, n, sq):
        return cost.rank_time_bound(tok, n, sq, rings[r][m])

    def with_time(r, m, j, t):  # DP rank r's time with rank j of micro-batch m taking t seconds
        ts = [list(x) for x in times[r]]
        ts[m][j] = t
        return cost.dp_rank_time(plan[r], lengths, times=ts)

    for _ in range(rounds):
        a = max(range(dp), key=lambda r: (T[r], -r))
        b = min(range(dp), key=lambda r: (T[r], r))
        move, move_t = None, T[a] * (1 - 1e-9)
        tok_b = [[sums(b, m, loc)[0] for loc in mb.local] for m, mb in enumerate(plan[b])]
        by_time = [sorted(range(cp), key=lambda j: (times[b][m][j], j)) for m in range(len(plan[b]))]
        # each candidate is bounded before it is computed (the DP time only grows with a rank's time;
        # CostModel.rank_time_bound from sums), so most cost a few additions
        for ma, mb_a in enumerate(plan[a]):
            ja = max(range(cp), key=lambda j: (times[a][ma][j], -j))
            if with_time(a, ma, ja, 0.0) >= move_t:  # another rank or micro-batch keeps a this slow
                continue
            tok_a, n_a, sq_a = sums(a, ma, mb_a.local[ja])
            for v in mb_a.local[ja]:
                s = lengths[v]
                if with_time(a, ma, ja, bound(a, ma, tok_a - s, n_a - 1, sq_a - s * s)) >= move_t:
                    continue
                rest = [x for x in mb_a.local[ja] if x != v]
                Ta = with_time(a, ma, ja, rank_time(a, ma, rest))
                if Ta >= move_t:
                    continue
                for mbi in range(len(plan[b])):  # the least busy CP rank that can hold v
                    jb = next((j for j in by_time[mbi] if tok_b[mbi][j] + s <= bucket_size), None)
                    if jb is None:
                        continue
                    tok, n, sq = sums(b, mbi, plan[b][mbi].local[jb])
                    if with_time(b, mbi, jb, bound(b, mbi, tok + s, n + 1, sq + s * s)) >= move_t:
                        continue
                    new = sorted(plan[b][mbi].local[jb] + [v], key=key)
                    m = max(Ta, with_time(b, mbi, jb, rank_time(b, mbi, new)))
                    if m < move_t:
                        move, move_t = (v, ma, ja, rest, mbi, jb, new), m
        if move is None:
            break
        v, ma, ja, rest, mbi, jb, new = move
        plan[a][ma].local[ja], plan[b][mbi].local[jb] = rest, new
        times[a][ma][ja], times[b][mbi][jb] = rank_time(a, ma, rest), rank_time(b, mbi, new)
        T[a], T[b] = cost.dp_rank_time(plan[a], lengths, times=times[a]), cost.dp_rank_time(plan[b], lengths, times=times[b])
    return [[mb for mb in mbs if mb.distributed or any(mb.local)] for mbs in plan]

# -----------------------------------------------------------------------------
# 4. GDS (Algorithm 2), the baselines, and schedule()


POLICIES = ("naive", "sorted", "dacp", "skrull", "skrull_plus")  # train.py validates `schedule` against it


def _validate(lengths, dp, cp, bucket_size, policy):
    for name, v in (("dp", dp), ("cp", cp)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(bucket_size, (int, np.integer)) or isinstance(bucket_size, bool) or bucket_size <= 0:
        raise ValueError(f"bucket_size must be a positive integer (tokens per rank), got {bucket_size!r}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    lengths = [int(s) for s in lengths]
    if not lengths:
        raise ValueError("empty batch: no sequences to schedule")
    for k, s in enumerate(lengths):
        if s < 1:
            raise ValueError(f"sequence {k} has length {s}; lengths must be >= 1")
        if cp == 1 and s > bucket_size:
            raise ValueError(f"sequence {k} of length {s} is longer than cp*bucket_size = {bucket_size} "
                             f"(cp=1): it cannot fit on any rank")
        if cp > 1 and padded_len(s, cp) // cp > bucket_size:
            raise ValueError(f"sequence {k} of length {s} cannot fit even when distributed: padded to "
                             f"{padded_len(s, cp)} it puts {padded_len(s, cp) // cp} tokens on each of the "
                             f"cp={cp} ranks, over bucket_size={bucket_size} (cp*bucket_size = {cp * bucket_size})")
    return lengths


def _split(items, dp):
    """Contiguous, near-equal chunks, one per DP rank (like numpy.array_split)."""
    q, r = divmod(len(items), dp)
    out, start = [], 0
    for i in range(dp):
        end = start + q + (i < r)
        out.append(list(items[start:end]))
        start = end
    return out


def _pack_in_order(idx, lengths, cp, bucket_size):
    """Greedy packing in the given order: a new micro-batch when the next sequence would push a rank
    over the bucket with every sequence distributed (padded tokens <= cp*C); cp=1: tokens <= C."""
    groups, cur, used = [], [], 0
    for k in idx:
        need = padded_len(lengths[k], cp) if cp > 1 else lengths[k]
        if cur and used + need > cp * bucket_size:
            groups.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += need
    if cur:
        groups.append(cur)
    return groups


def _all_distributed(group, cp):
    if cp == 1:
        return MicroBatch([], [list(group)])
    return MicroBatch(list(group), [[] for _ in range(cp)])


def gds_microbatches(idx, lengths, cp, bucket_size, cost, t, m=None):
    """Algorithm 2, one DP rank: sort ascending, try m = ceil(sum S / (C N)) micro-batches, micro-batch j
    = sorted[j::m] (each mixes long and short); if one is over C*N tokens or DACP fails on it, m += 1.
    m = len(idx) always succeeds (one sequence per micro-batch, each fits: checked by _validate).
    Starting from a larger `m` is skrull_plus's option; the paper starts at the smallest."""
    if not idx:
        return []
    seqs = sorted(idx, key=lambda k: (lengths[k], k))
    m = max(m or 1, math.ceil(sum(lengths[k] for k in seqs) / (bucket_size * cp)))
    while True:
        mbs = []
        for j in range(min(m, len(seqs))):
            part = seqs[j::m]
            if sum(lengths[k] for k in part) > bucket_size * cp:
                break
            mb, _ = dacp(part, lengths, cp, bucket_size, cost, t)
            if mb is None:
                break
            mbs.append(mb)
        else:
            return mbs
        m += 1
        assert m <= len(seqs), "unreachable: one sequence per micro-batch always fits"


def gds_split(lengths, dp, cp, bucket_size, cost, t):
    """Algorithm 2, first half: spread the global batch over DP ranks balancing estimated time, not
    tokens (longest-processing-time first: the costliest sequence goes to the least-loaded rank).
    A sequence's estimate is its share of its CP group's time: t_local/N if it can stay local, its
    distributed time otherwise, plus its share of the micro-batch overhead (memory -> micro-batches)."""
    n = len(lengths)
    if dp == 1:
        return [list(range(n))]
    est = [(t[k] / cp if lengths[k] <= bucket_size else cost.t_dist(lengths[k], cp))
           + cost.c_mb * lengths[k] / (bucket_size * cp) for k in range(n)]
    loads, ranks = [0.0] * dp, [[] for _ in range(dp)]
    for k in sorted(range(n), key=lambda k: (-est[k], k)):
        r = min(range(dp), key=lambda r: (loads[r], len(ranks[r]), r))
        ranks[r].append(k)
        loads[r] += est[k]
    return [sorted(r) for r in ranks]


def skrull_plus(lengths, dp, cp, bucket_size, cost, t):
    """Ours. Per DP rank of Algorithm 2's split, candidates scored with CostModel.dp_rank_time:
    Algorithm 2's strided micro-batches for m0 and m0 + 1 micro-batches (the paper always takes the
    fewest that fit), each placed by Algorithm 1 or with every sequence distributed; the best m's
    Algorithm 1 placement is then improved by refine() (refining the all-distributed one never won in
    the simulator, and costs time). The paper's plan for the rank is a candidate, so per DP
    rank skrull_plus is never predicted slower than skrull. Then balance_dp() moves local sequences
    from the slowest DP rank to the fastest (it only accepts moves that lower the pair's slower
    time). Last, the whole plan is compared with naive's (every sequence distributed, dataset order),
    which wins on some bimodal batches."""
    plan = []
    for idx in gds_split(lengths, dp, cp, bucket_size, cost, t):
        tried = []  # per micro-batch count: (DACP placement, its time), (all distributed, its time)
        m0 = max(1, math.ceil(sum(lengths[k] for k in idx) / (bucket_size * cp)))
        for m in range(m0, m0 + PLUS_EXTRA_MB + 1):
            mbs = gds_microbatches(idx, lengths, cp, bucket_size, cost, t, m)
            if tried and len(mbs) == len(tried[-1][0][0]):
                continue
            # the same micro-batches with every sequence distributed, where that fits (padding can push
            # a micro-batch of many short sequences over cp*C)
            spread = [_all_distributed(sorted(mb.distributed + sum(mb.local, [])), cp) for mb in mbs]
            fits = all(sum(padded_len(lengths[k], cp) for k in mb.distributed) <= cp * bucket_size for mb in spread)
            tried.append(((mbs, cost.dp_rank_time(mbs, lengths)), (spread, cost.dp_rank_time(spread, lengths) if fits else math.inf)))
        (mbs, _), _ = min(tried, key=lambda pair: min(pair[0][1], pair[1][1]))
        refined = [refine(mb, lengths, bucket_size, cost) for mb in mbs]
        cands = [c for pair in tried for c in pair] + [(refined, cost.dp_rank_time(refined, lengths))]
        plan.append(min(cands, key=lambda c: c[1])[0])  # ties: the first tried
    plan = balance_dp(plan, lengths, bucket_size, cost)
    naive = [[_all_distributed(g, cp) for g in _pack_in_order(r, lengths, cp, bucket_size)]
             for r in _split(range(len(lengths)), dp)]  # schedule(policy="naive")
    return min((plan, naive), key=lambda p: cost.predict_step_time(p, lengths))


PLUS_EXTRA_MB = 1  # skrull_plus tries m0 and m0 + 1 micro-batches per DP rank (more: slower, rarely better)


def schedule(lengths, *, dp, cp, bucket_size, policy="skrull", cost=None, seed=0):
    """The plan for one global batch: a list (one per DP rank) of lists of MicroBatch.

    lengths: the GLOBAL batch's sequence lengths (dp * batch_size of them), in dataset order.
    policy (the paper's baselines, Skrull and ours, on one code path):
      naive        DeepSpeed-style: each DP rank takes a contiguous slice, packs it in dataset order into
                   micro-batches of at most cp*C tokens, every sequence distributed over the CP group.
      sorted       LongAlign sorted batching: sort the global batch by length, cut it into dp consecutive
                   groups, give them to DP ranks in a random order, pack each in sorted order and shuffle
                   its micro-batches (seeded); every sequence distributed.
      dacp         naive's micro-batches, placed by DACP (Algorithm 1: the paper's first ablation step).
      skrull       the paper: GDS (Algorithm 2: DP ranks balanced by estimated time, strided
                   micro-batches) + DACP (Algorithm 1), with only our documented fixes (roll-back
                   accounting, padding).
      skrull_plus  ours: skrull_plus() (GDS's split, the best of a few micro-batch counts, refine()).
    cp == 1: every sequence is local on the only rank (local[0]); nothing is distributed or padded.
    Raises ValueError for an empty batch, dp or cp < 1, bucket_size <= 0, an unknown policy, or a
    sequence that cannot fit even when distributed (padded share > bucket_size, i.e. longer than cp*C).
    """
    lengths = _validate(lengths, dp, cp, bucket_size, policy)
    n = len(lengths)
    if policy in ("naive", "dacp"):
        plan = []
        for rank_idx in _split(range(n), dp):
            groups = _pack_in_order(rank_idx, lengths, cp, bucket_size)
            if policy == "naive":
                plan.append([_all_distributed(g, cp) for g in groups])
                continue
            cost = cost or default_cost()
            mbs = []
            for g in groups:
                mb, _ = dacp(g, lengths, cp, bucket_size, cost)
                mbs.append(mb if mb is not None else _all_distributed(g, cp))  # g fits all-distributed
            plan.append(mbs)
        return plan
    if policy == "sorted":
        rng = np.random.default_rng(seed)
        order = sorted(range(n), key=lambda k: (lengths[k], k))
        groups = _split(order, dp)
        plan = []
        for r in rng.permutation(dp):
            mbs = [_all_distributed(g, cp) for g in _pack_in_order(groups[r], lengths, cp, bucket_size)]
            plan.append([mbs[i] for i in rng.permutation(len(mbs))])
        return plan
    cost = cost or default_cost()
    t = [float(x) for x in cost.t_local(np.asarray(lengths, dtype=np.float64))]
    if policy == "skrull_plus":
        return skrull_plus(lengths, dp, cp, bucket_size, cost, t)
    return [gds_microbatches(r, lengths, cp, bucket_size, cost, t) for r in gds_split(lengths, dp, cp, bucket_size, cost, t)]
