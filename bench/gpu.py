"""The one GPU check: the first thing to run on a machine lent a GPU. Every CUDA path one GPU can check, the
most valuable first, each part in a process of its own under its own time limit, the results written to a
file after every part (a run cut short keeps what it measured).

    python -m bench.gpu                                   # at most 8 minutes on one H100/H200 (PARTS' limits)
    python -m bench.gpu --parts correctness               # the correctness rows only, at most 2 minutes
    python -m bench.gpu --device cpu --parts correctness  # the same checks on the CPU path: a dry run, no GPU result

Parts, in this order (PARTS):
  correctness     gpu_checks.CHECKS against fp64 on the CPU: the flash kernels (also every query length 1 under
                  GQA), the in-process ring, no host-device sync, a 2-layer Qwen2, all_reduce_grads + fused AdamW
  train_autocast  train.py with fsdp=False: bf16 autocast, fused AdamW on plain tensors; checkpoint + resume
  train_fsdp      train.py with fsdp=True (its default under torchrun on CUDA): FSDP2 bf16 mixed precision, naive
                  vs skrull, checkpoint + resume, and its losses against train_autocast's
  calibrate       calibrate.py on small shapes: in train.py's regime (FSDP2 mixed precision), memory measured,
                  the P2P constants left at the prior on one GPU
  throughput      tokens/s and MFU of Qwen2.5-0.5B with its real vocabulary under FSDP2 mixed precision, naive vs
                  skrull alternating; every step's peak memory against memory.py's prediction
Every train.py run is one torchrun rank with eval_fraction=0 and export=False. A row passes when its error is
within its tolerance (gpu_checks.GPU_TOL); a part that raises or runs out of time becomes a failing row and the
next part still runs. Exits 1 if any row fails. Results: OUT_DIR/results.json and OUT_DIR/results.md.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

import numpy as np
import torch

from bench.common import ROOT, train_run
from gpu_checks import CHECKS, GPU_TOL, Row, check_no_host_sync

Part = namedtuple("Part", "name limit_s what")
PARTS = (
    Part("correctness", 120, "kernels (and query length 1 under GQA), in-process ring, no host sync, 2-layer model, all-reduce + fused AdamW"),
    Part("train_autocast", 75, "train.py fsdp=False: bf16 autocast, fused AdamW on plain tensors, checkpoint + resume"),
    Part("train_fsdp", 100, "train.py fsdp=True: FSDP2 bf16 mixed precision, naive vs skrull, checkpoint + resume"),
    Part("calibrate", 45, "calibrate.py on one GPU: FSDP2 regime, measured memory, P2P left at the prior"),
    Part("throughput", 140, "Qwen2.5-0.5B tokens/s and MFU under FSDP2, naive vs skrull; peak memory vs memory.py"),
)
BUDGET_S = 480  # the whole check on one H100/H200: the parts' limits add up to at most this
assert sum(p.limit_s for p in PARTS) <= BUDGET_S


def _failed_row(what, e):
    return Row(f"{what}: raised", float("nan"), 0.0, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")

# -----------------------------------------------------------------------------
# the parts; each runs in its own process (run_part) and reports through emit(rows, extra)


def part_correctness(dev, dtype, tmp, args, emit):
    rows = []
    for check in CHECKS:
        if check is check_no_host_sync and dev.type != "cuda":
            continue
        try:
            rows += check(dev, dtype)
        except Exception as e:  # one line, so it hides no other check
            rows.append(_failed_row(check.__name__, e))
        emit(rows, {})


def _train_common(dev, tmp):
    from data.synthetic import make_synthetic
    path = os.path.join(tmp, "small")
    if not os.path.exists(os.path.join(path, "meta.json")):
        make_synthetic(path, dist="chatqa2", n=256, max_len=2048, seed=0, verbose=False)
    return dict(dataset=path, model_preset="tiny", batch_size=8, bucket_size=2048, max_iters=8, warmup_iters=2,
                lr_decay_iters=8, checkpoint_interval=0, eval_fraction=0.0, export=False, device=dev.type,
                dtype="bfloat16" if dev.type == "cuda" else "float32")


def _train_rows(dev, tmp, fsdp, emit):
    """train.py on a tiny Qwen2 through one path (fsdp or not): losses finite and falling, naive vs skrull
    (FSDP2 only), checkpoint at step 4 + resume to 8 vs the uninterrupted run. -> skrull's losses."""
    common = {**_train_common(dev, tmp), "fsdp": fsdp}
    label = ("FSDP2 bf16 mixed precision" if fsdp else "bf16 autocast, plain tensors") if dev.type == "cuda" else \
        ("FSDP2 fp32" if fsdp else "fp32, plain tensors")
    name = "fsdp" if fsdp else "autocast"
    rows, runs = [], {}
    for p in ("naive", "skrull") if fsdp else ("skrull",):
        runs[p] = np.array([r["loss"] for r in train_run(os.path.join(tmp, f"{name}_{p}"), 1, {**common, "schedule": p})])
        ok = np.isfinite(runs[p]).all() and runs[p][-1] < runs[p][0]
        rows.append(Row(f"train ({label}): {len(runs[p])} steps, tiny Qwen2, schedule={p}", 0.0 if ok else float("nan"), 0.0,
                        f"loss {runs[p][0]:.3f} -> {runs[p][-1]:.3f} (finite, falling)"))
        emit(rows, {})
    if fsdp:
        rows.append(Row(f"train ({label}): naive vs skrull, same batches", float(np.max(np.abs(runs["naive"] - runs["skrull"]) / np.abs(runs["naive"]))),
                        GPU_TOL["policy"], "max relative loss difference over steps"))
    part = os.path.join(tmp, f"{name}_resume")
    train_run(part, 1, {**common, "schedule": "skrull", "max_iters": 4, "checkpoint_interval": 4})
    resumed = np.array([r["loss"] for r in train_run(part, 1, {**common, "schedule": "skrull", "init_from": "resume"})])
    rows.append(Row(f"train ({label}): checkpoint at 4, resume to 8 (fused AdamW{', sharded state' if fsdp else ''})",
                    float(np.max(np.abs(resumed - runs["skrull"]) / np.abs(runs["skrull"]))), GPU_TOL["resume"],
                    "max relative loss difference vs the uninterrupted run"))
    emit(rows, {"skrull_losses": runs["skrull"].tolist()})
    return rows, runs["skrull"]


def part_train_autocast(dev, dtype, tmp, args, emit):
    _train_rows(dev, tmp, False, emit)


def part_train_fsdp(dev, dtype, tmp, args, emit):
    rows, losses = _train_rows(dev, tmp, True, emit)
    other = os.path.join(tmp, "train_autocast.json")  # the train_autocast part's output, if it finished
    if os.path.exists(other) and json.load(open(other))["extra"].get("skrull_losses"):
        auto = np.array(json.load(open(other))["extra"]["skrull_losses"])
        rows.append(Row("train: autocast path vs FSDP2 mixed precision, skrull, same batches",
                        float(np.max(np.abs(auto - losses) / np.abs(auto))), GPU_TOL["paths"], "max relative loss difference over steps"))
    emit(rows, {"skrull_losses": losses.tolist()})


def part_calibrate(dev, dtype, tmp, args, emit):
    """`python calibrate.py` on small shapes: it runs in train.py's regime (FSDP2 bf16 mixed precision on
    CUDA), measures memory there, and on one GPU leaves the P2P constants at the prior."""
    path = os.path.join(tmp, "profile.json")
    cmd = [sys.executable, "calibrate.py", "--out", path, "--device", dev.type, "--model", "tiny", "--max_len", "1024",
           "--repeats", "1", "--max_p2p_mb", "1", "--procs", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"calibrate.py exited {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}")
    prof = json.load(open(path))
    want = {"fsdp": dev.type == "cuda", "dtype": "bfloat16" if dev.type == "cuda" else "float32"}
    ok = all(prof["regime"][k] == v for k, v in want.items()) and prof["bucket_size"] > 0 and prof["mem_per_token"] > 0
    emit([Row(f"calibrate: tiny model, regime {prof['regime']}", 0.0 if ok else float("nan"), 0.0,
              f"bucket_size {prof['bucket_size']}, {prof['mem_per_token'] / 1024:.1f} KiB/token measured, "
              f"a = {prof['a']:.2e} s/FLOP; P2P: {prof['p2p_note']}")], {})


def _tokens_per_s(records):
    return sum(r["tokens"] for r in records) / sum(r["dt_ms"] for r in records) * 1e3


def part_throughput(dev, dtype, tmp, args, emit):
    """tokens/s and MFU: Qwen2.5-0.5B (its own vocabulary) under FSDP2 mixed precision, cp=1, one GPU, naive and
    skrull alternating; each step's max_memory_allocated beside memory.py's predicted_memory."""
    from data.synthetic import make_synthetic
    from model import PRESETS
    big = make_synthetic(os.path.join(tmp, "chatqa2"), dist="chatqa2", n=512, max_len=args.max_len, seed=0, verbose=False)
    cfg = dict(dataset=big, model_preset="qwen2.5-0.5b", batch_size=args.batch_size, bucket_size=args.bucket,
               max_iters=args.iters, warmup_iters=2, learning_rate=2e-5, min_lr=2e-6, checkpoint_interval=0,
               eval_fraction=0.0, export=False, fsdp=True, device=dev.type, dtype="bfloat16" if dev.type == "cuda" else "float32", cp=1)
    label = (f"Qwen2.5-0.5B ({PRESETS['qwen2.5-0.5b'].vocab_size:,}-row vocabulary), FSDP2 "
             f"{'bf16 mixed precision' if dev.type == 'cuda' else 'fp32'}, cp=1, one rank")
    runs, rows = {"naive": [], "skrull": []}, []
    for rep in range(args.reps):
        for p in (("naive", "skrull") if rep % 2 == 0 else ("skrull", "naive")):
            runs[p].append(train_run(os.path.join(tmp, f"tput_{p}_{rep}"), 1, {**cfg, "schedule": p})[args.warmup:])
            print(f"  0.5B, {p}, rep {rep}: {_tokens_per_s(runs[p][-1]):,.0f} tok/s", flush=True)
            emit(rows, {"throughput": _throughput(runs, label, args)})
    for p, reps in runs.items():
        steps = [r for m in reps for r in m if "predicted_memory" in r]
        if steps:  # CUDA: the memory model against each step's measured peak
            ratios = [r["max_memory_allocated"] / r["predicted_memory"] for r in steps]
            worst = max(ratios, key=lambda x: abs(x - 1))
            rows.append(Row(f"memory: {label}, {p}: measured peak / memory.py's prediction, {len(steps)} steps",
                            abs(worst - 1), GPU_TOL["memory"], f"ratio {min(ratios):.2f}..{max(ratios):.2f}"))
    emit(rows, {"throughput": _throughput(runs, label, args)})


def _throughput(runs, label, args):
    out = {"label": label, "max_len": args.max_len, "batch_size": args.batch_size, "bucket": args.bucket,
           "timed_steps": args.iters - args.warmup, "policies": {}}
    for p, reps in runs.items():
        if not reps:
            continue
        steps = [r for m in reps for r in m]
        top = max(steps, key=lambda r: r.get("max_memory_allocated", 0))
        out["policies"][p] = {"tok_per_s": [_tokens_per_s(m) for m in reps],
                              "mfu": statistics.median(r["mfu"] for r in steps) if "mfu" in steps[0] else None,
                              "microbatches": statistics.median(r["n_microbatches"] for r in steps),
                              "peak_gib": top.get("max_memory_allocated", 0) / 2 ** 30,
                              "predicted_gib": top.get("predicted_memory", 0) / 2 ** 30,
                              "peak_step_tokens": top["peak_tokens_per_rank"]}
    return out


PART_FUNCTIONS = {"correctness": part_correctness, "train_autocast": part_train_autocast,
                  "train_fsdp": part_train_fsdp, "calibrate": part_calibrate, "throughput": part_throughput}

# -----------------------------------------------------------------------------
# the driver: one process per part, its time limit, the results file after each


class TimeLimit(BaseException):
    """SIGTERM from the driver: the part's time is up (the driver records it; no row here)."""


def _time_limit(*_):
    raise TimeLimit


def run_part(name, args):
    """In the part's own process: run it, writing {"rows", "extra"} to TMP/<name>.json at every emit. SIGTERM
    (the driver's time limit) raises TimeLimit, so a train.py run in flight is stopped too (bench.common)."""
    signal.signal(signal.SIGTERM, _time_limit)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    path = os.path.join(args.tmp, f"{name}.json")

    def emit(rows, extra):
        with open(path + ".tmp", "w") as f:
            json.dump({"rows": [r._asdict() for r in rows], "extra": extra}, f)
        os.replace(path + ".tmp", path)
    try:
        PART_FUNCTIONS[name](dev, dtype, args.tmp, args, emit)
    except TimeLimit:
        sys.exit(1)
    except (Exception, SystemExit) as e:  # SystemExit: a failed train.py run (bench.common.train_run)
        got = json.load(open(path)) if os.path.exists(path) else {"rows": [], "extra": {}}
        emit([Row(**r) for r in got["rows"]] + [_failed_row(name, e)], got["extra"])


def part_command(part, args):
    """The command that runs `part` in a process of its own."""
    return [sys.executable, "-m", "bench.gpu", "--run_part", part.name, "--tmp", args.tmp, "--device", args.device,
            "--iters", str(args.iters), "--warmup", str(args.warmup), "--reps", str(args.reps),
            "--batch_size", str(args.batch_size), "--max_len", str(args.max_len), "--bucket", str(args.bucket)]


def run_parts(parts, args, command=part_command, out=print):
    """Run each part in its own process (its own session) under its limit: past the limit its process group gets
    SIGTERM (torchrun then stops its workers), SIGKILL 20 s later, and the part gets a failing row. Writes
    args.out_dir/results.json and results.md after every part. -> the results dict."""
    os.makedirs(args.out_dir, exist_ok=True)
    res = {"device": _device_name(args.device), "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "tolerances": GPU_TOL, "budget_s": sum(p.limit_s for p in parts), "parts": [], "rows": [], "throughput": None}
    for part in parts:
        out(f"part {part.name} (limit {part.limit_s} s): {part.what}", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(command(part, args), cwd=ROOT, start_new_session=True)
        status = "done"
        try:
            proc.wait(timeout=part.limit_s)
        except subprocess.TimeoutExpired:
            status = f"stopped at its {part.limit_s} s limit"
            _stop(proc)
        if status == "done" and proc.returncode != 0:
            status = f"exited {proc.returncode}"
        path = os.path.join(args.tmp, f"{part.name}.json")
        got = json.load(open(path)) if os.path.exists(path) else {"rows": [], "extra": {}}
        rows = [Row(**r) for r in got["rows"]]
        if status != "done":
            rows.append(Row(f"{part.name}: {status}", float("nan"), 0.0, "the rows above are what it finished"))
        res["rows"] += [r._asdict() for r in rows]
        res["throughput"] = got["extra"].get("throughput", res["throughput"])
        res["parts"].append({"name": part.name, "limit_s": part.limit_s, "wall_s": round(time.time() - t0, 1), "status": status})
        write_results(res, args.out_dir)
        out(f"part {part.name}: {status} in {time.time() - t0:.0f} s, {len(rows)} rows", flush=True)
    return res


def _stop(proc):
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _device_name(device):
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def row_ok(row):
    return row["error"] <= row["tolerance"]  # NaN (non-finite results, an exception, a time-out) fails


def markdown(res):
    """results.md: the run, the parts with their limits and times, the rows, the throughput."""
    lines = [f"# python -m bench.gpu, {res['started']}", "",
             f"{res['device']}, torch {res['torch']}; relative errors ||got - ref|| / ||ref|| against fp64 on the CPU.", "",
             "| part | limit s | took s | status |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['limit_s']} | {p['wall_s']} | {p['status']} |" for p in res["parts"]]
    lines += ["", "| check | error | tolerance | ok | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['error']:.1e} | {r['tolerance']:g} | {'yes' if row_ok(r) else 'NO'} | {r['detail']} |"
              for r in res["rows"]]
    t = res["throughput"]
    if t and t["policies"]:
        lines += ["", f"tokens/s, {t['label']}, synthetic ChatQA2 shape (max_len {t['max_len']}), batch_size {t['batch_size']}, "
                  f"bucket_size {t['bucket']}, {t['timed_steps']} timed steps per run, runs alternating; only the packing differs", "",
                  "| schedule | tok/s per run | median | MFU (median step) | micro-batches/step | peak max_memory_allocated | "
                  "memory.py's prediction | its step's tokens |", "|---|---|---|---|---|---|---|---|"]
        for p, v in t["policies"].items():
            mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "n/a"
            lines.append(f"| {p} | {', '.join(f'{x:,.0f}' for x in v['tok_per_s'])} | {statistics.median(v['tok_per_s']):,.0f} | {mfu} | "
                         f"{v['microbatches']:g} | {v['peak_gib']:.1f} GiB | {v['predicted_gib']:.1f} GiB | {v['peak_step_tokens']} |")
    n_ok = sum(row_ok(r) for r in res["rows"])
    lines += ["", f"{n_ok} of {len(res['rows'])} rows within tolerance"]
    return "\n".join(lines) + "\n"


def write_results(res, out_dir):
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)  # NaN errors are written as NaN (Python's json reads them back)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(res))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma-separated, run in PARTS' order")
    ap.add_argument("--out_dir", default="out-gpu-check", help="where results.json and results.md go")
    ap.add_argument("--iters", type=int, default=6, help="steps per throughput run (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="throughput runs per policy, alternating")
    ap.add_argument("--batch_size", type=int, default=16, help="sequences per step in the throughput runs")
    ap.add_argument("--max_len", type=int, default=24576, help="longest synthetic ChatQA2-shaped sample")
    ap.add_argument("--bucket", type=int, default=26000, help="bucket_size (tokens per micro-batch) of the throughput runs")
    ap.add_argument("--run_part", help=argparse.SUPPRESS)  # internal: the driver's child process
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_part:
        return run_part(args.run_part, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"python -m bench.gpu: no CUDA device visible to torch {torch.__version__}; run it on a machine with a GPU "
                 f"(or --device cpu for a dry run of the checks on the CPU path)")
    names = args.parts.split(",")
    unknown = [n for n in names if n not in PART_FUNCTIONS]
    if unknown or args.warmup >= args.iters:
        sys.exit(f"python -m bench.gpu: parts must be among {', '.join(PART_FUNCTIONS)} (got {', '.join(unknown) or 'ok'}) "
                 f"and --warmup ({args.warmup}) below --iters ({args.iters})")
    args.tmp = tempfile.mkdtemp(prefix="skrull_gpu_")
    print(f"python -m bench.gpu on {_device_name(args.device)}, torch {torch.__version__}; results -> {args.out_dir}/results.json, "
          f"results.md; tolerances: " + ", ".join(f"{k} {v:g}" for k, v in GPU_TOL.items()), flush=True)
    res = run_parts([p for p in PARTS if p.name in names], args)
    print("\n" + markdown(res))
    if not all(row_ok(r) for r in res["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
