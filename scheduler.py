"""
Skrull's data scheduler (Xu et al., arXiv 2505.19609): which rank computes which sequence. The paper,
top to bottom:
  1. MicroBatch, padded_len        the plan (what schedule() returns)
  2. CostModel                     FLOPs, and a rank's time in a micro-batch (rank_time), used by all below
  3. dacp                          Algorithm 1: local vs distributed per micro-batch, with roll-back
  4. gds_split, gds_microbatches   Algorithm 2: global batch -> DP ranks -> micro-batches
  5. POLICIES, schedule            the baselines and Skrull by name; schedule() checks any policy's plan, the
                                   whole plan or one DP rank's (RankPlan: what a training rank needs)
Ours (skrull_plus) is in skrull_plus.py, which registers it in POLICIES when imported; the simulator and
the exact MILP optimum are in simulate.py.

Pure Python + numpy: no torch, no torch.distributed. Every rank calls schedule() with the same
lengths and gets the same plan (all ties broken by index, randomness only from `seed`).
"""
import copy
import heapq
import inspect
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


@dataclass
class RankPlan:
    """One DP rank's part of a plan, what schedule(..., dp_rank=r) returns: the DP split, which every rank
    computes and agrees on, and the micro-batches of DP rank r only, which its CP peers agree on. The
    micro-batches are those of schedule(...)[r]; the rank skips the work of every other DP rank's."""
    split: list         # dp sorted lists of indices into lengths: the sequences of each DP rank
    dp_rank: int
    microbatches: list  # DP rank dp_rank's MicroBatch list


def padded_len(s, cp):
    """Distributed length: s padded up to a multiple of 2*cp (zigzag cuts a sequence into 2*cp chunks)."""
    m = 2 * cp
    return -(-int(s) // m) * m

# -----------------------------------------------------------------------------
# 2. cost model
#
# FLOPs of one sequence of length s, forward, one layer (2 FLOPs per multiply-add; h = n_embd,
# h_q = n_head * head_dim (h itself unless head_dim is given, as Qwen3's is), h_kv = n_kv_head * head_dim,
# I = intermediate_size, V = vocab_size):
#   q and o projections            2 * 2*s*h*h_q      = 4 s h h_q
#   k and v projections (GQA)      2 * 2*s*h*h_kv     = 4 s h h_kv
#   SwiGLU MLP: gate, up, down     3 * 2*s*h*I        = 6 s h I
#   attention QK^T and PV          2 * 2*h_q*s^2 / 2  = 2 h_q s^2   (causal: half of the s x s pairs)
# plus the lm_head once per token, 2 s h V. Norms (Qwen3's q/k norms too), RoPE, softmax and the loss are
# O(s h), ignored. Backward is twice the forward (grads w.r.t. inputs and weights), so forward+backward = 3x:
#   F_lin(s)  = 3 s (n_layer (4 h h_q + 4 h h_kv + 6 h I) + 2 h V)
#   F_attn(s) = 3 n_layer 2 h_q s^2      (1/3 of it in the forward, 2/3 in the backward)
# For Qwen2.5-0.5B the quadratic term overtakes the per-layer linear one at s = 2h + 2h_kv + 3I = 16.6K
# tokens (23K counting the lm_head). The ~4.6K often quoted for this model counts a narrower MLP (4h)
# and no causal halving. Measured time is what matters: a, a_attn, a_ring are fitted.

SHAPES = {  # the paper's two models (config.json shapes), here so no torch is needed; model.PRESETS uses them
    "qwen2.5-0.5b": dict(n_layer=24, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864,
                         vocab_size=151936, tie_embeddings=True),
    "qwen2.5-7b": dict(n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, intermediate_size=18944,
                       vocab_size=152064, tie_embeddings=False),
}
PAPER_BUCKET = {"qwen2.5-0.5b": 26_000, "qwen2.5-7b": 13_000}  # paper: C = 26K / 13K on H100 80GB

# H100 defaults. ASSUMPTIONS, not measurements (no H100 was available to profile): replace them with
# `python calibrate.py` on the target machine. Provenance of each number:
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
    """A ModelConfig, a dict of its fields, or a SHAPES key (None: qwen2.5-0.5b) -> the fields used here.
    Fields a dict leaves out take ModelConfig's defaults (Qwen2's: head_dim n_embd // n_head, q/k/v bias)."""
    config = "qwen2.5-0.5b" if config is None else config
    config = SHAPES[config] if isinstance(config, str) else config
    if isinstance(config, dict):
        config = SimpleNamespace(**{"head_dim": None, "qkv_bias": True, "o_bias": False, "qk_norm": False,
                                    "tie_embeddings": True, **config})
    return config


def _preset_name(c):
    """The SHAPES key of the model c describes, or None (it picks the paper's bucket)."""
    keys = ("n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size")
    return next((name for name, shape in SHAPES.items() if all(getattr(c, k) == shape[k] for k in keys)), None)


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
    step (the paper's cost model, re-derived for this code). Constants are per layer and per pass unless
    said; `python calibrate.py` fits them on the machine at hand.

    rank_time = c_mb + a F_lin(tokens), plus per layer either one varlen attention call for the local
    sequences (nothing distributed), or N ring steps forward and backward, each computing its slice of the
    local sequences (local_slots) and one ring block while hops are in flight (the next K,V; in the
    backward also the fp32 dK,dV): step time = compute + comm - comm_overlap * min(compute, comm), and
    comm_overlap = 1 is the paper's max(T_comm, T_comp). A micro-batch with distributed sequences ends
    with its slowest CP rank; a DP rank's micro-batches run back to back (dp_rank_time); the step ends
    with the gradient exchange and the optimizer (t_step).
    """

    def __init__(self, config=None, profile=None, memory=None):
        c = self.config = _shape(config)
        h, L, I, V = c.n_embd, c.n_layer, c.intermediate_size, c.vocab_size
        D = c.head_dim or h // c.n_head
        h_q, h_kv = c.n_head * D, c.n_kv_head * D
        self.n_layer, self.h_kv = L, h_kv
        self.lin_flops = 3 * (L * (4 * h * h_q + 4 * h * h_kv + 6 * h * I) + 2 * h * V)  # per token
        self.attn_flops = 3 * L * 2 * h_q                                                  # per token^2
        per_layer = 2 * h * h_q + 2 * h * h_kv + 3 * h * I + 2 * h  # projections, MLP, the two norms
        per_layer += (h_q + 2 * h_kv) * c.qkv_bias + h * c.o_bias + 2 * D * c.qk_norm
        self.n_params = L * per_layer + h + V * h * (1 if c.tie_embeddings else 2)
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
                raise ValueError(f"profile has {', '.join(unknown)} from an older cost model: rerun `python calibrate.py`")
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

    def with_constants(self, constants, source=None):
        """A new CostModel with `constants` ({name in CONSTANTS: value}) replaced. This one stays
        as it is: a plan made with it is still explained by it (costfit.Calibrator swaps models, never edits)."""
        unknown = [k for k in constants if k not in CONSTANTS]
        if unknown:
            raise ValueError(f"not cost model constants: {', '.join(unknown)}")
        new = copy.copy(self)
        for k, v in constants.items():
            setattr(new, k, v)
        new.source = source or self.source
        return new

    def flops(self, s):
        return self.lin_flops * s + self.attn_flops * s * s

    # --- the one formula: a rank's time in a micro-batch ---
    def ring(self, dist_lengths, cp):
        """What a rank needs to know about the distributed sequences of a micro-batch, seconds per layer:
        n (sequences), share (this rank's padded tokens), block (one ring block call, one pass: fixed
        cost), attn (its attention, forward + backward), hop (one K,V hop), hop_grad (one fp32 dK,dV hop),
        and empty (the forward and backward of a ring step with no local slice: (non-last, last))."""
        sp = [padded_len(s, cp) for s in dist_lengths]
        share = sum(sp) // cp
        kv_bytes = share * 2 * self.h_kv
        r = SimpleNamespace(n=len(sp), share=share, cp=cp, block=self.b_call + self.b_seq * len(sp),
                            attn=self.a_ring * self.attn_flops / self.n_layer * sum(s * s for s in sp) / (cp * cp),
                            hop=self.p2p_latency + kv_bytes * self.comm_bytes / self.p2p_bandwidth,
                            hop_grad=self.p2p_latency + kv_bytes * 4 / self.p2p_bandwidth)
        r.empty = (self._step(r, 0.0, 0.0, last=False), self._step(r, 0.0, 0.0, last=True))
        return r

    def _step(self, ring, call, attn, last):
        """One ring step, forward + backward, one layer: this step's local slice (fixed cost `call` per
        pass, attention `attn` fwd+bwd) and the ring block run while the hops are in flight."""
        o = self.comm_overlap
        fwd = call + ring.block + (attn + ring.attn) / 3
        bwd = call + ring.block + 2 * (attn + ring.attn) / 3
        comm_f = 0.0 if last else ring.hop                     # forward: the next K,V hop
        comm_b = ring.hop_grad + (0.0 if last else ring.hop)   # backward: next K,V hop + this dK,dV hop
        return fwd + comm_f - o * min(fwd, comm_f) + bwd + comm_b - o * min(bwd, comm_b)

    def rank_time(self, tokens, local_lengths, ring=None):
        """Seconds of one CP rank in a micro-batch: `tokens` it holds, its whole `local_lengths` (in the
        order dacp_attention gets them), and the ring (CostModel.ring) of the distributed sequences or
        None. The class docstring, line by line."""
        if not tokens:
            return 0.0
        linear = self.c_mb + self.a * self.lin_flops * tokens
        a_attn = self.a_attn * self.attn_flops / self.n_layer  # per token^2, one layer, fwd+bwd
        if ring is None or ring.n == 0:
            n = len(local_lengths)
            return linear + self.n_layer * (2 * (self.b_call + self.b_seq * n) * (n > 0) + a_attn * sum(s * s for s in local_lengths))
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
        return linear + self.n_layer * per_layer

    def rank_times(self, mb, lengths):
        """Estimated seconds of micro-batch mb on each CP rank (0 for a rank with nothing to do)."""
        cp = len(mb.local)
        ring = self.ring([lengths[k] for k in mb.distributed], cp) if mb.distributed else None
        share = ring.share if ring else 0
        if not any(mb.local):  # every rank holds the same shares
            return [self.rank_time(share, [], ring)] * cp
        return [self.rank_time(share + sum(lengths[k] for k in loc), [lengths[k] for k in loc], ring)
                for loc in mb.local]

    # --- per sequence estimates (GDS's DP balance, skrull_plus.ideal_step_time): communication hidden, calls shared ---
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
        """Per optimizer step: the gradient exchange over all ranks (a ring all-reduce, or FSDP2's
        all-gather + reduce-scatter: 2 (world - 1) hops, `step_bytes` per parameter), then the optimizer."""
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
                clocks = [clock + dt for clock, dt in zip(clocks, times_k)]
        return max(clocks) if clocks else 0.0

    def predict_step_time(self, plan, lengths, sync=False, include_step=True):
        """Estimated seconds of one optimizer step of `plan` (schedule()'s output): slowest DP rank
        (DP ranks only meet at the gradient all-reduce) plus the all-reduce and optimizer."""
        slowest = max(self.dp_rank_time(mbs, lengths, sync) for mbs in plan)
        if include_step:
            cp = next((len(mb.local) for mbs in plan for mb in mbs), 1)
            slowest += self.t_step(len(plan) * cp)
        return slowest


_DEFAULT_COST = None


def default_cost():
    """The CostModel a caller gets without passing one: Qwen2.5-0.5B, H100 constants, built once."""
    global _DEFAULT_COST
    if _DEFAULT_COST is None:
        _DEFAULT_COST = CostModel()
    return _DEFAULT_COST

# -----------------------------------------------------------------------------
# 3. DACP: Algorithm 1 of the paper, one micro-batch


def dacp(idx, lengths, cp, bucket_size, cost=None, t_local=None):
    """Place the sequences `idx` (indices into lengths) of one micro-batch on a CP group of `cp` ranks.
    Returns (MicroBatch, n_rollbacks), or (None, n_rollbacks) when the heuristic fails. t_local: the
    sequences' CostModel.t_local (the load L), indexed like lengths; computed here if not given.

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
    if t_local is None:
        t_local = {k: cost.t_local(lengths[k]) for k in idx}
    share = {k: padded_len(lengths[k], cp) // cp for k in idx}
    order = sorted(idx, key=lambda k: (lengths[k], k))
    room = [bucket_size] * cp  # RB: remaining bucket per rank
    load = [0.0] * cp          # L: estimated local compute per rank
    local = [[] for _ in range(cp)]
    dist = []
    rollbacks, i = 0, 0
    ranks = range(cp)
    while i < len(order):
        k = order[i]
        s = lengths[k]
        if min(room) >= 0:
            j = min(ranks, key=load.__getitem__)
            if s > room[j]:
                j = max(ranks, key=room.__getitem__)
            if s <= room[j]:
                local[j].append(k)
                room[j] -= s
                load[j] += t_local[k]
                i += 1
                continue
            if share[k] <= min(room):
                dist.append(k)
                room = [r - share[k] for r in room]
                i += 1
                continue
        # roll back (Algorithm 1, lines "else ... rollback")
        j = min(ranks, key=room.__getitem__)
        victims = [v for v in local[j] if lengths[v] > share[v]]
        if not victims:
            return None, rollbacks
        v = min(victims, key=lambda v: (lengths[v], v))
        local[j].remove(v)
        room[j] += lengths[v]
        load[j] -= t_local[v]
        room = [r - share[v] for r in room]
        dist.append(v)
        rollbacks += 1
    return MicroBatch(sorted(dist), [sorted(loc) for loc in local], rollbacks), rollbacks


# -----------------------------------------------------------------------------
# 4. GDS: Algorithm 2 of the paper, one global batch


def local_times(lengths, cost):
    """CostModel.t_local of every sequence, computed once per global batch (GDS's estimates, DACP's L)."""
    return cost.t_local(np.asarray(lengths, dtype=np.float64)).tolist()


def gds_split(lengths, dp, cp, bucket_size, cost, t_local):
    """Algorithm 2, first half: spread the global batch over DP ranks balancing estimated time, not
    tokens (longest-processing-time first: the costliest sequence goes to the least-loaded rank).
    A sequence's estimate is its share of its CP group's time: t_local/N if it can stay local, its
    distributed time otherwise, plus its share of the micro-batch overhead (memory -> micro-batches).
    "Least-loaded" is the least key (load, sequences so far, rank): keys are distinct, so ties are
    broken the same way on every rank (lpt_ranks does the assignment)."""
    n = len(lengths)
    if dp == 1:
        return [list(range(n))]
    # numpy does each element's float operations in the same order as Python would: the same bits
    lens = np.asarray(lengths, dtype=np.int64)
    est = np.asarray(t_local, dtype=np.float64) / cp
    for k in np.flatnonzero(lens > bucket_size).tolist():
        est[k] = cost.t_dist(lengths[k], cp)
    est += cost.c_mb * lens / (bucket_size * cp)
    order = np.argsort(-est, kind="stable")  # costliest first, ties by index
    ranks = [[] for _ in range(dp)]
    for k, r in enumerate(lpt_ranks(est[order], order, dp).tolist()):
        ranks[r].append(k)
    return ranks


LPT_ROUND = 32  # fewest sequences a numpy round must place to beat the heap's one-at-a-time steps


def lpt_ranks(est, order, dp):
    """The DP rank of each sequence: sequence order[i], estimates est[i] falling, goes to the rank of
    least key (load, sequences so far, rank), one after another. Returns ranks indexed by sequence.
    The same assignment, in rounds when that pays: with the ranks sorted by key, the next j sequences
    go to the j least ranks, one each, as long as every rank served earlier in the round has risen
    above the next one's load (strictly: a tie ends the round). Estimates that fall slowly make rounds
    of about dp sequences, so about n/dp numpy rounds replace n Python steps (1.5x faster at dp 64, 2x
    at dp 512: python -m bench.plan --split).
    A round shorter than LPT_ROUND (small dp, or loads far apart) is not taken: the next dp sequences
    are placed one at a time from a heap of the keys instead, O(log dp) each."""
    n = len(order)
    loads, counts, rank_ids = np.zeros(dp), np.zeros(dp, dtype=np.int64), np.arange(dp)
    out = np.empty(n, dtype=np.int64)
    i = 0
    while i < n:
        by_key = np.lexsort((rank_ids, counts, loads))
        m = min(dp, n - i)
        new = loads[by_key[:m]] + est[i:i + m]
        short = np.flatnonzero(np.minimum.accumulate(new)[:-1] <= loads[by_key[1:m]])
        j = int(short[0]) + 1 if len(short) else m
        if j >= LPT_ROUND:
            served = by_key[:j]
            out[order[i:i + j]] = served
            loads[served] = new[:j]
            counts[served] += 1
            i += j
            continue
        end = n if dp < LPT_ROUND else min(n, i + dp)
        heap = list(zip(loads[by_key].tolist(), counts[by_key].tolist(), by_key.tolist()))  # sorted: a heap
        got, replace = [], heapq.heapreplace
        for e in est[i:end].tolist():
            load, count, r = heap[0]
            got.append(r)
            replace(heap, (load + e, count + 1, r))
        out[order[i:end]] = got
        for load, count, r in heap:
            loads[r], counts[r] = load, count
        i = end
    return out


def gds_microbatches(idx, lengths, cp, bucket_size, cost, t_local, m=None):
    """Algorithm 2, one DP rank: sort ascending, try m = ceil(sum S / (C N)) micro-batches, micro-batch j
    = sorted[j::m] (each mixes long and short); if one is over C*N tokens or DACP fails on it, m += 1.
    m = len(idx) always succeeds (one sequence per micro-batch, each fits: checked by schedule()).
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
            mb, _ = dacp(part, lengths, cp, bucket_size, cost, t_local)
            if mb is None:
                break
            mbs.append(mb)
        else:
            return mbs
        m += 1
        assert m <= len(seqs), "unreachable: one sequence per micro-batch always fits"

# -----------------------------------------------------------------------------
# 5. the policies, the registry, and schedule(). A policy is fn(lengths, *, dp, cp, bucket_size, cost,
# seed) -> plan: one list of MicroBatch per DP rank, every sequence (an index into lengths) exactly once.
# A policy that can plan one DP rank alone also takes dp_rank=None and, given one, returns a RankPlan
# (plan_ranks builds either); schedule() takes the whole plan of any other and keeps that rank's part.


def _split(idx, dp):
    """Contiguous, near-equal chunks of the indices idx, one per DP rank (the first ones one longer)."""
    return [[int(k) for k in chunk] for chunk in np.array_split(np.asarray(idx, dtype=np.int64), dp)]


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


def plan_ranks(split, dp_rank, plan_one):
    """A policy's plan from its DP split (dp lists of indices) and plan_one(indices) -> one DP rank's
    micro-batches: every DP rank's (dp_rank None), or a RankPlan with dp_rank's alone."""
    if dp_rank is None:
        return [plan_one(idx) for idx in split]
    return RankPlan(split, dp_rank, plan_one(split[dp_rank]))


def all_distributed(group, cp):
    """One micro-batch with every sequence of group distributed (cp == 1: all local on the only rank)."""
    if cp == 1:
        return MicroBatch([], [list(group)])
    return MicroBatch(list(group), [[] for _ in range(cp)])


def naive(lengths, *, dp, cp, bucket_size, cost=None, seed=0, dp_rank=None):
    """DeepSpeed-style: each DP rank takes a contiguous slice, packs it in dataset order into
    micro-batches of at most cp*C tokens, every sequence distributed over the CP group."""
    return plan_ranks(_split(range(len(lengths)), dp), dp_rank,
                      lambda idx: [all_distributed(g, cp) for g in _pack_in_order(idx, lengths, cp, bucket_size)])


def sorted_batching(lengths, *, dp, cp, bucket_size, cost=None, seed=0):
    """LongAlign's sorted batching: sort the global batch by length, cut it into dp consecutive groups,
    give them to DP ranks in a random order, pack each in sorted order and shuffle its micro-batches
    (seeded); every sequence distributed."""
    rng = np.random.default_rng(seed)
    groups = _split(sorted(range(len(lengths)), key=lambda k: (lengths[k], k)), dp)
    plan = []
    for r in rng.permutation(dp):
        mbs = [all_distributed(g, cp) for g in _pack_in_order(groups[r], lengths, cp, bucket_size)]
        plan.append([mbs[i] for i in rng.permutation(len(mbs))])
    return plan


def dacp_baseline(lengths, *, dp, cp, bucket_size, cost=None, seed=0, dp_rank=None):
    """naive's micro-batches, placed by DACP (Algorithm 1): the paper's first ablation step."""
    cost = cost or default_cost()

    def place(idx):
        mbs = []
        for g in _pack_in_order(idx, lengths, cp, bucket_size):
            mb, _ = dacp(g, lengths, cp, bucket_size, cost)
            mbs.append(mb if mb is not None else all_distributed(g, cp))  # g fits all-distributed
        return mbs
    return plan_ranks(_split(range(len(lengths)), dp), dp_rank, place)


def skrull(lengths, *, dp, cp, bucket_size, cost=None, seed=0, dp_rank=None):
    """The paper: GDS (Algorithm 2: DP ranks balanced by estimated time, strided micro-batches) + DACP
    (Algorithm 1), with only our documented fixes (roll-back accounting, padding). With dp_rank, only
    that DP rank's micro-batches are formed (a RankPlan): the DP split is the only work for them all."""
    cost = cost or default_cost()
    t_local = local_times(lengths, cost)
    return plan_ranks(gds_split(lengths, dp, cp, bucket_size, cost, t_local), dp_rank,
                      lambda idx: gds_microbatches(idx, lengths, cp, bucket_size, cost, t_local))


# name -> fn(lengths, *, dp, cp, bucket_size, cost, seed) returning a plan. A policy registers itself where
# it is defined, POLICIES["name"] = fn: ours does so when skrull_plus.py is imported, and so can yours.
POLICIES = {"naive": naive, "sorted": sorted_batching, "dacp": dacp_baseline, "skrull": skrull}


def _check_inputs(lengths, dp, cp, bucket_size, policy):
    for name, v in (("dp", dp), ("cp", cp)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(bucket_size, (int, np.integer)) or isinstance(bucket_size, bool) or bucket_size <= 0:
        raise ValueError(f"bucket_size must be a positive integer (tokens per rank), got {bucket_size!r}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)} (a policy is registered "
                         f"when the file that defines it is imported: `import skrull_plus` for ours)")
    lens = np.asarray(lengths)
    lengths = lens.tolist() if lens.dtype.kind in "iu" and lens.ndim == 1 else [int(s) for s in lengths]
    if not lengths:
        raise ValueError("empty batch: no sequences to schedule")
    lens = lens.astype(np.int64) if lens.dtype.kind == "i" and lens.ndim == 1 else np.asarray(lengths, dtype=np.int64)
    share = -(-lens // (2 * cp)) * 2  # padded_len(s, cp) // cp
    bad = np.flatnonzero((lens < 1) | ((lens > bucket_size) if cp == 1 else (share > bucket_size)))
    for k in bad[:1].tolist():  # the first sequence that does not fit says why
        s = lengths[k]
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


def _check_plan(plan, policy, lengths, dp, cp, bucket_size):
    """What every policy promises, checked in O(plan size): dp lists of non-empty MicroBatch with cp local
    lists (none distributed when cp == 1), every sequence exactly once, no CP rank over bucket_size."""
    if not isinstance(plan, (list, tuple)) or len(plan) != dp:
        got = len(plan) if isinstance(plan, (list, tuple)) else f"a {type(plan).__name__}, not a list of"
        raise _wrong(policy, f"returned {got} DP ranks, expected dp={dp} (one list of MicroBatch per DP rank)")
    _check_once([k for r, mbs in enumerate(plan) for k in _check_microbatches(mbs, r, policy, lengths, cp, bucket_size)],
                policy, lengths)


def _check_rank_plan(rp, dp_rank, policy, lengths, dp, cp, bucket_size):
    """A RankPlan's promise: a DP split of dp lists holding every sequence exactly once, and DP rank
    dp_rank's micro-batches holding exactly its part of the split, each as _check_plan checks them."""
    if not isinstance(rp.split, (list, tuple)) or len(rp.split) != dp or rp.dp_rank != dp_rank:
        raise _wrong(policy, f"returned a RankPlan for DP rank {rp.dp_rank!r} with a split of "
                             f"{len(rp.split) if isinstance(rp.split, (list, tuple)) else rp.split!r} DP ranks, "
                             f"expected DP rank {dp_rank} of dp={dp}")
    _check_once([k for idx in rp.split for k in idx], policy, lengths, "the DP split")
    held = _check_microbatches(rp.microbatches, dp_rank, policy, lengths, cp, bucket_size)
    if sorted(held) != sorted(rp.split[dp_rank]):
        raise _wrong(policy, f"DP rank {dp_rank}'s micro-batches do not hold exactly its sequences in the DP split")


def _wrong(policy, what):
    return ValueError(f"policy {policy!r}: {what}")


def _check_microbatches(mbs, r, policy, lengths, cp, bucket_size):
    """DP rank r's micro-batches: each a non-empty MicroBatch of cp local lists, no CP rank over the bucket.
    Returns the indices they hold."""
    out = []
    for m, mb in enumerate(mbs):
        where = f"DP rank {r}, micro-batch {m}"
        if not isinstance(mb, MicroBatch) or len(mb.local) != cp or (cp == 1 and mb.distributed):
            raise _wrong(policy, f"{where} is not a MicroBatch with cp={cp} local lists "
                                 f"(none distributed if cp == 1): {mb!r}")
        held = [*mb.distributed, *(k for loc in mb.local for k in loc)]
        if not held:
            raise _wrong(policy, f"{where} is empty")
        for k in held:
            if not isinstance(k, (int, np.integer)) or not 0 <= k < len(lengths):
                raise _wrong(policy, f"{where} holds {k!r}, not an index into the {len(lengths)} lengths")
        out += held
    for m, mb in enumerate(mbs):
        for j, tokens in enumerate(mb.rank_tokens(lengths)):
            if tokens > bucket_size:
                raise _wrong(policy, f"DP rank {r}, micro-batch {m}, CP rank {j} holds {tokens} tokens (padded share "
                                     f"of the distributed + its local ones), over bucket_size={bucket_size}")
    return out


def _check_once(held, policy, lengths, where=""):
    """Every sequence exactly once in held (counted by numpy; the first offender named as a loop would)."""
    arr = np.asarray(held)
    if len(held) and (arr.dtype.kind not in "iu" or arr.ndim != 1 or arr.min() < 0 or arr.max() >= len(lengths)):
        k = next(k for k in held if not isinstance(k, (int, np.integer)) or not 0 <= k < len(lengths))
        raise _wrong(policy, f"{where} holds {k!r}, not an index into the {len(lengths)} lengths")
    counts = np.bincount(arr.astype(np.int64), minlength=len(lengths)) if len(held) else np.zeros(len(lengths), np.int64)
    for k in np.flatnonzero(counts != 1)[:1].tolist():
        raise _wrong(policy, f"sequence {k} appears {counts[k]} times" + (f" in {where}" if where else ""))


def schedule(lengths, *, dp, cp, bucket_size, policy="skrull", cost=None, seed=0, dp_rank=None):
    """The plan for one global batch of sequence `lengths` (dp * batch_size of them, in dataset order): a
    list (one per DP rank) of lists of MicroBatch, made by POLICIES[policy] with `cost` (None:
    default_cost()) and `seed`. cp == 1: every sequence is local on the only rank (local[0]).
    dp_rank=r: only what DP rank r runs, as a RankPlan (the DP split and schedule(...)[r]); a policy that
    takes dp_rank skips the other DP ranks' micro-batch work, any other is run whole and cut.
    Raises ValueError for an empty batch, dp or cp < 1, bucket_size <= 0, an unknown policy, a sequence
    that cannot fit even distributed (longer than cp*C once padded), or a plan that breaks _check_plan."""
    lengths = _check_inputs(lengths, dp, cp, bucket_size, policy)
    fn, kw = POLICIES[policy], dict(dp=dp, cp=cp, bucket_size=bucket_size, cost=cost if cost is not None else default_cost(), seed=seed)
    if dp_rank is None:
        plan = fn(lengths, **kw)
        _check_plan(plan, policy, lengths, dp, cp, bucket_size)
        return plan
    if not isinstance(dp_rank, (int, np.integer)) or isinstance(dp_rank, bool) or not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank must be an integer in [0, dp={dp}), got {dp_rank!r}")
    plan = fn(lengths, dp_rank=dp_rank, **kw) if _plans_one_rank(fn) else fn(lengths, **kw)
    if isinstance(plan, RankPlan):
        _check_rank_plan(plan, dp_rank, policy, lengths, dp, cp, bucket_size)
        return plan
    _check_plan(plan, policy, lengths, dp, cp, bucket_size)
    split = [sorted(k for mb in mbs for k in [*mb.distributed, *(k for loc in mb.local for k in loc)]) for mbs in plan]
    return RankPlan(split, dp_rank, plan[dp_rank])


def _plans_one_rank(fn):
    """Whether the policy fn takes dp_rank (can plan one DP rank alone)."""
    try:
        return "dp_rank" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False
