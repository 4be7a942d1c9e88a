"""What the online fit (costfit.Calibrator) costs rank 0, in process: folding one step's micro-batch times into
the normal equations, and one fit, on the e2e benchmark's plans (tiny model, long-tail and bimodal sets,
dp 2 x cp 1 and dp 1 x cp 2, batch_size 16 per DP rank). CPU time (time.process_time), so other work on a
shared machine does not count; the collectives (one all_gather, one broadcast per fit) are measured by the
runs themselves (metrics.jsonl fit_ms).

    python -m bench.calibration [--steps 30]
"""
import argparse
import math
import time

import numpy as np

import costfit
import skrull_plus  # noqa: F401  registers "skrull_plus"
from data.synthetic import sample_lengths
from scheduler import CostModel, schedule

TINY = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=352, vocab_size=320)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    prior = CostModel(TINY)
    print(f"costfit on rank 0, CPU ms (median, max over {args.steps} steps): fold = one step's observations into the "
          f"normal equations, fit = NNLS + the new CostModel")
    for label, dist, max_len in (("long-tail", "wikipedia", 8192), ("bimodal", "chatqa2", 4096)):
        for dp, cp in ((2, 1), (1, 2)):
            # world 1: no process group here (the broadcast is the runs' to measure); the fold reads cp only
            calib = costfit.Calibrator(prior, enabled=True, interval=1, freeze=0, world=1, cp=cp, rank=0,
                                       device="cpu", cuda=False)
            rng = np.random.default_rng(0)
            fold, fit, n_mb = [], [], []
            for step in range(args.steps):
                lengths = [int(x) for x in sample_lengths(dist, 16 * dp, rng, max_len=max_len)]
                plan = schedule(lengths, dp=dp, cp=cp, bucket_size=max_len, policy="skrull_plus", cost=calib.cost_for(step))
                times = np.full((dp * cp, max(len(m) for m in plan) + 1), math.nan)
                for d, mbs in enumerate(plan):
                    for i, mb in enumerate(mbs):
                        for j, t in enumerate(prior.rank_times(mb, lengths)):
                            times[d * cp + j, i] = t * 1e4 * (1 + 0.1 * rng.uniform(-1, 1)) if t > 0 else math.nan
                times[:, -1] = np.nansum(times[:, :-1], axis=1).max() + 0.01
                t0 = time.process_time()
                calib.fold_plan(lengths, plan, times)
                t1 = time.process_time()
                calib.fit(step)
                t2 = time.process_time()
                fold.append((t1 - t0) * 1e3)
                fit.append((t2 - t1) * 1e3)
                n_mb.append(sum(len(m) for m in plan))
            print(f"  {label:9s} dp {dp} x cp {cp}: {np.mean(n_mb):4.1f} micro-batches/step   fold {np.median(fold):6.2f} "
                  f"(max {max(fold):6.2f})   fit {np.median(fit):6.2f} (max {max(fit):6.2f})")


if __name__ == "__main__":
    main()
