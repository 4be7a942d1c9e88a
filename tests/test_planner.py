"""Planning ahead and planning one DP rank: the heap's DP split is the linear scan's, schedule(..., dp_rank=r)
is the whole plan's part r for every policy, and the planner process gives the plans synchronous planning
gives, under the constants each request carried, in the order train.py asks (a resumed run included)."""
from functools import partial

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import scheduler
import skrull_plus  # noqa: F401  registers "skrull_plus" (every policy is checked below)
from golden.make_golden import PROFILE
from planner import Planner
from scheduler import POLICIES, CostModel, RankPlan, gds_split, local_times, schedule


def linear_split(lengths, dp, cp, bucket_size, cost, t_local):
    """gds_split as the paper's pseudocode reads: the least-loaded rank by a scan over all DP ranks."""
    n = len(lengths)
    if dp == 1:
        return [list(range(n))]
    est = [(t_local[k] / cp if lengths[k] <= bucket_size else cost.t_dist(lengths[k], cp))
           + cost.c_mb * lengths[k] / (bucket_size * cp) for k in range(n)]
    loads, ranks = [0.0] * dp, [[] for _ in range(dp)]
    for k in sorted(range(n), key=lambda k: (-est[k], k)):
        r = min(range(dp), key=lambda r: (loads[r], len(ranks[r]), r))
        ranks[r].append(k)
        loads[r] += est[k]
    return [sorted(r) for r in ranks]


COSTS = {"default": CostModel(), "profile": CostModel.from_profile(None, PROFILE)}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 70), st.sampled_from([1, 2, 8]), st.integers(16, 5000), st.sampled_from(sorted(COSTS)),
       st.lists(st.integers(1, 40_000), min_size=1, max_size=200), st.booleans(), st.sampled_from([None, 1]))
def test_heap_split_is_the_linear_split(dp, cp, C, cost_name, lengths, repeat, lpt_round):
    """Including ties: repeated lengths give equal estimates, and equal loads break by count, then rank.
    lpt_round 1: every numpy round is taken however short, so the rounds meet these small cases too."""
    if repeat:
        lengths = lengths[:3] * 20
    cost = COSTS[cost_name]
    t_local = local_times(lengths, cost)
    default = scheduler.LPT_ROUND
    scheduler.LPT_ROUND = lpt_round or default
    try:
        assert gds_split(lengths, dp, cp, C, cost, t_local) == linear_split(lengths, dp, cp, C, cost, t_local)
    finally:
        scheduler.LPT_ROUND = default


@pytest.mark.parametrize("case", ["lmsys", "chatqa2", "wikipedia", "one_rank_takes_the_rest", "zero_costs", "equal_lengths"])
def test_split_in_rounds_is_the_linear_split(case):
    """dp 64 and 1,024-4,096 sequences, where lpt_ranks places sequences in numpy rounds: the paper's shapes,
    and the cases that end rounds early or make them short (63 ranks loaded far above the rest, every
    estimate 0 so every load ties, equal estimates) and so switch to the heap and back."""
    from simulate import sample_global_batch
    dp, cp, C, cost = 64, 8, 26_000, COSTS["default"]
    if case == "one_rank_takes_the_rest":
        lengths = [200_000] * 63 + [16] * 1_000
    elif case == "equal_lengths":
        lengths = [4096] * 1_000 + [1024] * 1_000
    else:
        lengths = sample_global_batch("lmsys" if case == "zero_costs" else case, dp * 64, np.random.default_rng(7), cp * C)
    if case == "zero_costs":
        cost = cost.with_constants({k: 0.0 for k in ("a", "a_attn", "a_ring", "b_call", "b_seq", "c_mb")})
    t_local = local_times(lengths, cost)
    assert gds_split(lengths, dp, cp, C, cost, t_local) == linear_split(lengths, dp, cp, C, cost, t_local)


def whole_split(plan):
    return [sorted(k for mb in mbs for k in [*mb.distributed, *(k for loc in mb.local for k in loc)]) for mbs in plan]


@pytest.mark.parametrize("dp,cp,C,per_rank,dist", [(3, 2, 2048, 8, "chatqa2"), (4, 4, 4096, 6, "lmsys"),
                                                    (10, 2, 4096, 5, "chatqa2"), (12, 8, 26_000, 6, "wikipedia")])
def test_rank_plan_is_the_whole_plans_part(dp, cp, C, per_rank, dist):
    """Every policy, every DP rank: what the rank plans alone is what the whole plan gives it. dp 10 and 12 are
    above skrull_plus.PLUS_GLOBAL_DP, where skrull_plus too plans one DP rank alone."""
    from data.synthetic import sample_lengths
    lengths = [int(x) for x in sample_lengths(dist, dp * per_rank, np.random.default_rng(dp), max_len=C * cp // 2, min_len=1)]
    for policy in POLICIES:
        for cost in COSTS.values():
            plan = schedule(lengths, dp=dp, cp=cp, bucket_size=C, policy=policy, cost=cost, seed=3)
            for r in range(dp):
                got = schedule(lengths, dp=dp, cp=cp, bucket_size=C, policy=policy, cost=cost, seed=3, dp_rank=r)
                assert got == RankPlan(whole_split(plan), r, plan[r]), (policy, r)


def test_rank_plan_errors():
    with pytest.raises(ValueError, match="dp_rank must be an integer in"):
        schedule([5, 6], dp=2, cp=1, bucket_size=10, dp_rank=2)

    def broken(lengths, *, dp, cp, bucket_size, cost, seed, dp_rank=None):  # forgets a sequence in the split
        plan = schedule(lengths, dp=dp, cp=cp, bucket_size=bucket_size, cost=cost, seed=seed, dp_rank=dp_rank)
        return RankPlan([s[1:] for s in plan.split], plan.dp_rank, plan.microbatches)
    POLICIES["broken_rank"] = broken
    try:
        with pytest.raises(ValueError, match="appears 0 times in the DP split"):
            schedule([5, 6, 7, 8], dp=2, cp=1, bucket_size=10, policy="broken_rank", dp_rank=0)
    finally:
        del POLICIES["broken_rank"]


def run_loop(planner, batches, start, stop, costs, evals=(), eval_every=2):
    """train.py's order of requests for steps start..stop-1: take step it (planned ahead; the first step is
    planned now, under the constants in force when step it - 1 began, which a resumed run must restore),
    submit the held-out batches under the constants that planned it when it evaluates, then step it+1 under
    the constants in force now; costs[it] is the CostModel in force when step it begins. Returns the plans
    taken."""
    taken = []
    for it in range(start, stop):
        planned = planner.take(it, batches[it], it, costs[max(it - 1, 0)])
        taken.append(("step", it, planned.plan, planned.cost))
        eval_now = (it + 1) % eval_every == 0
        for b, e in enumerate(evals if eval_now else ()):
            planner.submit(("eval", b), e, 100 + b, planned.cost)
        if it + 1 < stop:
            planner.submit(it + 1, batches[it + 1], it + 1, costs[it])
        for b, e in enumerate(evals if eval_now else ()):
            planned_eval = planner.take(("eval", b), e, 100 + b, planned.cost, keep=True)
            taken.append(("eval", b, planned_eval.plan, planned_eval.cost))
    return taken


def test_planner_plans_ahead_as_synchronous_planning():
    """The planner process and synchronous planning take the same plans; the constants that plan step s are
    those in force when step s - 1 began (a new CostModel swapped in after step 2 plans step 4 on); a run
    resumed at step 3 plans as the uninterrupted one."""
    from data.synthetic import sample_lengths
    rng = np.random.default_rng(0)
    batches = [[int(x) for x in sample_lengths("chatqa2", 16, rng, max_len=4096, min_len=1)] for _ in range(6)]
    evals = [[int(x) for x in sample_lengths("lmsys", 16, rng, max_len=4096, min_len=1)] for _ in range(2)]
    new = CostModel.from_profile(None, PROFILE)
    costs = [COSTS["default"]] * 3 + [new] * 3  # a calibration after step 2 swaps in `new`
    kw = dict(dp=2, cp=2, bucket_size=2048, policy="skrull_plus", dp_rank=1)
    fn = partial(schedule, **kw)
    ahead, again, sync = Planner(kw, ahead=True), Planner(kw, ahead=True), Planner(kw, ahead=False)
    try:
        got, want = run_loop(ahead, batches, 0, 6, costs, evals), run_loop(sync, batches, 0, 6, costs, evals)
        resumed = run_loop(again, batches, 3, 6, costs, evals)
    finally:
        ahead.close()
        again.close()
    assert got == want
    assert [c is new for kind, _, _, c in got if kind == "step"] == [False] * 4 + [True] * 2
    assert resumed == [t for t in got if t[0] != "step" or t[1] >= 3][-len(resumed):]
    assert got[-1][3] is new  # held-out batches after step 5: the constants that planned step 5
    assert got[-1][2] == fn(evals[1], seed=101, cost=new) != fn(evals[1], seed=101, cost=COSTS["default"])


def test_planner_raises_what_planning_raised():
    planner = Planner(dict(dp=1, cp=2, bucket_size=10, policy="skrull", dp_rank=0))
    try:
        planner.submit(0, [500], 0, None)
        with pytest.raises(ValueError, match="cannot fit even when distributed"):
            planner.take(0, [500], 0, None)
        assert planner.take(1, [5, 7], 0, None).plan.microbatches  # and keeps planning
    finally:
        planner.close()
