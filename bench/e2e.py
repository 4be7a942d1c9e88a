"""End to end, measured against the cost model: train.py with 2 gloo processes (1 thread each) in two
layouts, dp=2 x cp=1 (GDS balances DP ranks) and dp=1 x cp=2 (DACP local vs distributed), on a
long-tail and a bimodal synthetic set (paper Table 1 shapes, scaled), every policy on the same global
batches (same seed) with the same kernels and code path: only the plan differs.

Policies whose plans are the same on every step run once (their times would differ by noise only:
"same plans"). The runs are interleaved, rep after rep in a rotated order, so the policies see the
same machine noise; each step's time is the median over reps. Beside it: CostModel's prediction for
that step's plan from the profile (fitted on the profile's own runs, never on these). Each run's
1-minute load average is printed beside the profile's: on a shared machine the two drift apart, and
so do prediction and measurement.

With --calibrate, train.py fits the cost model online (costfit.py; `--profile none`: from the H100
defaults, no profile at all): every policy runs (plans under learned constants cannot be compared ahead),
"predicted" is each run's own prediction for its plan by the constants that planned it (metrics.jsonl
pred_ms), and the constants fitted by the end of the runs are printed per cell. Each run's constants and
predictions follow the load it met, so the plans are then compared without it (`replan`, also on its own:
--replan DIR, the kept run directory): every cell's batches re-planned under one set of constants, the
median of what its runs fitted, and scored under it; and each skrull_plus run's steps re-planned under
that run's own constants, against skrull's plan under the same constants and the skrull runs' own plans.

    python -m bench.e2e [--profile profile_cpu.json|none] [--calibrate] [--calibrate_interval 1] [--iters 6]
                        [--warmup 1] [--reps 3] [--batch_size 16] [--policies naive,skrull,skrull_plus]
                        [--policy_file my_policy.py] [--seed 1337] [--replan DIR]
"""
import argparse
import json
import os
import runpy
import tempfile
import time

import numpy as np

from bench.common import load_average, train_run
import skrull_plus  # noqa: F401  registers "skrull_plus"
from scheduler import POLICIES, CostModel, schedule

# (name, Table 1 shape, max_len = bucket_size): the long-tail set at the CPU config's 8192 tokens,
# the bimodal one at 4096 (its mean sample is 10x longer, so steps are 10x dearer)
SETS = (("long-tail", "wikipedia", 8192), ("bimodal", "chatqa2", 4096))
LAYOUTS = ((2, 1), (1, 2))  # (dp, cp), 2 processes each


def plan_key(plan):
    """A plan up to what its time does not depend on: the order of DP ranks, of micro-batches, of CP
    ranks and of the distributed sequences (a rank's local sequences keep their order: it sets how
    dacp_attention slices them over the ring steps)."""
    return tuple(sorted(tuple(sorted((tuple(sorted(mb.distributed)), tuple(sorted(tuple(loc) for loc in mb.local)))
                                     for mb in mbs)) for mbs in plan))


def distinct_policies(plans):
    """-> ({policy: the first policy with its plans on every step}, the policies to run). E.g. naive and
    dacp without CP: their measured times would differ by noise only."""
    same, runs = {}, []
    for p, steps in plans.items():
        key = tuple(plan_key(plan) for plan in steps)
        first = next((q for q in runs if tuple(plan_key(plan) for plan in plans[q]) == key), None)
        same[p] = first or p
        if first is None:
            runs.append(p)
    return same, runs


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="profile_cpu.json",
                    help="made by `python calibrate.py` if missing; `none`: no profile (the H100 defaults)")
    ap.add_argument("--calibrate", action="store_true", help="train.py fits the cost model online (calibrate=True)")
    ap.add_argument("--calibrate_interval", type=int, default=1, help="train.py's calibrate_interval")
    ap.add_argument("--iters", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the timing")
    ap.add_argument("--reps", type=int, default=3, help="runs per policy and cell, interleaved")
    ap.add_argument("--batch_size", type=int, default=16, help="sequences per DP rank per step")
    ap.add_argument("--policy_file", action="append", default=[], metavar="PATH",
                    help="a policy file (see the README), registered here and passed to every train.py run; repeatable")
    ap.add_argument("--policies", default=None, help="comma-separated (default: every registered policy)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--replan", metavar="DIR", help="only the re-planning of an earlier --calibrate run's directory")
    args = ap.parse_args(argv)
    for path in args.policy_file:
        runpy.run_path(path)  # registers its policy in scheduler.POLICIES, as train.py's configurator will
    args.policies = args.policies or ",".join(POLICIES)
    args.policies = args.policies.split(",")
    bad = [p for p in args.policies if p not in POLICIES]
    if bad or args.iters <= args.warmup or args.reps < 1 or args.batch_size < 1:
        raise SystemExit(f"python -m bench.e2e: need known policies ({', '.join(POLICIES)}; got {', '.join(bad) or 'ok'}), "
                         f"iters > warmup, reps >= 1, batch_size >= 1")
    return args


def run_cell(args, cost, shape, data, ds, dp, cp, max_len, tmp, loads, label):
    """One (data set, layout) cell: every policy's plans and predicted step times, then the distinct
    policies run rep after rep in a rotated order. -> (predicted, measured, same), measured being per
    policy an array (reps, timed steps) of seconds."""
    from data.prepare import global_batch, heldout_split
    steps = range(args.warmup, args.iters)
    # the global batches train.py draws (its training split: nothing is held out, eval_fraction=0)
    train_ids, _ = heldout_split(len(ds), 0.0, args.seed)
    batches = [[int(ds.lengths[i]) for i in train_ids[global_batch(len(train_ids), dp * args.batch_size, it, args.seed)]]
               for it in range(args.iters)]
    plans = {p: [schedule(b, dp=dp, cp=cp, bucket_size=max_len, policy=p, cost=cost, seed=args.seed + it)
                 for it, b in enumerate(batches)] for p in args.policies}
    pred = {p: np.array([cost.predict_step_time(plans[p][it], batches[it]) for it in steps]) for p in args.policies}
    same, runs = distinct_policies(plans) if not args.calibrate else ({p: p for p in args.policies}, list(args.policies))
    meas = {p: [] for p in runs}  # per rep: the timed steps' seconds
    run_pred, constants = {p: [] for p in runs}, []  # with --calibrate: the runs' own predictions, fitted constants
    for rep in range(args.reps):
        for p in runs[rep % len(runs):] + runs[:rep % len(runs)]:  # each rep in a rotated order
            loads.append(load_average())
            m = train_run(os.path.join(tmp, f"{shape}_{dp}x{cp}_{p}_{rep}"), dp * cp, dict(
                dataset=data, cp=cp, schedule=p, bucket_size=max_len, batch_size=args.batch_size,
                max_iters=args.iters, checkpoint_interval=0, threads=1, seed=args.seed, eval_fraction=0.0,
                calibrate=args.calibrate, calibrate_interval=args.calibrate_interval,
                **({"profile": args.profile} if args.profile != "none" else {})), extra_configs=args.policy_file)
            meas[p].append(np.array([r["dt_ms"] / 1e3 for r in m[args.warmup:]]))
            run_pred[p].append(np.array([r["pred_ms"] / 1e3 for r in m[args.warmup:]]))
            constants.append([r["cost_constants"] for r in m if "cost_constants" in r][-1])
        print(f"  {label} dp={dp} cp={cp} rep {rep}: " + "  ".join(f"{p} {meas[p][-1].sum():.2f}s" for p in runs), flush=True)
    if args.calibrate:
        pred = {p: np.median(run_pred[p], axis=0) for p in runs}
        errs = {p: np.abs(np.array(run_pred[p]) / np.array(meas[p]) - 1).ravel() for p in runs}
        print("    constants at the end (median over the cell's runs): " + "  ".join(
            f"{k} {np.median([c[k] for c in constants]):.3g}" for k in constants[0]), flush=True)
    else:
        errs = None
    return pred, {p: np.array(meas[same[p]]) for p in args.policies}, same, errs


def print_steps(args, cells, n_steps, elapsed, loads, prof_meta):
    source = (f"train.py's online fit (calibrate_interval {args.calibrate_interval}, prior "
              f"{'H100 defaults' if args.profile == 'none' else args.profile}), each run's own prediction" if args.calibrate
              else f"scheduler.CostModel with {args.profile}")
    print(f"\nend to end, tiny model, 2 processes x 1 thread, gloo, {n_steps} timed steps x {args.reps} interleaved runs "
          f"per policy and cell, batch_size {args.batch_size}/DP rank, bucket = max_len; predicted = {source}; a step's "
          f"measured time is its median over the runs")
    pl = prof_meta.get("load")
    print(f"{elapsed:.0f} s; machine load (1-minute average) at the runs' starts {min(loads):.1f}-{max(loads):.1f}, "
          f"at the profile ({prof_meta.get('taken', '?')}) " + (f"{pl[0]:.1f}-{pl[1]:.1f}" if pl else "not recorded"))
    print("\nper step (ms, median over the timed steps of the per-step values) and per-step error |pred/meas - 1|:")
    print("| data | dp x cp | policy | measured ms/step | spread over runs | predicted ms/step | median per-step error |")
    print("|---|---|---|---|---|---|---|")
    all_err = []
    for label, dp, cp, pred, meas, same, errs in cells:
        for p in args.policies:
            per_step = np.median(meas[p], axis=0)
            err = errs[p] if errs else np.abs(pred[p] / per_step - 1)  # calibrating: each run against its own prediction
            if same[p] == p:  # a policy with another's plans adds nothing new
                all_err += list(err)
            run_tot = meas[p].sum(axis=1) / n_steps
            print(f"| {label} | {dp}x{cp} | {p}{'' if same[p] == p else f' (= {same[p]})'} | {np.median(per_step) * 1e3:.1f} | {run_tot.min() * 1e3:.1f}-{run_tot.max() * 1e3:.1f} "
                  f"| {np.median(pred[p]) * 1e3:.1f} | {np.median(err) * 100:.0f}% |")
    print(f"median absolute per-step error over every step, policy and cell: {np.median(all_err) * 100:.1f}% "
          f"(mean {np.mean(all_err) * 100:.1f}%, max {np.max(all_err) * 100:.0f}%)")


def print_speedups(policies, cells):
    pairs = [(a, b) for a, b in (("skrull_plus", "skrull"), ("skrull_plus", "naive"), ("skrull", "naive"),
                                 ("skrull_plus", "sorted"), ("skrull_plus", "dacp")) if a in policies and b in policies]
    known = {p for pair in pairs for p in pair}
    pairs += [(p, policies[0]) for p in policies[1:] if p not in known]  # a policy of your own: against the first
    print("\nspeedups (time of the second policy / time of the first, summed over the timed steps); spread = min-max over "
          "the runs paired by rep:")
    print("| data | dp x cp | " + " | ".join(f"{a} vs {b}: measured (spread) / predicted" for a, b in pairs) + " |")
    print("|---|---|" + "---|" * len(pairs))
    worst = 0.0
    for label, dp, cp, pred, meas, same, _ in cells:
        out = []
        for a, b in pairs:
            if same[a] == same[b]:
                out.append("same plans")
                continue
            tot = {p: np.median(meas[p], axis=0).sum() for p in (a, b)}
            m_ratio, p_ratio = tot[b] / tot[a], pred[b].sum() / pred[a].sum()
            reps = meas[b].sum(axis=1) / meas[a].sum(axis=1)
            worst = max(worst, abs(p_ratio / m_ratio - 1))
            out.append(f"{m_ratio:.2f}x ({reps.min():.2f}-{reps.max():.2f}) / {p_ratio:.2f}x")
        print(f"| {label} | {dp}x{cp} | " + " | ".join(out) + " |")
    print(f"largest gap between a predicted and a measured speedup: {worst * 100:.0f}%")


def replan(args, tmp):
    """The --calibrate cells' global batches re-planned offline under one set of constants per cell (the median
    of the constants its runs had fitted by their last step) and scored under it: skrull and naive against
    skrull_plus, and skrull_plus planned with the H100 defaults instead."""
    import glob
    from data.prepare import global_batch, heldout_split, load_dataset
    from model import PRESETS
    defaults = CostModel({**PRESETS["tiny"].__dict__, "vocab_size": 320})
    print("\nplans under each cell's fitted constants (median over its runs, at their last step), timed steps; "
          "ratios of predicted step times, summed (per step: min-max):")
    for label, shape, max_len in SETS:
        ds = load_dataset(os.path.join(tmp, shape))
        train_ids, _ = heldout_split(len(ds), 0.0, args.seed)
        for dp, cp in LAYOUTS:
            fits = [[json.loads(line)["cost_constants"] for line in open(f) if "cost_constants" in line][-1]
                    for f in glob.glob(os.path.join(tmp, f"{shape}_{dp}x{cp}_*", "metrics.jsonl"))]
            cost = defaults.with_constants({k: float(np.median([c[k] for c in fits])) for k in fits[0]})
            t, same = {p: [] for p in ("naive", "skrull", "skrull_plus", "skrull_plus, H100 plans")}, 0
            for it in range(args.warmup, args.iters):
                b = [int(ds.lengths[i]) for i in train_ids[global_batch(len(train_ids), dp * args.batch_size, it, args.seed)]]
                plans = {p: schedule(b, dp=dp, cp=cp, bucket_size=max_len, policy=p, cost=cost, seed=args.seed + it)
                         for p in ("naive", "skrull", "skrull_plus")}
                plans["skrull_plus, H100 plans"] = schedule(b, dp=dp, cp=cp, bucket_size=max_len, policy="skrull_plus",
                                                            cost=defaults, seed=args.seed + it)
                same += plan_key(plans["skrull"]) == plan_key(plans["skrull_plus"])
                for p in t:
                    t[p].append(cost.predict_step_time(plans[p], b))
            t = {p: np.array(v) for p, v in t.items()}
            def ratio(a, b):
                return f"{t[a].sum() / t[b].sum():.3f}x ({(t[a] / t[b]).min():.3f}-{(t[a] / t[b]).max():.3f})"
            print(f"  {label:9s} {dp}x{cp}: skrull/skrull_plus {ratio('skrull', 'skrull_plus')}   naive/skrull_plus "
                  f"{ratio('naive', 'skrull_plus')}   skrull/(skrull_plus, H100 plans) "
                  f"{ratio('skrull', 'skrull_plus, H100 plans')}   skrull_plus = skrull's plan on {same}/{len(t['skrull'])} steps")
            own_constants(args, tmp, ds, train_ids, shape, dp, cp, max_len, defaults)


def own_constants(args, tmp, ds, train_ids, shape, dp, cp, max_len, defaults):
    """Each run planned with its own fitted constants. Per timed step of every skrull_plus run: skrull's plan
    under the constants that planned that step (metrics.jsonl) against skrull_plus's, and against the plan the
    skrull runs actually ran (under their own constants) for the same step."""
    import glob
    from data.prepare import global_batch

    def in_force(path):  # step -> the constants that planned it (logged when they change)
        out, cur = {}, None
        for line in open(path):
            rec = json.loads(line)
            if "iter" in rec:
                cur = rec.get("cost_constants", cur)
                out[rec["iter"] - 1] = cur
        return out
    runs = {p: [in_force(f) for f in sorted(glob.glob(os.path.join(tmp, f"{shape}_{dp}x{cp}_{p}_[0-9]*", "metrics.jsonl")))]
            for p in ("skrull", "skrull_plus")}
    same = other = n = 0
    gains = []
    for it in range(args.warmup, args.iters):
        b = [int(ds.lengths[i]) for i in train_ids[global_batch(len(train_ids), dp * args.batch_size, it, args.seed)]]
        kw = dict(dp=dp, cp=cp, bucket_size=max_len, seed=args.seed + it)
        ran = {plan_key(schedule(b, policy="skrull", cost=defaults.with_constants(r[it]), **kw)) for r in runs["skrull"]}
        for r in runs["skrull_plus"]:
            cost = defaults.with_constants(r[it])
            plans = {p: schedule(b, policy=p, cost=cost, **kw) for p in ("skrull", "skrull_plus")}
            n += 1
            same += plan_key(plans["skrull"]) == plan_key(plans["skrull_plus"])
            other += plan_key(plans["skrull"]) not in ran
            gain = cost.predict_step_time(plans["skrull"], b) / cost.predict_step_time(plans["skrull_plus"], b) - 1
            if gain:
                gains.append(gain)
    print(f"      under each skrull_plus run's own constants: skrull_plus = skrull's plan on {same}/{n} run-steps"
          + (f" (predicted gain on the others: median {np.median(gains) * 100:.2f}%, max {max(gains) * 100:.2f}%)" if gains else "")
          + f"; that skrull plan is none of the skrull runs' own plans for the step on {other}/{n}")


def main(argv=None):
    from data.prepare import load_dataset
    from data.synthetic import make_synthetic
    args = parse_args(argv)
    if args.replan:
        return replan(args, args.replan)
    if args.profile == "none":
        from model import PRESETS  # the tiny model as train.py makes it for the byte-level synthetic sets
        cost, prof_meta = CostModel({**PRESETS["tiny"].__dict__, "vocab_size": 320}), {}
    else:
        if not os.path.exists(args.profile):
            import calibrate
            print(f"{args.profile} not found: profiling this machine first", flush=True)
            calibrate.main(["--out", args.profile])
        cost = CostModel.from_profile(None, args.profile)
        with open(args.profile) as f:
            prof_meta = json.load(f)
    t_start, loads, cells = time.time(), [], []
    tmp = tempfile.mkdtemp(prefix="skrull_e2e_")  # kept: run logs for inspection
    for label, shape, max_len in SETS:
        data = make_synthetic(os.path.join(tmp, shape), dist=shape, n=2000, max_len=max_len, seed=0, verbose=False)
        ds = load_dataset(data)
        for dp, cp in LAYOUTS:
            cells.append((label, dp, cp, *run_cell(args, cost, shape, data, ds, dp, cp, max_len, tmp, loads, label)))
    print_steps(args, cells, args.iters - args.warmup, time.time() - t_start, loads, prof_meta)
    print_speedups(args.policies, cells)
    if args.calibrate:
        replan(args, tmp)


if __name__ == "__main__":
    main()
