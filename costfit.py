"""
Online calibration: scheduler.CostModel's compute constants fitted from the run's own micro-batch times,
so every machine plans with its own constants, with or without an offline profile (`calibrate` in train.py).

  Timer         each micro-batch's time on this rank: wall time on CPU, CUDA events read one step later
  nnls          non-negative least squares (Lawson-Hanson active set), numpy only
  fit_constants NNLS on accumulated normal equations, with a ridge toward the prior constants
  Calibrator    what train.py calls: the timing hooks, the gather, the fit, which constants plan which
                step, the state a checkpoint keeps, and the metrics

With comm_overlap = 0, CostModel.rank_time is linear in FIT: a micro-batch's time is x . c, where column k
of x is rank_time with constant k = 1 and every other one 0 (for p2p_latency: the hops on the ring's
critical path). So the fit measures communication as what the compute did not hide (`exposed`): every
fitted model has comm_overlap = 0, p2p_latency the exposed time per hop (its prior: the prior's latency
times 1 - comm_overlap), and the prior's bandwidth term's exposed share, not fitted, which is subtracted
from the measured time before the fit (none under the H100 defaults, whose comm_overlap is 1). Rows are weighted by 1/measured
(relative error: a short micro-batch counts as much as a long one), as `calibrate.py` fits the profile.
t_optim (per step: gradient exchange, optimizer, and train.py's own work between micro-batches) is the
median of the measured step time minus the slowest rank's micro-batch times, over the last RESIDUALS steps.
"""
import math
import time

import numpy as np
import torch
import torch.distributed as dist

COMPUTE = ("a", "a_attn", "a_ring", "b_call", "b_seq", "c_mb")
FIT = COMPUTE + ("p2p_latency",)                                 # fitted from micro-batch times
CONSTANTS = FIT + ("p2p_bandwidth", "comm_overlap", "t_optim")   # what a fit sets (and the metrics log)
RIDGE = 1e-4      # ridge weight per observation, in units where every column has mean square 1
RESIDUALS = 32    # steps whose overhead (measured step - micro-batches) sets t_optim: their median
# {constant: value}, or None: "time" micro-batches and steps by this cost model instead of the clock, a machine
# whose times are known exactly (the tests' deterministic runs: fits, resume; a config file sets it)
SIMULATED_MACHINE = None

# -----------------------------------------------------------------------------
# timing


class Timer:
    """Micro-batch times on this rank. CPU: time.perf_counter around the micro-batch (the work is
    synchronous). CUDA: an event pair per micro-batch, read when the next step ends (`lag` = 1), when the
    step's own synchronisation has long completed them, so timing adds no host-device sync."""

    def __init__(self, cuda, lag=None):
        self.cuda = cuda
        self.lag = (1 if cuda else 0) if lag is None else lag
        self.current, self.waiting = [], []  # this step's marks; [(step, marks)] not read yet

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, mark, i):
        """Micro-batch i (its index in this DP rank's list) ends; `mark` is what start() returned."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.current.append((i, mark, end))

    def end_step(self, step, drain=False):
        """-> [(step, {micro-batch index: seconds})] of the steps that can be read now, oldest first;
        drain: every step (before a checkpoint: the loop's own sync has completed the events)."""
        if step is not None:
            self.waiting.append((step, self.current))
            self.current = []
        n_ready = len(self.waiting) if drain else max(0, len(self.waiting) - self.lag)
        ready, self.waiting = self.waiting[:n_ready], self.waiting[n_ready:]
        if self.cuda:
            return [(s, {i: a.elapsed_time(b) / 1e3 for i, a, b in marks}) for s, marks in ready]
        return [(s, {i: b - a for i, a, b in marks}) for s, marks in ready]

# -----------------------------------------------------------------------------
# the fit


def nnls_gram(Q, q, max_iter=None):
    """argmin_{x >= 0} x'Qx/2 - q'x for a symmetric positive definite Q: Lawson and Hanson's active-set
    NNLS (1974, chapter 23) on the normal equations (Q = A'A, q = A'b). Deterministic for given inputs."""
    Q, q = np.asarray(Q, dtype=np.float64), np.asarray(q, dtype=np.float64)
    n = len(q)
    x, free = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(q).max(initial=0.0)))
    for _ in range(max_iter or 3 * n + 10):
        w = q - Q @ x  # the negative gradient: a bound variable with w > 0 would lower the objective
        if free.all() or w[~free].max() <= tol:
            break
        free[int(np.argmax(np.where(free, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[free] = np.linalg.solve(Q[np.ix_(free, free)], q[free])
            if (z[free] > 0).all():
                x = z
                break
            # step from x towards z until the first free variable hits 0; it becomes bound again
            hit = free & (z <= 0)
            alpha = float(np.min(x[hit] / (x[hit] - z[hit])))
            x = x + alpha * (z - x)
            free &= x > tol
            x[~free] = 0.0
    return x


def nnls(A, b):
    """argmin_{x >= 0} ||Ax - b|| (scipy.optimize.nnls's problem, which the tests compare against)."""
    A, b = np.asarray(A, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return nnls_gram(A.T @ A, A.T @ b)


def fit_constants(G, g, n, prior):
    """The FIT constants minimising sum over observations of (x.c / y - target)^2 (G, g: the accumulated
    normal equations of the 1/y-weighted rows; n: their count) + RIDGE n ||D (c - prior)||^2, c >= 0.
    D scales each column to mean square 1, so the ridge weighs every constant alike and only decides
    what the data leaves open (collinear columns, e.g. b_call and c_mb when every micro-batch makes one
    call per layer). A column the data never touches (a_ring without CP) keeps its prior value.
    The prior's compute constants count at this machine's speed: they are first multiplied by the one
    factor that best scales their predictions to the measured times (the same weighted least squares). The
    H100 defaults are ~1e4 times too fast for a CPU: unscaled, a constant the data barely informs (a_ring
    before the first distributed sequence) would stay 1e4 times too small, and plans would treat the ring
    as free. One factor helps as far as the prior's shape is right (on a CPU's tiny micro-batches the
    defaults' fixed costs dominate it, and a_ring stays 60-200x small). p2p_latency is not scaled: a
    network is not slower because the processors are."""
    G, g = np.asarray(G, dtype=np.float64), np.asarray(g, dtype=np.float64)
    c0 = np.array([prior[k] for k in FIT], dtype=np.float64)
    compute = np.where([k in COMPUTE for k in FIT], c0, 0.0)
    predicted = float(compute @ G @ compute)  # the prior's squared predictions, relative to the measured times
    if n and predicted > 0:
        c0 += compute * (float(compute @ g) / predicted - 1)
    out = c0.copy()
    d = np.sqrt(np.maximum(np.diag(G), 0.0) / max(n, 1))
    seen = d > 1e-300
    if n == 0 or not seen.any():
        return dict(zip(FIT, (float(v) for v in out)))
    ds = d[seen]
    Q = G[np.ix_(seen, seen)] / np.outer(ds, ds) + RIDGE * n * np.eye(len(ds))
    q = g[seen] / ds + RIDGE * n * c0[seen] * ds
    out[seen] = nnls_gram(Q, q) / ds
    return dict(zip(FIT, (float(v) for v in out)))

# -----------------------------------------------------------------------------
# the calibrator


class Calibrator:
    """Online calibration for train.py. Every rank times its micro-batches (start/stop around each); at
    every `interval`-th step (and before a checkpoint) the not yet gathered times travel in one
    all_gather; rank 0 folds them into the normal equations, fits, and broadcasts the constants, so every
    rank builds bit-identical CostModels (a last-bit difference between BLAS builds could otherwise split
    a tie differently on one node). After `freeze` steps (0: never) the constants stay as they are.

    Which constants plan which step: a fit after step t (0-based) plans steps t+2 onward; step t+1's plan
    was made while step t ran (a planner working ahead does exactly that), so the plan of step s uses the
    constants in force when step s-1 began, and an evaluation after step t plans with step t's constants.

    Left out of the fit: a run's first step (warm-up; a resumed run's first too) and the step after a
    checkpoint or an evaluation (cold caches, a write in the background). A CostModel is never changed once made: each fit
    makes a new one (CostModel.with_constants)."""

    def __init__(self, cost, *, enabled, interval, freeze, world, cp, rank, device, cuda):
        self.prior, self.enabled, self.interval, self.freeze = cost, enabled, interval, freeze
        self.world, self.cp, self.rank, self.device = world, cp, rank, device
        self.timer = Timer(cuda)
        self.models = [(0, cost)]  # (first step it plans, CostModel), in order
        self.G, self.g, self.n = np.zeros((len(FIT), len(FIT))), np.zeros(len(FIT)), 0
        self.residuals = []        # per observed step: measured step - slowest rank's micro-batches (rank 0)
        self.steps = {}            # step -> (lengths, plan, dt): kept until its times can be read
        self.pending = []          # [(step, lengths, plan, dt, {i: seconds})] read, not gathered yet
        self.first, self.after_outlier, self.logged, self.timing = None, False, None, enabled
        self.fit_seconds = []      # rank 0: wall time of each gather + fit + broadcast (the metrics)

    # --- the constants in force ---
    def cost_for(self, step):
        """The CostModel that plans step `step` (and the evaluation after it)."""
        return next(c for s, c in reversed(self.models) if s <= step)

    def frozen(self, step):
        return bool(self.freeze) and step >= self.freeze

    # --- timing hooks (run_batch) ---
    def start(self, train):
        return self.timer.start() if self.timing and train else None

    def stop(self, mark, i):
        if mark is not None:
            self.timer.stop(mark, i)

    # --- after each optimizer step, on every rank ---
    def after_step(self, it, lengths, plan, dt, figures, outlier):
        """Step `it` is done (plan: this rank's scheduler.RankPlan; dt: its seconds on this rank; figures:
        parallelize.check_ranks_agree's, the same on every rank); outlier: a checkpoint or an evaluation
        follows it. Collects its times, and at a fit step gathers, fits and schedules the new constants."""
        if not self.enabled or self.frozen(it):
            return
        if self.first is None:
            self.first = it
        if not (it == self.first or self.after_outlier):
            self.steps[it] = (lengths, plan.microbatches, dt, figures["n_microbatches"])
        self.after_outlier = outlier
        self._read(self.timer.end_step(it))
        self.timing = not self.frozen(it + 1)
        if (it + 1) % self.interval == 0:
            t0 = time.perf_counter()
            self.gather()
            self.fit(it)
            self.fit_seconds.append(time.perf_counter() - t0)

    def _read(self, ready):
        for s, times in ready:
            if s in self.steps:
                lengths, mbs, dt, n_mb = self.steps.pop(s)
                if SIMULATED_MACHINE is not None:
                    times, dt = self._simulate(lengths, mbs)
                self.pending.append((lengths, mbs, dt, n_mb, times))

    def _simulate(self, lengths, mbs):
        """This rank's micro-batch times and step time on SIMULATED_MACHINE: its cost model's rank_times (a
        ring micro-batch: its slowest rank, as the ring makes every rank wait), and its DP rank's time plus
        t_step (the slowest rank's, the step time, is what rank 0 keeps)."""
        true = self.prior.with_constants(SIMULATED_MACHINE)
        j = self.rank % self.cp
        times = {}
        for i, mb in enumerate(mbs):
            t = true.rank_times(mb, lengths)
            if t[j] > 0:
                times[i] = max(t) if mb.distributed else t[j]
        return times, true.dp_rank_time(mbs, lengths) + true.t_step(self.world)

    def gather(self):
        """One all_gather of every rank's pending observations (rows, below); rank 0 folds them in. Every
        rank calls it at the same steps with the same pending steps and micro-batch counts (the step's most,
        from check_ranks_agree), so the sizes agree though each rank planned only its own DP rank."""
        if not self.pending:
            return
        cost = self.models[-1][1]
        blocks = [(rows(cost, lengths, mbs, times, self.rank % self.cp, n_mb), dt)
                  for lengths, mbs, dt, n_mb, times in self.pending]
        mine = torch.from_numpy(np.concatenate([np.append(r.ravel(), dt) for r, dt in blocks]))
        if self.world > 1:
            every = [torch.empty_like(mine, device=self.device) for _ in range(self.world)]
            dist.all_gather(every, mine.to(self.device))
            every = torch.stack(every).cpu().numpy()
        else:
            every = mine.numpy()[None]
        if self.rank == 0:
            at = 0
            for r, _ in blocks:
                self._fold(every[:, at:at + r.size].reshape(self.world, *r.shape), every[:, at + r.size])
                at += r.size + 1
        self.pending = []

    def _fold(self, obs, dts):
        """One step's observations into the normal equations, in a fixed order (DP rank, micro-batch, CP
        rank), so the sums do not depend on when they were gathered. obs[r, i]: rank r's row of its DP
        rank's micro-batch i (rows); dts[r]: rank r's step time (the step's: their max)."""
        for d in range(self.world // self.cp):
            for i in range(obs.shape[1]):
                group = obs[d * self.cp:(d + 1) * self.cp, i]  # [CP rank, field]
                if np.isnan(group[:, PRED]).any():  # past the end of this DP rank's micro-batches
                    continue
                t = group[:, TIME]
                if group[0, DIST]:  # the ring couples the CP ranks: the micro-batch ends with its slowest
                    # rank; the one that arrived last (the shortest measured time) did not wait to start
                    js = [int(np.argmax(group[:, LEAD]))] if np.isfinite(t).all() else []
                    ys = [float(np.min(t))] * len(js)
                else:  # independent ranks: each its own observation
                    js = [j for j in range(self.cp) if group[j, PRED] > 0 and np.isfinite(t[j]) and t[j] > 0]
                    ys = [float(t[j]) for j in js]
                for j, y in zip(js, ys):
                    x = group[j, COLUMNS:]
                    self.G += np.outer(x, x) / (y * y)
                    self.g += x * (y - group[j, COMM]) / (y * y)
                    self.n += 1
        busy = np.nansum(obs[:, :, TIME], axis=1)  # every rank's micro-batch seconds
        self.residuals = (self.residuals + [float(np.max(dts) - busy.max())])[-RESIDUALS:]

    def fold_plan(self, lengths, plan, times):
        """_fold for a whole plan (schedule()'s list over DP ranks) known in one process, as the tests and
        bench.calibration have it: times[r, i] rank r's micro-batch i, times[r, -1] its step time."""
        cost, n_mb = self.models[-1][1], max(len(mbs) for mbs in plan)
        obs = np.stack([rows(cost, lengths, plan[r // self.cp], {i: t for i, t in enumerate(times[r, :-1]) if np.isfinite(t)},
                             r % self.cp, n_mb) for r in range(self.world)])
        self._fold(obs, times[:, -1])

    def fit(self, it):
        """Rank 0 fits; every rank receives the same float64 constants and, if they changed, makes the
        CostModel that plans steps it+2 onward."""
        cost = self.models[-1][1]
        consts = torch.tensor([getattr(cost, k) for k in CONSTANTS], dtype=torch.float64)
        if self.rank == 0 and self.n:
            prior = exposed(self.prior)
            fitted = fit_constants(self.G, self.g, self.n, {k: getattr(prior, k) for k in FIT})
            fitted.update(p2p_bandwidth=prior.p2p_bandwidth, comm_overlap=0.0)  # p2p_latency: the hop time left exposed
            if self.residuals:  # t_step = t_optim + the gradient exchange (kept at the prior's terms)
                exchange = cost.t_step(self.world) - cost.t_optim
                fitted["t_optim"] = max(0.0, float(np.median(self.residuals)) - exchange)
            consts = torch.tensor([fitted.get(k, getattr(cost, k)) for k in CONSTANTS], dtype=torch.float64)
        if self.world > 1:
            consts = consts.to(self.device)
            dist.broadcast(consts, 0)
        new = dict(zip(CONSTANTS, consts.cpu().tolist()))
        if any(new[k] != getattr(cost, k) for k in CONSTANTS):
            self.models = self.models[-2:] + [(it + 2, cost.with_constants(new, source=f"online fit after step {it + 1}"))]

    # --- checkpoint ---
    def state(self):
        """A JSON-able dict: the constants in force and scheduled, and the fit's sums. Every rank calls it
        (it gathers what is pending, a collective), before checkpoint.save."""
        if self.enabled:
            self._read(self.timer.end_step(None, drain=True))
            self.gather()
        return {"models": [[s, {k: getattr(c, k) for k in CONSTANTS}] for s, c in self.models],
                "G": self.G.tolist(), "g": self.g.tolist(), "n": self.n, "residuals": self.residuals}

    def load_state(self, state):
        """Resume: the checkpoint's constants (in force at its step, and any scheduled after it) and
        the fit's sums, so the run plans and fits on as the uninterrupted one would."""
        if not state or not self.enabled:  # calibrate=False: the profile's or default constants, throughout
            return
        self.models = [(s, self.prior.with_constants(c, source="online fit (from the checkpoint)")) for s, c in state["models"]]
        self.G, self.g, self.n = np.array(state["G"]), np.array(state["g"]), int(state["n"])
        self.residuals = list(state["residuals"])

    # --- metrics (rank 0) ---
    def metrics(self, it, figures, dt):
        """metrics.jsonl keys of step `it` beside figures' pred_ms (the prediction for its plan by the model that
        planned it): the error, and the constants when they differ from the last ones logged."""
        cost = self.cost_for(it)
        rec = {"pred_err": round(figures["pred_ms"] / 1e3 / dt - 1, 4)}
        consts = {k: getattr(cost, k) for k in CONSTANTS}
        if consts != self.logged:
            rec["cost_constants"] = self.logged = consts
        if self.fit_seconds:
            rec["fit_ms"] = round(self.fit_seconds[-1] * 1e3, 3)
            self.fit_seconds = []
        return rec


def exposed(cost):
    """cost with its communication as the compute leaves it exposed: comm_overlap 0, and the latency and
    the bandwidth term scaled by 1 - comm_overlap (a fitted model is already so: the same constants)."""
    hidden = cost.comm_overlap
    if hidden == 0:
        return cost
    return cost.with_constants({"comm_overlap": 0.0, "p2p_latency": cost.p2p_latency * (1 - hidden),
                                "p2p_bandwidth": cost.p2p_bandwidth / (1 - hidden) if hidden < 1 else NO_BANDWIDTH_TERM})


NO_BANDWIDTH_TERM = 1e30  # B/s: a bandwidth term of ~1e-23 s per hop, none to speak of (JSON has no infinity)


def _unit_models(cost):
    """One CostModel per FIT constant: that constant 1, the others 0, no bandwidth term and no overlap, so
    that rank_time is the constant's column of the linear model."""
    zero = dict.fromkeys(FIT, 0.0)
    off = {"p2p_bandwidth": math.inf, "comm_overlap": 0.0}
    return [cost.with_constants({**zero, **off, k: 1.0}) for k in FIT]


# one row per micro-batch and rank, what a rank contributes to the all_gather (nan: no such micro-batch, or no time)
TIME, PRED, COMM, LEAD, DIST, COLUMNS = range(6)  # then one column per FIT constant


def rows(cost, lengths, mbs, times, cp_rank, n_mb):
    """This rank's observations of its DP rank's micro-batches `mbs` ({index: measured seconds} in times),
    padded to n_mb rows: measured time, the time `cost` predicts for this CP rank, what the exposed
    bandwidth term adds (in no column), whether this rank is the micro-batch's slowest by the prediction
    (the one a ring micro-batch is fitted on), whether the micro-batch is distributed, and this rank's
    column of the linear model."""
    units = _unit_models(cost)
    nocomm = cost.with_constants({"p2p_latency": 0.0, "p2p_bandwidth": math.inf})
    bandwidth = exposed(cost).with_constants({"p2p_latency": 0.0})  # the exposed bandwidth term alone
    out = np.full((n_mb, COLUMNS + len(FIT)), math.nan)
    for i, mb in enumerate(mbs):
        pred = cost.rank_times(mb, lengths)
        comm = bandwidth.rank_times(mb, lengths)[cp_rank] - nocomm.rank_times(mb, lengths)[cp_rank]
        out[i, :COLUMNS] = (times.get(i, math.nan), pred[cp_rank], comm,
                            float(int(np.argmax(pred)) == cp_rank), float(bool(mb.distributed)))
        out[i, COLUMNS:] = [u.rank_times(mb, lengths)[cp_rank] for u in units]
    return out


if __name__ == "__main__":  # python costfit.py OUT_DIR > constants.json: the run's last constants as a profile
    import json
    import os
    import sys
    with open(os.path.join(sys.argv[1], "metrics.jsonl")) as f:
        logged = [r["cost_constants"] for r in map(json.loads, f) if "cost_constants" in r]
    json.dump({"device": f"online fit of {sys.argv[1]}", **logged[-1]}, sys.stdout, indent=1)
    print()
