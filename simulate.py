"""
The scheduler off-line: the paper's setups through every policy, the exact optimum on small instances,
and the scheduling overhead. Pure Python + numpy + scipy (the MILP); no torch.

    python simulate.py             # predicted step times, speedups, bound, overhead, MILP gaps
    python simulate.py --gap       # only the MILP gaps
    python simulate.py --const b_seq=15e-6 --const comm_overlap=0    # the table with other constants
    python simulate.py --policy_file my_policy.py --policies skrull,longest_first   # your own policy
    python simulate.py --wrong     # what planning with wrong constants costs (why train.py calibrates online)

Pieces, top to bottom:
  1. milp                 the best plan for a tiny global batch under scheduler.CostModel (scipy HiGHS)
  2. optimality gaps      skrull and skrull_plus against it
  3. simulate             paper Table 1 length distributions, the paper's setups, H100 constants
  4. wrong_constants      plans made with the H100 defaults, scored on machines that differ from them
"""
import argparse
import math
import os
import runpy
import time
from types import SimpleNamespace

import numpy as np

from scheduler import CONSTANTS, POLICIES, CostModel, MicroBatch, default_cost, padded_len, schedule
from skrull_plus import ideal_step_time

# -----------------------------------------------------------------------------
# 1. exact optimum of the cost model, for small instances (MILP)
#
# CostModel.rank_time is linear in the placement except for two things, each made linear here:
#  - a ring step takes compute + comm - overlap * min(compute, comm) = max(compute + (1-o) comm,
#    comm + (1-o) compute): convex, so an epigraph variable u >= both lines is exact at the optimum;
#  - dacp_attention cuts a rank's local sequences into per-step slices whole (local_slots), which is not
#    linear. The MILP spreads each rank's local work evenly over the ring steps instead and leaves out
#    the fixed cost of the local slices' calls. Since a step's time is convex in its compute, the even
#    spread is the cheapest split, so the MILP's value is a LOWER BOUND on every plan's CostModel time,
#    and its own plan, scored by CostModel, an upper bound on the best plan: the optimum lies between.


def milp(lengths, dp, cp, bucket_size, cost=None, max_mb=None, time_limit=30.0):
    """Each sequence goes to a DP rank r, a micro-batch slot m < max_mb of it, and either CP rank j
    (local) or the ring (distributed). Minimise the slowest DP rank's sum over its micro-batches of the
    micro-batch's slowest CP rank (CostModel.dp_rank_time with sync=True, without t_step).
    Returns (lower bound, plan) or (inf, None) when nothing fits."""
    program = _PlanProgram(lengths, cp, bucket_size, cost or default_cost())
    n_slots = max_mb or len(lengths)
    program.build(dp, n_slots)
    res = program.solve(time_limit)
    if res.x is None:
        return math.inf, None
    return float(res.fun), program.plan(np.round(res.x).astype(int), dp, n_slots)


def _plus(*terms):
    """Sum of {column: coefficient} dicts, each scaled: _plus((1.0, d1), (2.0, d2))."""
    out = {}
    for k, d in terms:
        for col, x in d.items():
            out[col] = out.get(col, 0.0) + k * x
    return out


class _PlanProgram:
    """milp's program, built row by row. One column per named variable, created on first use:
    ("x", i, r, m, j) sequence i local on CP rank j of slot m of DP rank r, ("d", i, r, m) distributed
    there, ("y", r, m) the slot is used, ("z", r, m) something in it is distributed, ("u", ...) a ring
    step's time (the epigraph), ("T", r, m) the slot's time, ("obj",) the slowest DP rank's time.
    Rows are {column: coefficient} dicts between two bounds."""

    def __init__(self, lengths, cp, bucket_size, cost):
        self.lengths, self.cp, self.bucket_size, self.cost = lengths, cp, bucket_size, cost
        self.columns, self.rows, self.lo, self.hi = {}, [], [], []

    def v(self, *key):
        return self.columns.setdefault(key, len(self.columns))

    def add(self, row, lo, hi):
        self.rows.append(row), self.lo.append(lo), self.hi.append(hi)

    def build(self, dp, n_slots):
        """Every sequence placed once, each slot's rows, and obj at least each DP rank's sum of slot times.
        Columns and rows are made in a fixed order, so HiGHS sees the same program every run."""
        n, N = len(self.lengths), self.cp
        for i in range(n):  # every sequence exactly once: local on one CP rank, or distributed
            row = {self.v("x", i, r, m, j): 1 for r in range(dp) for m in range(n_slots) for j in range(N)}
            if N > 1:
                row.update({self.v("d", i, r, m): 1 for r in range(dp) for m in range(n_slots)})
            self.add(row, 1, 1)
        for r in range(dp):
            for m in range(n_slots):
                self.slot(r, m, n_slots)
            self.add({**{self.v("T", r, m): 1 for m in range(n_slots)}, self.v("obj"): -1}, -np.inf, 0)

    def slot(self, r, m, n_slots):
        """Slot m of DP rank r: slots used in order, a sequence only in a used slot, z set by anything
        distributed; then each CP rank's bucket and time."""
        n, N = len(self.lengths), self.cp
        Y = self.v("y", r, m)
        if m + 1 < n_slots:
            self.add({Y: 1, self.v("y", r, m + 1): -1}, 0, np.inf)  # use slots in order (symmetry breaking)
        d = {self.v("d", i, r, m): 1 for i in range(n)} if N > 1 else {}
        for i in range(n):
            self.add({**{self.v("x", i, r, m, j): 1 for j in range(N)}, **({self.v("d", i, r, m): 1} if N > 1 else {}),
                      Y: -1}, -np.inf, 0)
            if N > 1:
                self.add({self.v("d", i, r, m): 1, self.v("z", r, m): -1}, -np.inf, 0)
        ring = self.ring(r, m, d) if N > 1 else None
        for j in range(N):
            self.rank(r, m, j, ring)

    def ring(self, r, m, d):
        """The ring terms of slot m of DP rank r, linear in its d's (z: anything distributed): a rank's
        share in tokens, and seconds per layer of the ring block, ring attention, a hop, a gradient hop."""
        c, N, z = self.cost, self.cp, {self.v("z", r, m): 1}
        sp = [padded_len(s, N) for s in self.lengths]
        kv = 2 * c.h_kv / c.p2p_bandwidth  # s per share token of a hop, per byte width
        share = {col: sp[i] // N for i, col in enumerate(d)}
        attn = {self.v("d", i, r, m): c.a_ring * c.attn_flops / c.n_layer * sp[i] ** 2 / N ** 2 for i in range(len(sp))}
        return SimpleNamespace(share=share, block=_plus((c.b_call, z), (c.b_seq, d)), attn=attn,
                               hop=_plus((c.p2p_latency, z), (kv * c.comm_bytes, share)),
                               hop_grad=_plus((c.p2p_latency, z), (kv * 4, share)))

    def rank(self, r, m, j, ring):
        """CP rank j of slot m of DP rank r: its tokens within the bucket, and T[r, m] at least its time."""
        c, n, N, L, o = self.cost, len(self.lengths), self.cp, self.cost.n_layer, self.cost.comm_overlap
        a_loc = c.a_attn * c.attn_flops / L  # s per token^2, one layer, fwd+bwd
        Y, x = self.v("y", r, m), {self.v("x", i, r, m, j): 1 for i in range(n)}
        sq = {self.v("x", i, r, m, j): self.lengths[i] ** 2 for i in range(n)}
        tok = _plus((1, {self.v("x", i, r, m, j): self.lengths[i] for i in range(n)}), (1, ring.share if ring else {}))
        self.add(tok, -np.inf, self.bucket_size)
        if ring is None:  # no ring: one attention call per layer and pass
            loc = _plus((L * a_loc, sq), (2 * L * c.b_seq, x), (2 * L * c.b_call, {Y: 1}))
            self.add(_plus((c.c_mb, {Y: 1}), (c.a * c.lin_flops, tok), (1, loc), (-1, {self.v("T", r, m): 1})),
                     -np.inf, 0)
            return
        # one step's compute per pass: the even slice of the local work + the ring block
        slice_ = _plus((a_loc / N, sq))
        fwd = _plus((1 / 3, slice_), (c.b_seq / N, x), (1, ring.block), (1 / 3, ring.attn))
        bwd = _plus((2 / 3, slice_), (c.b_seq / N, x), (1, ring.block), (2 / 3, ring.attn))
        steps = []  # u >= both lines of a step's time: forward, backward, the last step's backward
        for name, comp, comm in (("f", fwd, ring.hop), ("b", bwd, _plus((1, ring.hop), (1, ring.hop_grad))),
                                 ("bl", bwd, ring.hop_grad)):
            u = self.v("u", name, r, m, j)
            self.add(_plus((1, comp), ((1 - o), comm), (-1, {u: 1})), -np.inf, 0)
            self.add(_plus((1, comm), ((1 - o), comp), (-1, {u: 1})), -np.inf, 0)
            steps.append(u)
        per_layer = _plus(((N - 1), {steps[0]: 1}), (1, fwd), ((N - 1), {steps[1]: 1}), (1, {steps[2]: 1}))
        self.add(_plus((c.c_mb, {Y: 1}), (c.a * c.lin_flops, tok), (L, per_layer), (-1, {self.v("T", r, m): 1})),
                 -np.inf, 0)

    def solve(self, time_limit):
        """Minimise obj with scipy's HiGHS: x, d, y, z binary, the rest non-negative."""
        from scipy.optimize import Bounds, LinearConstraint, milp as highs
        from scipy.sparse import coo_matrix
        integrality = np.array([1 if k[0] in ("x", "d", "y", "z") else 0 for k in self.columns], dtype=int)
        obj = np.zeros(len(self.columns))
        obj[self.columns[("obj",)]] = 1.0
        r_, c_, x_ = zip(*[(i, col, val) for i, row in enumerate(self.rows) for col, val in row.items()])
        A = coo_matrix((x_, (r_, c_)), shape=(len(self.rows), len(self.columns))).tocsr()
        return highs(obj, constraints=LinearConstraint(A, self.lo, self.hi), integrality=integrality,
                     bounds=Bounds(np.zeros(len(self.columns)), np.where(integrality == 1, 1.0, np.inf)),
                     options={"time_limit": time_limit, "mip_rel_gap": 1e-6})

    def plan(self, val, dp, n_slots):
        """The plan of a solution (val: each column's value, rounded), empty slots left out."""
        n, N, col = len(self.lengths), self.cp, self.columns
        plan = []
        for r in range(dp):
            mbs = []
            for m in range(n_slots):
                mb = MicroBatch([i for i in range(n) if N > 1 and val[col[("d", i, r, m)]]],
                                [[i for i in range(n) if val[col[("x", i, r, m, j)]]] for j in range(N)])
                if mb.distributed or any(mb.local):
                    mbs.append(mb)
            plan.append(mbs)
        return plan

# -----------------------------------------------------------------------------
# 2. optimality gaps


def gap_instances(n_instances=12, seed=0, bucket_size=26_000):
    """Fixed small instances: (lengths, dp, cp, bucket_size). Long-tail lengths around the paper's 0.5B
    bucket (26K), 5-7 sequences, dp 1 or 2, cp 2 or 4, some too long to stay local."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n_instances:
        n = int(rng.integers(5, 8))
        dp, cp = int(rng.choice([1, 2])), int(rng.choice([2, 4]))
        lengths = [int(x) for x in np.exp(rng.uniform(np.log(256), np.log(1.6 * bucket_size), size=n))]
        if max(padded_len(s, cp) // cp for s in lengths) <= bucket_size:
            out.append((lengths, dp, cp, bucket_size))
    return out


def optimality_gaps(instances=None, cost=None, max_mb=3, time_limit=20.0, policies=("skrull", "skrull_plus")):
    """For each instance: (MILP lower bound, MILP plan under CostModel, {policy: CostModel time}), every
    time the slowest DP rank's sum of micro-batch times (sync=True, no optimizer step)."""
    cost = cost or default_cost()
    out = []
    for lengths, dp, cp, C in instances or gap_instances():
        lb, plan = milp(lengths, dp, cp, C, cost, max_mb=max_mb, time_limit=time_limit)
        ub = cost.predict_step_time(plan, lengths, sync=True, include_step=False)
        t = {p: cost.predict_step_time(schedule(lengths, dp=dp, cp=cp, bucket_size=C, policy=p, cost=cost),
                                       lengths, sync=True, include_step=False) for p in policies}
        out.append((lb, ub, t))
    return out


def report_gaps(time_limit=20.0, policies=("skrull", "skrull_plus")):
    res = optimality_gaps(time_limit=time_limit, policies=policies)
    lb = np.array([r[0] for r in res])
    ub = np.array([r[1] for r in res])
    print(f"MILP optimum vs the heuristics ({len(res)} fixed instances: 5-7 seqs, DP 1-2, CP 2/4, <= 3 micro-batches "
          f"per DP rank, C=26K, 0.5B H100 constants; time = slowest DP rank, micro-batches as barriers):")
    print(f"  MILP bound <= best plan <= MILP plan: the bound is {np.mean(ub / lb - 1) * 100:.1f}% below its own plan on average")
    name_width = max([11] + [len(p) for p in policies])
    for p in policies:
        t = np.array([r[2][p] for r in res])
        g, gu = t / lb - 1, t / np.minimum(ub, t) - 1
        print(f"  {p:{name_width}s} gap to the bound: mean {g.mean() * 100:5.1f}% max {g.max() * 100:5.1f}%   "
              f"to the best plan found (MILP's or its own): mean {gu.mean() * 100:5.1f}% max {gu.max() * 100:5.1f}%")

# -----------------------------------------------------------------------------
# 3. simulator of the paper's setup


SETUPS = [  # (label, model, bucket, dp, cp, batch_size per DP rank, datasets) -- the paper's evaluation
    ("Qwen2.5-0.5B", "qwen2.5-0.5b", 26_000, 4, 8, 64, ("wikipedia", "lmsys", "chatqa2")),
    ("Qwen2.5-7B", "qwen2.5-7b", 13_000, 4, 8, 64, ("wikipedia", "lmsys")),
    ("Qwen2.5-7B", "qwen2.5-7b", 13_000, 2, 16, 40, ("chatqa2",)),
]
PAPER = {"0.5b": 5.50, "7b": 2.03, "overall": 3.76, "sorted": 3.45}  # average speedups reported


def sample_global_batch(dist, n, rng, max_len):
    """n lengths from paper Table 1 (data/synthetic.py), unscaled; truncated at max_len = cp*C, the
    longest sequence the CP group can hold (only LMsysChat1M's 0.01% tail beyond 128K is affected)."""
    from data.synthetic import sample_lengths
    return [int(s) for s in np.minimum(sample_lengths(dist, n, rng), max_len)]


def plot_loads(path, lengths, plans, cost):
    """PNG: estimated busy seconds of every rank (DP x CP) for one batch, one panel per policy."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(plans), figsize=(6 * len(plans), 3.5), sharey=True)
    for ax, (name, plan) in zip(np.atleast_1d(axes), plans.items()):
        busy = [sum(cost.rank_times(mb, lengths)[j] for mb in mbs) for mbs in plan
                for j in range(len(mbs[0].local) if mbs else 1)]
        ax.bar(range(len(busy)), busy)
        ax.set_title(f"{name}: step {cost.predict_step_time(plan, lengths) * 1e3:.0f} ms (est.)")
        ax.set_xlabel("rank (DP-major)")
    np.atleast_1d(axes)[0].set_ylabel("busy time, s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def schedule_overhead(lengths, dp, cp, bucket_size, cost, policy, repeats=30):
    """(wall, CPU) seconds of schedule(...), one pair per repeat. The CPU time (time.process_time) is
    the scheduler's own work; on a shared machine the wall time also holds the time other processes
    had the core."""
    times = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        schedule(lengths, dp=dp, cp=cp, bucket_size=bucket_size, policy=policy, cost=cost)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


BASELINES = ("naive", "sorted", "dacp")  # the paper's comparisons; the table's summary also needs skrull, skrull_plus


def simulate(n_batches=8, seed=0, png="skrull_loads.png", gap=True, const=None, policies=None):
    """The table for `policies` (default: every name in scheduler.POLICIES); the summary columns and lines
    always come from naive, sorted, skrull and skrull_plus, which run too. Then the scheduling overhead
    and (gap=True) the MILP gaps of the policies that are not baselines."""
    const = const or {}
    shown = list(policies or POLICIES)
    run = list(dict.fromkeys(shown + ["naive", "sorted", "skrull", "skrull_plus"]))
    searched = [p for p in shown if p not in BASELINES]  # overhead and MILP gaps
    width = {p: max(12, len(p) + 1) for p in shown}
    print(f"Predicted step time (ms, mean over {n_batches} global batches from paper Table 1 length "
          f"distributions) under scheduler.CostModel with H100 constants (assumptions: scheduler.H100)" +
          (f", except {', '.join(f'{k}={v:g}' for k, v in const.items())}" if const else "") + ".")
    hdr = f"{'model':13s} {'C':>4s} {'DPxCP':>6s} {'BS':>3s} {'dataset':10s} " + \
          "".join(f"{p:>{width[p]}s}" for p in shown) + f"{'bound':>9s} {'plus/skrull':>12s} {'possible':>9s} {'worst batch':>12s}"
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(seed)  # one stream through every setup and dataset, in order
    speed = {"0.5b": [], "7b": [], "sorted": []}  # per batch: naive/skrull (by model), sorted/skrull
    plot_batch = None
    for label, model, C, dp, cp, bs, datasets in SETUPS:
        cost = CostModel(model)
        for k, v in const.items():
            setattr(cost, k, v)
        for ds in datasets:
            batches, mean, bound = _run_batches(ds, cost, C, dp, cp, bs, run, n_batches, rng)
            ratios = [t["skrull_plus"] / t["skrull"] for _, t in batches]
            speed["0.5b" if model == "qwen2.5-0.5b" else "7b"] += [t["naive"] / t["skrull"] for _, t in batches]
            speed["sorted"] += [t["sorted"] / t["skrull"] for _, t in batches]
            if plot_batch is None and model == "qwen2.5-0.5b" and ds == "chatqa2":
                plot_batch = (batches[0][0], dp, cp, C, cost)
            print(f"{label:13s} {C // 1000:>3d}K {dp:>2d}x{cp:<3d} {bs:>3d} {ds:10s} " +
                  "".join(f"{mean[p] * 1e3:{width[p]}.1f}" for p in shown) +
                  f"{bound * 1e3:9.1f} {(1 - mean['skrull_plus'] / mean['skrull']) * 100:10.1f}% "
                  f"{(1 - bound / mean['skrull']) * 100:7.1f}% {(1 - max(ratios)) * 100:10.1f}%")
    print("-" * len(hdr))
    _print_summary(speed)
    _plot(png, *plot_batch)
    _report_overhead(searched, seed)
    if gap and searched:
        report_gaps(policies=searched)


def _run_batches(ds, cost, C, dp, cp, bs, policies, n_batches, rng):
    """n_batches global batches of dataset `ds` through every policy: ([(lengths, {policy: step time})]
    per batch, {policy: mean step time}, mean of the bound)."""
    batches, mean, bound = [], dict.fromkeys(policies, 0.0), 0.0
    for b in range(n_batches):
        lengths = sample_global_batch(ds, dp * bs, rng, cp * C)
        t = {}
        for p in policies:
            plan = schedule(lengths, dp=dp, cp=cp, bucket_size=C, policy=p, cost=cost, seed=b)
            t[p] = cost.predict_step_time(plan, lengths)
            mean[p] += t[p] / n_batches
        bound += ideal_step_time(cost, lengths, dp, cp, C) / n_batches
        batches.append((lengths, t))
    return batches, mean, bound


def _print_summary(speed):
    print("plus/skrull: how much lower skrull_plus's mean step time is than skrull's; possible: the most any plan "
          "could lower it (1 - bound/skrull);\nworst batch: the smallest per-batch reduction. bound: no plan can beat "
          "it (skrull_plus.ideal_step_time: perfect balance, communication\nhidden, the fewest calls and micro-batches; "
          "at least a micro-batch holding only the costliest sequence).")
    overall = speed["0.5b"] + speed["7b"]
    print(f"skrull vs naive (DeepSpeed):  0.5B {np.mean(speed['0.5b']):.2f}x (paper {PAPER['0.5b']:.2f}x)   "
          f"7B {np.mean(speed['7b']):.2f}x (paper {PAPER['7b']:.2f}x)   overall {np.mean(overall):.2f}x "
          f"(paper {PAPER['overall']:.2f}x)")
    print(f"skrull vs sorted (LongAlign): overall {np.mean(speed['sorted']):.2f}x (paper {PAPER['sorted']:.2f}x)")


def _plot(png, lengths, dp, cp, C, cost):
    plans = {p: schedule(lengths, dp=dp, cp=cp, bucket_size=C, policy=p, cost=cost) for p in ("naive", "skrull", "skrull_plus")}
    if png and plot_loads(png, lengths, plans, cost):
        print(f"per-rank load plot (Qwen2.5-0.5B, chatqa2): {png}")
    elif png:
        print("per-rank load plot: skipped (matplotlib is not installed; it is optional)")


def _report_overhead(policies, seed):
    """The scheduling overhead of `policies` on one paper-size global batch: 256 sequences, DP=4, CP=8."""
    cost = CostModel("qwen2.5-0.5b")
    print(f"scheduling overhead, 256 sequences, DP=4 CP=8 C=26K, 30 calls each (target <= 10 ms median); "
          f"machine load (1-minute average) {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    name_width = max([11] + [len(p) for p in policies])
    for ds in ("wikipedia", "lmsys", "chatqa2"):
        lengths = sample_global_batch(ds, 256, np.random.default_rng(seed), 8 * 26_000)
        for p in policies:
            ts = np.array(schedule_overhead(lengths, 4, 8, 26_000, cost, p)) * 1e3
            print(f"  {p:{name_width}s} ({ds:9s}): wall median {np.median(ts[:, 0]):5.2f} ms (min {ts[:, 0].min():.2f}, max "
                  f"{ts[:, 0].max():.2f}), CPU time median {np.median(ts[:, 1]):5.2f} ms")


# -----------------------------------------------------------------------------
# 4. what wrong constants cost

# Plausible machines the H100 defaults (scheduler.H100, assumptions) could be wrong about, each a change of
# the defaults: {name: constants}. "a" is the defaults' seconds per FLOP.
_A = 1.0 / (989e12 * 0.5)
MACHINES = {
    "per-sequence ring cost": dict(b_seq=15e-6),  # a fixed cost per distributed sequence per ring step (paper-style)
    "no overlap": dict(comm_overlap=0.0),         # the ring's hops hide behind nothing
    "paper-style (both)": dict(b_seq=15e-6, comm_overlap=0.0),
    "attention 2x dearer": dict(a_attn=2 * _A, a_ring=2 * _A),  # flash kernels at half the GEMMs' efficiency
    "slow network": dict(p2p_latency=100e-6, p2p_bandwidth=25e9, comm_overlap=0.5),  # a ring across nodes
    "launch-bound": dict(b_call=60e-6, c_mb=8e-3),  # 4x the fixed costs per call and micro-batch
}


def wrong_constants(n_batches=4, seed=0, policies=("skrull", "skrull_plus")):
    """For each machine in MACHINES and each paper setup: every policy's plans made with the H100 defaults and
    with the machine's own constants, both scored by the machine's CostModel (predict_step_time). Prints
    the slowdown of planning with the wrong constants (mean and worst batch) and skrull_plus vs skrull
    under each. -> {machine: {policy: [slowdown per batch]}}."""
    print(f"What wrong constants cost: plans made with the H100 defaults (scheduler.H100) and with the machine's "
          f"own constants,\nboth scored on the machine (CostModel.predict_step_time), {n_batches} global batches per "
          f"setup; slowdown = time of the defaults' plan / time of the machine's plan - 1 (mean, worst batch).")
    hdr = (f"{'machine':24s} {'setup':23s} " + "".join(f"{p + ' slowdown':>22s}" for p in policies) +
           f"{'plus vs skrull, defaults':>26s}{'plus vs skrull, right':>23s}")
    print(hdr)
    print("-" * len(hdr))
    out = {}
    for name, machine in MACHINES.items():
        out[name] = {p: [] for p in policies}
        rng = np.random.default_rng(seed)  # the same batches on every machine
        for label, model, C, dp, cp, bs, datasets in SETUPS:
            defaults = CostModel(model)
            true = defaults.with_constants(machine, source=name)
            for ds in datasets:
                t = {(p, k): [] for p in policies for k in ("defaults", "right")}
                for b in range(n_batches):
                    lengths = sample_global_batch(ds, dp * bs, rng, cp * C)
                    for p in policies:
                        for k, cost in (("defaults", defaults), ("right", true)):
                            plan = schedule(lengths, dp=dp, cp=cp, bucket_size=C, policy=p, cost=cost, seed=b)
                            t[(p, k)].append(true.predict_step_time(plan, lengths))
                slow = {p: np.array(t[(p, "defaults")]) / np.array(t[(p, "right")]) - 1 for p in policies}
                for p in policies:
                    out[name][p] += list(slow[p])
                cells = "".join(f"{slow[p].mean() * 100:11.1f}% ({slow[p].max() * 100:5.1f}%)" for p in policies)
                vs = [np.array(t[("skrull", k)]) / np.array(t[("skrull_plus", k)]) for k in ("defaults", "right")] \
                    if {"skrull", "skrull_plus"} <= set(policies) else None
                ratios = "".join(f"{r.mean():17.2f}x ({r.min():.2f})" for r in vs) if vs else ""
                print(f"{name:24s} {label + ' ' + ds:23s} {cells}{ratios}")
    print("-" * len(hdr))
    print("plus vs skrull: skrull's step time / skrull_plus's, both planned with the defaults or both with the right "
          "constants (mean, and the\nworst batch in brackets: below 1.00x skrull_plus was slower). Every plan is scored on "
          "the machine, never on the constants that made it.")
    for name in out:
        print(f"  {name:24s} " + "   ".join(f"{p}: mean {np.mean(v) * 100:.1f}%, worst {np.max(v) * 100:.1f}%"
                                              for p, v in out[name].items()))
    return out


def main(argv=None):
    times = [c for c in CONSTANTS if c not in ("bucket_size", "device_memory", "mem_per_token", "mem_static")]
    ap = argparse.ArgumentParser(description="The scheduler off-line: the paper's setups through the policies, "
                                 "the bound, the scheduling overhead and the MILP gaps.")
    ap.add_argument("--gap", action="store_true", help="only the MILP gaps")
    ap.add_argument("--wrong", action="store_true", help="only the table of what wrong constants cost (MACHINES)")
    ap.add_argument("--const", action="append", default=[], metavar="NAME=VALUE",
                    help=f"the table with another value of a cost model time constant ({', '.join(times)}); "
                         "repeatable; skips the MILP gaps")
    ap.add_argument("--policy_file", action="append", default=[], metavar="PATH",
                    help="a Python file run first (runpy) that registers policies: scheduler.POLICIES['name'] = fn")
    ap.add_argument("--policies", metavar="A,B", help="the policies to compare (default: every registered one)")
    args = ap.parse_args(argv)
    const = {}
    for item in args.const:
        name, _, value = item.partition("=")
        if name not in times:
            ap.error(f"--const {item}: {name!r} is not a time constant of the cost model (one of {', '.join(times)})")
        try:
            const[name] = float(value)
        except ValueError:
            ap.error(f"--const {item}: expected NAME=NUMBER")
    for path in args.policy_file:
        runpy.run_path(path, run_name="__policy__")
    policies = args.policies.split(",") if args.policies else list(POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"--policies: unknown {', '.join(unknown)}; registered: {', '.join(POLICIES)}")
    if args.gap and const:
        ap.error("--gap takes no --const (the MILP gaps use the default constants)")
    searched = [p for p in policies if p not in BASELINES]
    if args.wrong:
        wrong_constants()
    elif args.gap:
        report_gaps(policies=searched or ("skrull", "skrull_plus"))
    else:
        simulate(const=const, gap=not const, policies=policies)


if __name__ == "__main__":
    main()
