"""
Calibrate the cost model (scheduler.CostModel) on this machine and write its constants as JSON: the
file train.py reads with --profile=..., as do CostModel.from_profile, the simulator and bench.e2e.

    python calibrate.py [--out profile_cpu.json] [--model tiny] [--max_len 8192]
    python train.py config/long_sft_cpu.py --profile=profile_cpu.json

Four steps: measure (micro-batches without CP on every process at once, P2P ping-pong, and the same
2 processes as a CP group, each CP run with the real ring and with no-op hops), fit (the compute
constants by least squares, then hop latency and comm_overlap on the real CP runs), report every run
beside the fitted model, write. Every run is in the regime train.py will run (train_regime: FSDP2 with
bf16 mixed precision on CUDA, the fp32 all-reduce path on CPU; --fsdp and --activation_checkpoint
change it), with each micro-batch and its attention plan built before its timing, as train.py builds
them; the JSON records the regime and train.py warns when it runs another. One process per device,
each on its own GPU; with one GPU there is no P2P to time and the P2P constants stay the prior's.
Memory per token and bucket_size are measured on CUDA and estimated by memory.MemoryModel on CPU,
where nothing reports peak tensor memory. Timings are medians over --repeats runs; on a shared
machine expect +-15% between profiles.
"""
import argparse
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import context_parallel
from bench.common import leave_gloo_worker, load_average, spawn_gloo
from model import PRESETS, Transformer

# -----------------------------------------------------------------------------
# measure: micro-batches without CP


def design_points(max_len):
    """(length, k) design points: k sequences of distinct lengths near `length`, packed in one
    micro-batch. Distinct lengths keep varlen_attention on its per-sequence path (train.py's case),
    and varying k separates the per-sequence constant b from the per-micro-batch constant c_mb."""
    pts, s = [], 32
    while s <= max_len:
        for k in (1, 4, 8, 16):
            if k == 1 or s * k <= max(4096, max_len // 2) and (k < 16 or s <= 64):
                pts.append((s, k))  # k=16 only for tiny sequences: a long-tail batch's many short ones
        s *= 2
    return pts


def regime_model(cfg, dev, regime):
    """The model as train.py runs it in `regime` ({fsdp, activation_checkpoint, dtype}; FSDP2 needs a process
    group), inside a step: parallelize's sharding, recompute and mixed precision, and under FSDP2 the step's
    state between micro-batches (parameters gathered once, gradients accumulated without communicating), so
    a micro-batch timed or measured here costs what it costs in training.
    -> (model, AdamW over the (sharded) parameters, autocast context)."""
    from contextlib import nullcontext

    from parallelize import parallelize
    compute_dtype = torch.bfloat16 if regime["dtype"] == "bfloat16" and dev.type == "cuda" else None
    model = parallelize(Transformer(cfg), fsdp=regime["fsdp"], recompute=regime["activation_checkpoint"], device=dev,
                        compute_dtype=compute_dtype)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")  # before unsharding: the shards
    if regime["fsdp"]:
        enter_accumulation(model)
        return model, optim, nullcontext()  # FSDP2 casts to compute_dtype itself
    return model, optim, torch.autocast("cuda", dtype=compute_dtype) if compute_dtype else nullcontext()


def enter_accumulation(model):
    """FSDP2 between micro-batches of a train.py step: gathered, gradients kept unsharded, no reduce-scatter."""
    from parallelize import unshard_all
    unshard_all(model)
    model.set_requires_gradient_sync(False)
    model.set_reshard_after_backward(False)


def _device(name, rank):
    """This process's device: CUDA device `rank` (one process per GPU, made current), or the CPU."""
    if name == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device(name)


def _init_group(backend, init_file, rank, world, dev):
    kw = {"device_id": dev} if backend == "nccl" else {}  # NCCL bound to this process's GPU
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, **kw)


def microbatch(lens, cfg, dev, world=1, rank=0, dist_lens=(), generator=None):
    """(tokens, positions, attention function) of one micro-batch: whole sequences `lens` and, over a CP group
    of `world` ranks, this rank's zigzag shards of `dist_lens` first. Built as train.py's load_microbatch
    builds it, before the timed region: the AttnPlan from CPU lists, so the timed forward and backward
    read nothing back from the device."""
    from context_parallel import AttnPlan, attention, to_device, zigzag_shard
    g = generator or torch.Generator().manual_seed(sum(lens) * 31 + len(lens))
    cu_d = [0] + list(itertools.accumulate(dist_lens))
    xd = torch.randint(0, cfg.vocab_size, (cu_d[-1],), generator=g)
    pd = torch.cat([torch.arange(n) for n in dist_lens]) if dist_lens else torch.zeros(0, dtype=torch.long)
    x = torch.cat([zigzag_shard(xd, cu_d, rank, world), torch.randint(0, cfg.vocab_size, (sum(lens),), generator=g)])
    pos = torch.cat([zigzag_shard(pd, cu_d, rank, world)] + [torch.arange(n) for n in lens])
    plan = AttnPlan(cu_d if dist_lens else None, [0] + list(itertools.accumulate(lens)), dev, world=world, rank=rank)
    return to_device(x, dev)[None], to_device(pos, dev)[None], partial(attention, plan=plan)


def compute_worker(rank, world, opts, out_file, barrier=None):
    """Times forward+backward of micro-batches on this device, in train.py's regime (opts["regime"]); every
    one of the `world` processes runs the same sweep at the same time (on CPU, 2 processes share the 2
    cores as in the e2e runs; on CUDA, one process per GPU)."""
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    dev = _device(opts["device"], rank)
    regime = opts["regime"]
    if regime["fsdp"]:
        _init_group("nccl" if dev.type == "cuda" else "gloo", f"{out_file}.init", rank, world, dev)
    cfg = PRESETS[opts["model"]]
    model, optim, autocast = regime_model(cfg, dev, regime)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def fwd_bwd(batch):
        x, pos, attn = batch
        with autocast:
            _, loss = model(x, x, position_ids=pos, attn_fn=attn, reduction="sum")  # every token a target
        loss.backward()

    def once(fn):
        if barrier is not None:  # all processes time the same shape at the same moment
            barrier.wait()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    shape = lambda lens: microbatch(lens, cfg, dev)  # noqa: E731
    res = {"points": _time_shapes(opts["points"], opts["repeats"], fwd_bwd, shape, once, sync), "mem": []}
    res["t_optim"] = _optimizer_step_time(model, optim, once, sync, opts["repeats"], regime["fsdp"], fwd_bwd, shape)
    res["n_params"] = model.num_params()
    if dev.type == "cuda":  # peak memory per token (the k=1 shapes), and the state a step holds, in the regime
        res["mem"] = _peak_memory(opts["points"], model, fwd_bwd, shape, sync)
        res["mem_static"] = torch.cuda.memory_allocated(dev)  # weights (+ gathered) + grads + AdamW states
        res["device_memory"] = torch.cuda.get_device_properties(dev).total_memory
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump(res, f)
    if regime["fsdp"]:
        dist.destroy_process_group()


def _time_shapes(points, repeats, fwd_bwd, shape, once, sync):
    """Interleaved: every pass times each shape once, in a new order each pass, and a shape's time is its
    median over the passes. A change of machine load (a shared machine) then touches every shape
    alike instead of biasing the shapes that happened to run during it. Inputs and plans are built
    before any timing."""
    batches = [shape([s + 2 * i for i in range(k)]) for s, k in points]
    runs = [partial(fwd_bwd, b) for b in batches]
    for fn in runs:  # warm-up
        fn()
    sync()
    times = [[] for _ in runs]
    order = list(range(len(runs)))
    for rep in range(repeats):
        random.Random(rep).shuffle(order)  # the same order in every process
        for i in order:
            times[i].append(once(runs[i]))
    return [{"lengths": [s + 2 * i for i in range(k)], "seconds": statistics.median(t)} for (s, k), t in zip(points, times)]


def _peak_memory(points, model, fwd_bwd, shape, sync):
    """CUDA: torch.cuda.max_memory_allocated above the state held between micro-batches, one run of each
    k=1 shape."""
    mem = []
    for s, k in points:
        if k == 1:
            batch = shape([s])
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd(batch)
            sync()
            mem.append({"tokens": s, "bytes": torch.cuda.max_memory_allocated() - base})
            del batch
    return mem


def _optimizer_step_time(model, optim, once, sync, repeats, fsdp, fwd_bwd, shape):
    """Median time of gradient clipping + AdamW step + zero_grad, after one warm-up step. Under FSDP2 on the
    sharded parameters, as train.py steps them: one backward reduce-scatters into them first, and the model
    goes back to the step's accumulation state after (enter_accumulation), optimizer state included."""
    params = [p for group in optim.param_groups for p in group["params"]]  # under FSDP2 the shards

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=False)
    if fsdp:  # the last micro-batch's backward: reduce-scatter, reshard
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)
        fwd_bwd(shape([64]))
    else:
        for p in params:
            p.grad = torch.zeros_like(p)
    step()  # warm-up
    sync()
    t = statistics.median(once(step) for _ in range(repeats))
    if fsdp:
        enter_accumulation(model)
        fwd_bwd(shape([64]))  # the unsharded gradient accumulators exist between micro-batches
        sync()
    return t

# -----------------------------------------------------------------------------
# measure: P2P and the same 2 processes as a CP group


def p2p_worker(rank, world, init_file, out_file, backend, sizes, cp_opts=None):
    """Ping-pong between 2 processes: one-way time = round trip / 2, for each message size. Then, with
    cp_opts, time the model with its sequences distributed over the 2 processes (_time_cp)."""
    torch.set_num_threads(1)
    dev = _device("cuda" if backend == "nccl" else "cpu", rank)  # NCCL: this process's GPU, made current
    _init_group(backend, init_file, rank, world, dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if backend == "nccl" else (lambda: None)
    out = _pingpong(rank, dev, sync, sizes)
    cp_out = _time_cp(rank, world, dev, backend, sync, cp_opts) if cp_opts is not None else []
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"p2p": out, "cp": cp_out}, f)
    leave_gloo_worker()


def _pingpong(rank, dev, sync, sizes):
    out = []
    for n in sizes:
        buf = torch.zeros(n // 4, dtype=torch.float32, device=dev)
        reps = max(3, min(50, (64 << 20) // n // 2))
        for it in range(reps + 2):  # 2 warm-up round trips
            if it == 2:
                sync()
                dist.barrier()
                t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
        sync()
        out.append({"bytes": n, "seconds": (time.perf_counter() - t0) / reps / 2})
    return out


def _cp_runs(cp_opts, cfg, rank, world, dev):
    """-> [(record, micro-batch)]: micro-batches with every sequence distributed (ring), then DACP ones (one
    distributed sequence + local ones on each rank), to measure how much of the ring's communication the
    local compute hides (CostModel.comm_overlap). Each micro-batch (inputs and AttnPlan) is built here,
    once, outside the timed region, as train.py's load_microbatch builds it."""
    runs = []
    for s, k in cp_opts["points"]:
        lens = [s + 2 * world * i for i in range(k)]  # multiples of 2*world, distinct
        g = torch.Generator().manual_seed(s * 31 + k)
        runs.append(({"lengths": lens}, microbatch([], cfg, dev, world, rank, lens, g)))
    for s, k, sl in cp_opts.get("dacp_points", []):
        loc = [sl + 2 * i for i in range(k)]
        g = torch.Generator().manual_seed(s * 17 + k)
        runs.append(({"lengths": [s], "local": loc}, microbatch(loc, cfg, dev, world, rank, [s], g)))
    return runs


def _time_cp(rank, world, dev, backend, sync, cp_opts):
    """Model forward+backward of every _cp_runs micro-batch, each timed with the real ring ("real") and
    with its hops replaced by no-ops ("compute"): the difference is the communication left exposed. The
    model runs in train.py's regime (regime_model, over these processes' group)."""
    torch.manual_seed(0)
    cfg = PRESETS[cp_opts["model"]]
    model, _, autocast = regime_model(cfg, dev, cp_opts["regime"])
    post = context_parallel._Ring.post

    def once(xs, ps, attn, mode):  # forward+backward; compute: the same loop and kernels, no-op hops
        if mode == "compute":
            context_parallel._Ring.post = lambda self, bufs, tag: (lambda: bufs)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        with autocast:
            _, loss = model(xs, xs, position_ids=ps, attn_fn=attn, reduction="sum")
        loss.backward()
        sync()
        context_parallel._Ring.post = post
        return time.perf_counter() - t0

    runs = _cp_runs(cp_opts, cfg, rank, world, dev)
    # interleaved as in _time_shapes: each pass times every (shape, mode) once, in a new order; a run's
    # time is the slowest rank's, its median over the passes
    jobs = [(i, mode) for i in range(len(runs)) for mode in ("real", "compute")]
    for i, mode in jobs:  # warm-up
        once(*runs[i][1], mode)
    times = {job: [] for job in jobs}
    for rep in range(cp_opts["repeats"]):
        random.Random(rep).shuffle(jobs)  # the same order in both processes
        for job in jobs:
            t = torch.tensor(once(*runs[job[0]][1], job[1]), device=dev)  # NCCL reduces device tensors only
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[job].append(float(t))
    return [dict(rec, **{mode: statistics.median(times[(i, mode)]) for mode in ("real", "compute")})
            for i, (rec, _) in enumerate(runs)]


def measure(args, cfg, dev, regime):
    """Every timing the fit needs, in train.py's `regime`: micro-batches without CP (all processes at once),
    and, where two devices of the kind exist (CPU processes, or 2+ GPUs), P2P ping-pong and the same 2
    processes as a CP group (all distributed, and DACP), each with real and no-op hops. One GPU has no
    P2P to time: the profile then keeps the prior's P2P constants (fit_constants)."""
    import torch.multiprocessing as mp
    points = design_points(args.max_len)
    opts = dict(device=args.device, model=args.model, regime=regime, threads=args.threads,
                repeats=args.repeats, points=points)
    print(f"profiling {args.model} on {args.device}, {args.procs} process(es) x {args.threads} thread(s), "
          f"{len(points)} micro-batch shapes up to {args.max_len} tokens, in train.py's regime {regime} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "compute")
        if args.procs == 1:
            compute_worker(0, 1, opts, out_file)
        else:
            barrier = mp.get_context("spawn").Barrier(args.procs)
            mp.spawn(compute_worker, args=(args.procs, opts, out_file, barrier), nprocs=args.procs)
        runs = [json.load(open(f"{out_file}.{r}")) for r in range(args.procs)]
    secs = np.mean([[p["seconds"] for p in r["points"]] for r in runs], axis=0)
    meas = dict(runs[0], compute=[{"lengths": p["lengths"], "seconds": float(t)} for p, t in zip(runs[0]["points"], secs)],
                t_optim=float(np.mean([r["t_optim"] for r in runs])), p2p=[], cp=[], backend=None)
    if dev.type == "cuda" and torch.cuda.device_count() < 2:
        print("one GPU: no P2P or CP group to time; the P2P constants stay at the prior's (scheduler.H100)", flush=True)
        return meas
    backend = "nccl" if dev.type == "cuda" else "gloo"
    sizes = [1 << e for e in range(10, 21 + (args.max_p2p_mb.bit_length() - 1), 2)]
    cp_pts = [(s, k) for s, k in points if (k in (1, 4) and s >= 64 or k == 16) and s * k <= max(4096, args.max_len // 2)]
    dacp_pts = [(s, k, sl) for s in (256, 1024, 2048) if s <= args.max_len for k, sl in ((4, 64), (8, 128), (2, 512))]
    cp_opts = dict(model=args.model, points=cp_pts, repeats=args.repeats, dacp_points=dacp_pts, regime=regime)
    print(f"P2P ping-pong ({backend}) and CP=2 micro-batches (real ring and no-op hops) ...", flush=True)
    got = spawn_gloo(p2p_worker, 2, backend, sizes, cp_opts)
    meas.update(p2p=got["p2p"], cp=got["cp"], backend=backend)
    return meas

# -----------------------------------------------------------------------------
# fit


FIT = ("a", "a_attn", "a_ring", "b_call", "b_seq", "c_mb")  # the compute constants, fitted together


def _plan(m, W=2):
    """A profile measurement -> (MicroBatch, lengths) as CostModel sees it; the CP runs are symmetric,
    so rank 0's predicted time stands for every rank."""
    from scheduler import MicroBatch
    if "local" in m:  # DACP: one distributed sequence, the same local ones on every rank
        k = len(m["local"])
        return MicroBatch([0], [list(range(1 + k * j, 1 + k * (j + 1))) for j in range(W)]), m["lengths"] + m["local"] * W
    if "real" in m:  # CP, every sequence distributed
        return MicroBatch(list(range(len(m["lengths"]))), [[] for _ in range(W)]), m["lengths"]
    return MicroBatch([], [list(range(len(m["lengths"])))]), m["lengths"]


def _predict(cm, m):
    mb, lengths = _plan(m)
    return cm.rank_times(mb, lengths)[0]


def fit_constants(cfg, meas, comm_bytes):
    """The cost model's constants from the profile's own runs, in two steps.
    1. compute: without communication CostModel.rank_time is linear in FIT, so one non-negative least-
       squares fit (relative error: short micro-batches count as much as long ones) over the runs without
       CP and the CP runs with no-op hops. Each column is the model's prediction with that constant = 1.
    2. communication: bandwidth from the ping-pong; the hop latency under load and comm_overlap by a grid
       search on the real CP runs (all distributed, DACP), compute constants fixed: the share of each
       hop that the step's compute hides is measured, not assumed.
    Without P2P runs (one GPU) the P2P constants are the prior's (scheduler.H100), and without CP runs
    a_ring is left out (None: CostModel then uses a_attn); write_profile says so in p2p_note."""
    from scipy.optimize import nnls
    from scheduler import H100, CostModel
    fit_keys = FIT if meas["cp"] else tuple(k for k in FIT if k != "a_ring")
    zero = dict.fromkeys(FIT, 0.0)
    nocomm = dict(p2p_latency=0.0, p2p_bandwidth=1e30, comm_overlap=0.0, comm_bytes=comm_bytes)
    runs = meas["compute"] + [dict(m, seconds=m["compute"]) for m in meas["cp"]]
    X = np.array([[_predict(CostModel(cfg, {**zero, **nocomm, k: 1.0}), m) for k in fit_keys] for m in runs])
    y = np.array([m["seconds"] for m in runs])
    coef, _ = nnls(X / y[:, None], np.ones_like(y))
    fit = dict(zip(fit_keys, (float(x) for x in coef)), comm_bytes=comm_bytes)
    if not meas["p2p"]:
        fit.update(a_ring=None, p2p_latency=H100["p2p_latency"], p2p_bandwidth=H100["p2p_bandwidth"],
                   comm_overlap=H100["comm_overlap"], p2p_pingpong_latency=None)
        return fit
    pb = np.array([p["bytes"] for p in meas["p2p"]], dtype=float)
    ps = np.array([p["seconds"] for p in meas["p2p"]])
    (lat0, inv_bw), _ = nnls(np.stack([np.ones_like(pb), pb], 1) / ps[:, None], np.ones_like(ps))
    fit["p2p_bandwidth"] = float(1 / inv_bw) if inv_bw > 0 else 1e12
    real = [dict(m, seconds=m["real"]) for m in meas["cp"]]
    best = (np.inf, float(lat0), 1.0)
    if real:
        for lat in np.concatenate([[0.0], np.geomspace(1e-6, 1e-2, 81)]):
            for o in np.linspace(0, 1, 21):
                cm = CostModel(cfg, {**fit, "p2p_latency": float(lat), "comm_overlap": float(o)})
                err = float(np.mean([abs(_predict(cm, m) / m["seconds"] - 1) for m in real]))
                if err < best[0]:
                    best = (err, float(lat), float(o))
    fit.update(p2p_latency=best[1], comm_overlap=best[2], p2p_pingpong_latency=float(lat0))
    return fit


def report(cfg, meas, fit):
    """Prints every profiled run beside the fitted model; returns the relative errors."""
    from scheduler import CostModel
    cm = CostModel(cfg, fit)
    print(f"\n{'micro-batch':>26s} {'measured ms':>12s} {'model ms':>9s} {'err':>6s}")
    errs = {"no CP": [], "CP=2, no-op hops": [], "CP=2": []}
    nocomm = CostModel(cfg, {**fit, "p2p_latency": 0.0, "p2p_bandwidth": 1e30})
    for m in meas["compute"] + [dict(m, seconds=m[mode], mode=mode) for m in meas["cp"] for mode in ("compute", "real")]:
        what = "no CP" if "mode" not in m else ("CP=2, no-op hops" if m["mode"] == "compute" else "CP=2")
        pred = _predict(nocomm if m.get("mode") == "compute" else cm, m)
        errs[what].append(pred / m["seconds"] - 1)
        ls = m["lengths"]
        desc = f"{ls[0]}..{ls[-1]} x{len(ls)}" + (f" + {len(m['local'])} local x {m['local'][0]}" if "local" in m else "")
        print(f"{desc:>26s} {m['seconds'] * 1e3:12.2f} {pred * 1e3:9.2f} {errs[what][-1] * 100:5.1f}%  {what}")
    for what, e in errs.items():
        if e:
            e = np.abs(e)
            print(f"{what}: error median {np.median(e) * 100:.1f}% max {e.max() * 100:.1f}% over {len(e)} runs")
    return {k: [float(x) for x in v] for k, v in errs.items()}

# -----------------------------------------------------------------------------
# write


def _memory_terms(args, cfg, dev, meas, regime):
    """-> (alpha bytes/token, beta bytes, static bytes, device memory, usable memory, how they were had):
    bucket_size C = (usable - static - beta) / alpha, all in train.py's `regime` at `args.procs` ranks."""
    from memory import USABLE, MemoryModel
    if dev.type == "cuda":  # measured peak memory of the k=1 shapes
        toks = np.array([m["tokens"] for m in meas["mem"]], dtype=float)
        byts = np.array([m["bytes"] for m in meas["mem"]], dtype=float)
        alpha, beta = np.polyfit(toks, byts, 1)
        static, device_memory = float(meas["mem_static"]), float(meas["device_memory"])
        usable = USABLE * device_memory  # the rest: the allocator's fragmentation and NCCL buffers
        return alpha, beta, static, device_memory, usable, "measured: torch.cuda.max_memory_allocated, linear fit over the k=1 points"
    device_memory = (args.mem_gb * 1e9 if args.mem_gb else
                     os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / args.procs)
    mem = MemoryModel(cfg, world=args.procs, fsdp=regime["fsdp"], recompute=regime["activation_checkpoint"],
                      dtype=getattr(torch, regime["dtype"]), device_memory=device_memory)
    note = "memory.MemoryModel: saved tensors counted on the meta device, state from the shapes; CPU has no peak counter"
    return mem.alpha, mem.beta, float(mem.static["peak"]), device_memory, device_memory, note


def write_profile(path, args, cfg, dev, regime, meas, fit, errs):
    """The JSON that CostModel.from_profile, train.py --profile and bench.e2e read. `regime` records what was
    measured (fsdp, activation_checkpoint, dtype, world): train.py warns when it runs another one."""
    alpha, beta, static, device_memory, usable, mem_note = _memory_terms(args, cfg, dev, meas, regime)
    bucket = int((usable - static - beta) / alpha)
    p2p_note = (f"measured: {meas['backend']} ping-pong and CP=2 runs" if meas["p2p"] else
                "not measured (one GPU: no P2P): p2p_latency, p2p_bandwidth and comm_overlap are the prior's "
                "(scheduler.H100, assumptions), a_ring is a_attn's")
    profile = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": regime["dtype"], "regime": regime, "procs": args.procs, "threads": args.threads, "torch": torch.__version__,
        "taken": time.strftime("%Y-%m-%d %H:%M:%S"), "load": meas["load"],
        "model": {k: getattr(cfg, k) for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                                               "intermediate_size", "tie_embeddings")},
        **fit, "t_optim": meas["t_optim"], "grad_bytes": 4, "p2p_backend": meas["backend"], "p2p_note": p2p_note,
        "mem_per_token": float(alpha), "mem_beta": float(beta), "mem_static": static,
        "device_memory": device_memory, "bucket_size": bucket, "mem_note": mem_note, "fit_errors": errs,
        "measurements": {k: meas[k] for k in ("compute", "p2p", "cp", "mem")},
    }
    with open(path, "w") as f:
        json.dump(profile, f, indent=1)
    gf = lambda a: f"{1 / a / 1e9:.1f} GFLOP/s" if a else "inf"  # noqa: E731
    ring = f"{fit['a_ring']:.3e} ({gf(fit['a_ring'])}, ring blocks)" if fit["a_ring"] is not None else "a_attn's (no CP runs)"
    print(f"\na = {fit['a']:.3e} s/FLOP ({gf(fit['a'])}, linear)   a_attn = {fit['a_attn']:.3e} ({gf(fit['a_attn'])}, "
          f"local attention)   a_ring = {ring}")
    print(f"b_call = {fit['b_call'] * 1e6:.1f} us/attention call/layer/pass   b_seq = {fit['b_seq'] * 1e6:.1f} us/sequence in a call   "
          f"c_mb = {fit['c_mb'] * 1e3:.3f} ms/micro-batch   t_optim = {meas['t_optim'] * 1e3:.2f} ms")
    if meas["p2p"]:
        print(f"P2P ({meas['backend']}): ping-pong latency {fit['p2p_pingpong_latency'] * 1e6:.1f} us, bandwidth "
              f"{fit['p2p_bandwidth'] / 1e9:.2f} GB/s; in the ring: hop latency {fit['p2p_latency'] * 1e6:.0f} us, "
              f"comm_overlap {fit['comm_overlap']:.2f} (share of a hop hidden behind the step's compute)")
    else:
        print(f"P2P: {p2p_note}")
    print(f"memory in train.py's regime {regime}: {alpha / 1024:.1f} KiB/token, static {static / 2**20:.1f} MiB of "
          f"{device_memory / 2**30:.1f} GiB -> bucket_size {bucket} tokens ({mem_note})")
    print(f"machine load (1-minute average) {meas['load'][0]:.1f} before, {meas['load'][1]:.1f} after (this profile's own "
          f"{args.procs} process(es) count; a higher load means other work shared the machine, and these constants "
          f"then describe a busier machine than an idle one)")
    print(f"wrote {path}")


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python calibrate.py", description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--out", default=f"profile_{'cuda' if cuda else 'cpu'}.json")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--model", default="qwen2.5-0.5b" if cuda else "tiny", choices=sorted(PRESETS))
    ap.add_argument("--max_len", type=int, default=16384 if cuda else 8192, help="longest sequence timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--procs", type=int, default=1 if cuda else 2,
                    help="processes timing at once (CPU: 2, as in the 2-process e2e runs on 2 cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (e2e runs use 1)")
    ap.add_argument("--mem_gb", type=float, default=None,
                    help="CPU: memory one rank may use (default: physical RAM / procs)")
    ap.add_argument("--max_p2p_mb", type=int, default=64)
    ap.add_argument("--fsdp", choices=("auto", "true", "false"), default="auto",
                    help="measure under FSDP2 (auto: as train.py under torchrun, on with CUDA, off on CPU)")
    ap.add_argument("--activation_checkpoint", choices=("none", "full", "selective"), default="none",
                    help="measure with this recompute, as train.py's key of the same name")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    regime = train_regime(dev, args.fsdp, args.activation_checkpoint, args.procs)
    cfg = PRESETS[args.model]
    load0 = load_average()
    meas = measure(args, cfg, dev, regime)
    meas["load"] = [load0, load_average()]  # 1-minute load average before and after: was the machine shared?
    fit = fit_constants(cfg, meas, 2 if regime["dtype"] == "bfloat16" else 4)
    errs = report(cfg, meas, fit)
    write_profile(args.out, args, cfg, dev, regime, meas, fit, errs)


def train_regime(dev, fsdp="auto", activation_checkpoint="none", world=1):
    """What train.py runs by default on this device under torchrun: FSDP2 with bf16 mixed precision on
    CUDA, the all-reduce path in fp32 on CPU (train.py's `fsdp` and `dtype` defaults)."""
    cuda = dev.type == "cuda"
    return {"fsdp": cuda if fsdp == "auto" else fsdp == "true", "activation_checkpoint": activation_checkpoint,
            "dtype": "bfloat16" if cuda else "float32", "world": world}


if __name__ == "__main__":
    main()
