"""
Online calibration (costfit.py): the NNLS against scipy's, the fit recovering a known machine's constants
from its micro-batch times, the CUDA path's one-step-late reading, which constants plan which step; and
train.py with calibration on: ranks agree, losses stay those of fixed constants, and a resumed run plans and
fits as the uninterrupted one (a simulated machine, SIMULATED_MACHINE, makes the times deterministic).
"""
import json
import math

import numpy as np
import pytest
import torch

import costfit
import skrull_plus  # noqa: F401  registers "skrull_plus"
from conftest import train_all
from scheduler import CostModel, schedule

# a machine unlike the H100 defaults: attention 20x dearer than the linear layers, large fixed costs
MACHINE = dict(a=2e-11, a_attn=4e-10, a_ring=5e-10, b_call=2e-4, b_seq=3e-5, c_mb=4e-3, t_optim=0.01)
TINY = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=352, vocab_size=320)


def test_nnls_matches_scipy():
    scipy_nnls = pytest.importorskip("scipy.optimize").nnls
    rng = np.random.default_rng(0)
    for trial in range(40):
        m, n = rng.integers(6, 40), rng.integers(1, 8)
        A = rng.normal(size=(m, n)) * rng.uniform(0.1, 10, size=n)
        b = rng.normal(size=m) * 3
        want, _ = scipy_nnls(A, b)
        got = costfit.nnls(A, b)
        assert (got >= 0).all()
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9, err_msg=f"trial {trial}")


def observe(calib, cost, lengths, plan, times_of):
    """Fold one step of `plan` into calib as rank 0 of a one-rank world would, times from `times_of`."""
    times = np.full((calib.world, max(len(m) for m in plan) + 1), math.nan)
    for i, mb in enumerate(plan[0]):
        times[0, i] = times_of(mb, lengths)
    times[0, -1] = 1.0
    calib.fold_plan(lengths, plan, times)


def test_fit_recovers_a_machine_and_keeps_the_scaled_prior_where_uninformed():
    prior = CostModel(TINY)
    true = prior.with_constants(MACHINE)
    calib = costfit.Calibrator(prior, enabled=True, interval=1, freeze=0, world=1, cp=1, rank=0, device="cpu", cuda=False)
    rng, ratios = np.random.default_rng(1), []
    for step in range(12):
        lengths = [int(x) for x in rng.integers(8, 3000, size=12)]
        plan = schedule(lengths, dp=1, cp=1, bucket_size=4096, policy="skrull", cost=prior)
        observe(calib, prior, lengths, plan, lambda mb, lengths: true.rank_times(mb, lengths)[0])
        ratios += [prior.rank_times(mb, lengths)[0] / true.rank_times(mb, lengths)[0] for mb in plan[0]]
    got = costfit.fit_constants(calib.G, calib.g, calib.n, {k: getattr(prior, k) for k in costfit.FIT})
    # without CP: a_ring is never used (the prior stays); b_call and c_mb are collinear (one call per layer
    # and pass in every micro-batch) and b_seq nearly so: the ridge leaves them a little off, not their sum
    assert got["a_attn"] == pytest.approx(MACHINE["a_attn"], rel=2e-2)
    assert got["a"] == pytest.approx(MACHINE["a"], rel=0.15)  # the weakest: attention dominates this machine
    # a_ring: the prior's, at the machine's speed: times the factor that best fits the prior's predictions
    # to the measured times (relative least squares: sum(p/y) / sum((p/y)^2) over the micro-batches)
    ratios = np.array(ratios)
    assert got["a_ring"] == pytest.approx(prior.a_ring * ratios.sum() / (ratios ** 2).sum(), rel=1e-9)
    assert got["a_ring"] > 1e3 * prior.a_ring  # this machine is ~1e4 times slower than the H100 defaults
    fitted = prior.with_constants(got)  # predicts the machine's micro-batches
    lengths = [int(x) for x in rng.integers(8, 3000, size=12)]
    for mb in schedule(lengths, dp=1, cp=1, bucket_size=4096, policy="skrull", cost=prior)[0]:
        assert fitted.rank_times(mb, lengths)[0] == pytest.approx(true.rank_times(mb, lengths)[0], rel=1e-2)


def test_fit_with_cp_and_nonnegative_under_noise():
    """CP = 2 plans (ring micro-batches: the slowest rank): every constant recovered, the hops' exposed time
    too where the compute does not hide them (a CPU's gloo: 1 ms per hop, no overlap); with 30% noise on
    a machine whose b_seq is 0, no constant goes negative."""
    prior = CostModel(TINY)
    exposed = {**MACHINE, "p2p_latency": 1e-3, "comm_overlap": 0.0}
    for machine, noise in ((MACHINE, 0.0), (exposed, 0.0), ({**MACHINE, "b_seq": 0.0}, 0.3)):
        true = prior.with_constants(machine)
        calib = costfit.Calibrator(prior, enabled=True, interval=1, freeze=0, world=2, cp=2, rank=0, device="cpu", cuda=False)
        rng = np.random.default_rng(2)
        for step in range(16):
            lengths = [int(x) for x in np.exp(rng.uniform(np.log(8), np.log(4000), size=16))]
            plan = schedule(lengths, dp=1, cp=2, bucket_size=2048, policy="skrull_plus", cost=prior)
            times = np.full((2, len(plan[0]) + 1), math.nan)
            for i, mb in enumerate(plan[0]):
                t = true.rank_times(mb, lengths)
                for j in range(2):
                    if t[j] > 0:
                        times[j, i] = (max(t) if mb.distributed else t[j]) * (1 + noise * rng.uniform(-1, 1))
            times[:, -1] = 1.0
            calib.fold_plan(lengths, plan, times)
        got = costfit.fit_constants(calib.G, calib.g, calib.n, {k: getattr(prior, k) for k in costfit.FIT})
        assert all(v >= 0 for v in got.values())
        if not noise:
            for k in ("a", "a_attn", "a_ring"):
                assert got[k] == pytest.approx(machine[k], rel=2e-2), (k, got)
        if machine is exposed:  # at one cp the hops per layer go with the ring's calls per layer (b_call):
            # the split between them is the ridge's, the time of a ring micro-batch is the machine's
            assert got["p2p_latency"] == pytest.approx(1e-3, rel=0.2), got
            fitted = prior.with_constants({**got, "comm_overlap": 0.0})
            for mb in plan[0]:
                assert max(fitted.rank_times(mb, lengths)) == pytest.approx(max(true.rank_times(mb, lengths)), rel=2e-2)
            assert any(mb.distributed for mb in plan[0])


def test_timer_reads_one_step_late_on_the_cuda_path():
    """lag=1 is the CUDA path (events read when the next step ends); the CPU clock stands in for events."""
    timer = costfit.Timer(cuda=False, lag=1)
    for step in range(3):
        for i in range(2):
            timer.stop(timer.start(), i)
        ready = timer.end_step(step)
        assert [s for s, _ in ready] == ([] if step == 0 else [step - 1])
        assert all(sorted(t) == [0, 1] and min(t.values()) >= 0 for _, t in ready)
    assert [s for s, _ in timer.end_step(None, drain=True)] == [2]


@pytest.mark.cuda
def test_timer_cuda_events():
    """The CUDA path itself: event pairs, read one step late without a sync of ours."""
    timer = costfit.Timer(cuda=True)
    x = torch.randn(2048, 2048, device="cuda")
    for step in range(2):
        mark = timer.start()
        (x @ x).sum()
        timer.stop(mark, 0)
        ready = timer.end_step(step)
        torch.cuda.synchronize()  # the training loop's own per-step sync (the loss .tolist())
    assert [s for s, _ in ready] == [0] and ready[0][1][0] > 0


def test_constants_plan_from_two_steps_after_the_fit():
    prior = CostModel(TINY)
    calib = costfit.Calibrator(prior, enabled=True, interval=1, freeze=0, world=1, cp=1, rank=0, device="cpu", cuda=False)
    costfit.SIMULATED_MACHINE = MACHINE
    try:
        rng = np.random.default_rng(3)
        used = []
        for it in range(6):
            lengths = [int(x) for x in rng.integers(8, 3000, size=8)]
            used.append(calib.cost_for(it))
            plan = schedule(lengths, dp=1, cp=1, bucket_size=4096, policy="skrull", cost=used[-1], dp_rank=0)
            calib.after_step(it, lengths, plan, 1.0, {"n_microbatches": len(plan.microbatches)}, outlier=it == 2)
    finally:
        costfit.SIMULATED_MACHINE = None
    # step 0 is left out (first), step 1 fits -> plans step 3 on; step 3 follows an evaluation (left out)
    assert used[0] is used[1] is used[2] is prior
    assert used[3] is not prior and used[4] is not used[3]
    state = json.loads(json.dumps(calib.state()))  # JSON-able, as the checkpoint keeps it
    again = costfit.Calibrator(prior, enabled=True, interval=1, freeze=0, world=1, cp=1, rank=0, device="cpu", cuda=False)
    again.load_state(state)
    for step in (4, 5, 6, 7):
        assert {k: getattr(again.cost_for(step), k) for k in costfit.CONSTANTS} == \
            {k: getattr(calib.cost_for(step), k) for k in costfit.CONSTANTS}


@pytest.mark.slow
def test_train_with_calibration(tmp_path, dataset):
    """train.py on the simulated machine (deterministic times), dp = 2: the fitted constants change the plans
    (the ranks agree on them: check_ranks_agree, every step), the losses stay those of one process with
    fixed constants on the same global batches, and a run stopped at a checkpoint and resumed logs the same
    constants, predictions and bitwise the same losses as the uninterrupted run with the same checkpoints."""
    machine = tmp_path / "machine.py"
    machine.write_text(f"import costfit\ncostfit.SIMULATED_MACHINE = {MACHINE!r}\n")
    args = dict(nproc=2, schedule="skrull_plus", batch_size=8, bucket_size=512, max_iters=6, lr_decay_iters=6,
                calibrate_interval=2, checkpoint_interval=3, configs=[machine])
    full, part, fixed = train_all((tmp_path / "full", dataset, args),
                                  (tmp_path / "part", dataset, {**args, "max_iters": 3}),
                                  (tmp_path / "fixed", dataset, {**args, "nproc": 1, "batch_size": 16, "calibrate": False}))
    resumed = train_all((tmp_path / "part", dataset, {**args, "init_from": "resume"}))[0]
    consts = [(r["iter"], r["cost_constants"]) for r in full if "cost_constants" in r]
    assert len(consts) >= 2 and consts[0][0] == 1  # the prior at the start, the fits later
    assert consts[-1][1]["a_attn"] == pytest.approx(MACHINE["a_attn"], rel=0.05)
    assert [r["pred_ms"] for r in full] != [r["pred_ms"] for r in fixed]  # other constants
    torch.testing.assert_close(torch.tensor([r["loss"] for r in full]), torch.tensor([r["loss"] for r in fixed]),
                               rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["pred_ms"] for r in resumed] == [r["pred_ms"] for r in full]
    assert in_force(resumed)[3:] == in_force(full)[3:]


def in_force(records):
    """The constants that planned each step (metrics.jsonl logs them when they change)."""
    out = []
    for r in records:
        out.append(r.get("cost_constants", out[-1] if out else None))
    return out


def test_fitted_communication_is_what_the_prior_leaves_exposed():
    """A fitted model has comm_overlap 0 and the prior's communication as the compute leaves it exposed: the
    H100 defaults hide every hop (comm_overlap 1), so without a timed ring step the fit plans with no exposed
    latency and no bandwidth term, as the defaults did; a prior with half the hop hidden keeps half of it."""
    prior = CostModel(TINY)
    half = prior.with_constants({"comm_overlap": 0.5, "p2p_latency": 1e-3, "p2p_bandwidth": 2e9})
    assert costfit.exposed(half).p2p_latency == 0.5e-3 and costfit.exposed(half).p2p_bandwidth == 4e9
    assert costfit.exposed(costfit.exposed(half)).p2p_latency == 0.5e-3  # a fitted model is already exposed
    calib = costfit.Calibrator(prior, enabled=True, interval=1, freeze=0, world=1, cp=1, rank=0, device="cpu", cuda=False)
    rng, true = np.random.default_rng(3), prior.with_constants(MACHINE)
    for step in range(4):
        lengths = [int(x) for x in rng.integers(8, 3000, size=12)]
        plan = schedule(lengths, dp=1, cp=1, bucket_size=4096, policy="skrull", cost=prior)
        observe(calib, prior, lengths, plan, lambda mb, lengths: true.rank_times(mb, lengths)[0])
    calib.fit(3)
    fitted = calib.cost_for(5)
    assert (fitted.comm_overlap, fitted.p2p_latency, fitted.p2p_bandwidth) == (0.0, 0.0, costfit.NO_BANDWIDTH_TERM)
    lengths = [3000, 2500, 40]  # a ring micro-batch: the fitted model adds no communication the defaults hid
    mb = schedule(lengths, dp=1, cp=2, bucket_size=2048, policy="skrull", cost=prior)[0][0]
    no_comm = fitted.with_constants({"p2p_latency": 0.0, "p2p_bandwidth": math.inf})
    assert mb.distributed and fitted.rank_times(mb, lengths) == no_comm.rank_times(mb, lengths)
