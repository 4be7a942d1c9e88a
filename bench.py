"""
Benchmarks, one file, one subcommand each:

    python bench.py ring      # ring attention vs single-process attention (context_parallel.py)
    python bench.py profile   # measure the cost model's constants on this device -> JSON
    python bench.py e2e       # every policy end to end (train.py), measured vs CostModel's prediction
    python bench.py gpu       # every CUDA path on one GPU vs an fp64 reference, tokens/s of the 0.5B shape
    python bench.py memory    # FSDP2 vs all-reduce on CPU; on a GPU, measured peak memory vs memory.py's model
    python bench.py lora      # LoRA vs full fine-tuning: trainable params, optimizer-state bytes, tokens/s
"""
import statistics
import sys

# -----------------------------------------------------------------------------
# ring


def _ring_workloads(T):
    """Packed batches of T tokens, every length a multiple of 8 (= 2W for W <= 4)."""
    mix = [T // 2, T // 4, T // 8] + [T // 64] * 8  # one long sequence and a tail of short ones
    return {f"1 x {T}": [T], f"varlen mix ({len(mix)} seqs)": mix}


def _ring_time(fn, iters, barrier=lambda: None, p2p=(0.0,)):
    """-> medians over iters (after one warm-up) of (wall time, growth of the p2p[0] counter)."""
    import time
    times, waits = [], []
    for i in range(iters + 1):
        barrier()
        t0, w0 = time.perf_counter(), p2p[0]
        fn()
        times.append(time.perf_counter() - t0)
        waits.append(p2p[0] - w0)
    return sorted(times[1:])[iters // 2], sorted(waits[1:])[iters // 2]


def _ring_fwd_bwd(lengths, W, rank, group, H, H_kv, D, dtype):
    """-> a closure running one forward + backward of ring attention on this rank's shards."""
    import itertools
    import torch
    import context_parallel as cp
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    x = [cp.zigzag_shard(torch.randn(int(cu[-1]), h, D, generator=g), cu, rank, W).to(dtype).requires_grad_()
         for h in (H, H_kv, H_kv)]
    dout = torch.randn_like(x[0])
    return lambda: cp.ring_attention(*x, cu, group=group).backward(dout)


def _leave_gloo_worker():
    """End a spawned gloo worker after its results are written, skipping the interpreter's finalisation:
    there a gloo thread still running sometimes aborts the process ("terminate called without an active
    exception", SIGABRT), which mp.spawn reports as a failure of the whole benchmark. train.py leaves the
    same way. Only for processes started by mp.spawn: it ends the process."""
    import os

    import torch.distributed as dist
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ring_bench_worker(rank, W, init_file, out_file, opts):
    import json
    import time
    import torch
    import torch.distributed as dist
    import context_parallel as cp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    kernels, post, p2p = (cp._attn_fwd, cp._attn_bwd), cp._Ring.post, [0.0]

    def timed_post(self, buf, tag):  # time this rank spends in P2P calls: posting, and blocked in wait
        t0 = time.perf_counter()
        wait = post(self, buf, tag)
        p2p[0] += time.perf_counter() - t0

        def timed_wait():
            t0 = time.perf_counter()
            recv = wait()
            p2p[0] += time.perf_counter() - t0
            return recv
        return timed_wait

    def comm_only():  # the same loop and hops, attention kernels replaced by no-ops
        f32 = dict(dtype=torch.float32)
        cp._attn_fwd = lambda q, k, v, *a: (torch.zeros_like(q, **f32), q.new_zeros(q.shape[1], q.shape[0], **f32))
        cp._attn_bwd = lambda dout, q, k, v, *a: tuple(torch.zeros_like(x, **f32) for x in (q, k, v))

    def compute_only():  # the same loop and kernels, every "received" buffer is the one sent
        cp._Ring.post = lambda self, buf, tag: (lambda: buf)

    results = {}
    for name, lengths in _ring_workloads(opts["T"]).items():
        step = _ring_fwd_bwd(lengths, W, rank, None, opts["H"], opts["H_kv"], opts["D"], getattr(torch, opts["dtype"]))
        for mode, patch in (("total", None), ("comm", comm_only), ("compute", compute_only)):
            cp._Ring.post = timed_post
            if patch:
                patch()
            t, w = (torch.tensor(x) for x in _ring_time(step, opts["iters"], dist.barrier, p2p))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            # P2P time on the rank that waits least: the others also wait for a late peer (skew, not comm)
            dist.all_reduce(w, op=dist.ReduceOp.MIN)
            results[f"{name}|{mode}"], results[f"{name}|{mode}|p2p"] = t.item(), w.item()
            cp._attn_fwd, cp._attn_bwd = kernels
            cp._Ring.post = post
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    _leave_gloo_worker()


def bench_ring(argv):
    """Ring attention (forward + backward) over W gloo processes vs single-process attention over
    the same packed batch, and how much of the P2P time the ring hides behind compute."""
    import argparse
    import json
    import os
    import tempfile
    import torch
    import torch.multiprocessing as mp
    ap = argparse.ArgumentParser(prog="python bench.py ring")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per packed batch (multiple of 64)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--worlds", default="2,4")
    a = ap.parse_args(argv)
    opts = {"T": a.tokens, "H": a.heads, "H_kv": a.kv_heads, "D": a.head_dim, "dtype": a.dtype, "iters": a.iters}
    torch.set_num_threads(1)
    single = {name: _ring_time(_ring_fwd_bwd(lengths, 1, 0, None, a.heads, a.kv_heads, a.head_dim, getattr(torch, a.dtype)), a.iters)[0]
              for name, lengths in _ring_workloads(a.tokens).items()}
    rows = []
    for W in (int(w) for w in a.worlds.split(",")):
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_ring_bench_worker, args=(W, f"{d}/init", f"{d}/out.json", opts), nprocs=W, join=True)
            res = json.load(open(f"{d}/out.json"))
        for name, t1 in single.items():
            tot, comm, comp = (res[f"{name}|{m}"] for m in ("total", "comm", "compute"))
            exposed, p2p = res[f"{name}|total|p2p"], res[f"{name}|comm|p2p"]
            rows.append(f"| {name} | {W} | {t1 * 1e3:.0f} | {tot * 1e3:.0f} | {t1 / tot:.2f}x | {t1 / (W * tot):.0%} "
                        f"| {comp * 1e3:.0f} | {p2p * 1e3:.1f} | {exposed * 1e3:.1f} | {1 - exposed / p2p:.0%} |")
    cores = os.cpu_count()
    print(f"ring attention fwd+bwd, {a.tokens} tokens, H={a.heads}, H_kv={a.kv_heads}, D={a.head_dim}, {a.dtype}, "
          f"gloo, 1 thread per process, {cores} CPU cores, median of {a.iters}, load average {os.getloadavg()[0]:.1f} at the end")
    print("speedup = t_single / t_ring; fraction of ideal = t_single / (W * t_ring) (ring-flash-attention's "
          "measure: ideal is W times one process)\ncompute only = the same ring with P2P replaced by no-ops; "
          "P2P alone = time in P2P calls with no-op kernels;\nP2P exposed = time in P2P calls (posting + blocked "
          "in wait) during the real ring; both on the rank that waits least; hidden = 1 - exposed / alone\n")
    print("| batch | W | single (ms) | ring (ms) | speedup | fraction of ideal | compute only (ms) "
          "| P2P alone (ms) | P2P exposed (ms) | P2P hidden |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if any(int(w) > cores for w in a.worlds.split(",")):
        print(f"\nnote: W > {cores} cores oversubscribes this machine (W processes share {cores} cores), so its "
              f"speedup is capped near {cores}x and its fraction of ideal near {cores}/W; gloo's own threads compete too.")

# -----------------------------------------------------------------------------
# profile


def _profile_lengths_plan(max_len):
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


def _profile_compute_worker(rank, world, opts, out_file, barrier=None):
    """Times forward+backward of micro-batches on this device; every one of the `world` processes runs
    the same sweep at the same time (on CPU, 2 processes share the 2 cores as in the e2e runs)."""
    import itertools
    import json
    import random
    import time
    import torch
    from model import PRESETS, Transformer
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    dev = torch.device(opts["device"])
    cfg = PRESETS[opts["model"]]
    model = Transformer(cfg).to(dev)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if opts["dtype"] == "bfloat16" else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def fwd_bwd(lens):
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=dev)
        x = torch.randint(0, cfg.vocab_size, (1, sum(lens)), device=dev)
        with autocast:
            _, loss = model(x, x, cu_seqlens=cu, reduction="sum")  # every token a target
        loss.backward()

    def once(fn):
        if barrier is not None:  # all processes time the same shape at the same moment
            barrier.wait()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    # Interleaved: every pass times each shape once, in a new order each pass, and a shape's time is its
    # median over the passes. A change of machine load (a shared machine) then touches every shape
    # alike instead of biasing the shapes that happened to run during it.
    runs = [(lambda lens=[s + 2 * i for i in range(k)]: fwd_bwd(lens)) for s, k in opts["points"]]
    for fn in runs:  # warm-up
        fn()
    sync()
    ts = [[] for _ in runs]
    order = list(range(len(runs)))
    for rep in range(opts["repeats"]):
        random.Random(rep).shuffle(order)  # the same order in every process
        for i in order:
            ts[i].append(once(runs[i]))
    res = {"points": [{"lengths": [s + 2 * i for i in range(k)], "seconds": statistics.median(t)}
                      for (s, k), t in zip(opts["points"], ts)], "mem": []}
    model.zero_grad(set_to_none=False)
    if dev.type == "cuda":  # peak memory per token: the k=1 shapes, one run each
        for s, k in opts["points"]:
            if k == 1:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fwd_bwd([s])
                sync()
                res["mem"].append({"tokens": s, "bytes": torch.cuda.max_memory_allocated() - base})
                model.zero_grad(set_to_none=False)

    def timed(fn, repeats):
        fn()  # warm-up
        sync()
        return statistics.median(once(fn) for _ in range(repeats))

    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    res["t_optim"] = timed(step, opts["repeats"])
    res["n_params"] = model.num_params()
    if dev.type == "cuda":
        res["mem_static"] = torch.cuda.memory_allocated()  # weights + grads + AdamW states
        res["device_memory"] = torch.cuda.get_device_properties(dev).total_memory
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump(res, f)


def _profile_p2p_worker(rank, world, init_file, backend, sizes, out_file, cp_opts=None):
    """Ping-pong between 2 processes: one-way time = round trip / 2, for each message size. Then, with
    cp_opts, time the model with every sequence distributed over the 2 processes (ring attention)."""
    import json
    import random
    import time
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if backend == "nccl" else (lambda: None)
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
    # the same 2 processes as a CP group: model forward+backward with every sequence distributed (ring)
    # and DACP micro-batches (one distributed sequence + local ones on each rank), each timed with the
    # real ring and with its hops replaced by no-ops: the difference is the communication left exposed
    cp_out = []
    if cp_opts is not None:
        import itertools
        from functools import partial
        from context_parallel import dacp_attention, zigzag_shard
        from model import PRESETS, Transformer
        torch.manual_seed(0)
        cfg = PRESETS[cp_opts["model"]]
        model = Transformer(cfg).to(dev)

        import context_parallel
        post = context_parallel._Ring.post

        def once(xs, ps, attn, mode):  # forward+backward; compute: the same loop and kernels, no-op hops
            if mode == "compute":
                context_parallel._Ring.post = lambda self, buf, tag: (lambda: buf)
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=backend == "nccl"):
                _, loss = model(xs, xs, position_ids=ps, attn_fn=attn, reduction="sum")
            loss.backward()
            sync()
            context_parallel._Ring.post = post
            return time.perf_counter() - t0

        runs = []  # (record, (xs, ps, attn))
        for s, k in cp_opts["points"]:
            lens = [s + 2 * world * i for i in range(k)]  # multiples of 2*world, distinct
            cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=dev)
            g = torch.Generator().manual_seed(s * 31 + k)
            x = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=g).to(dev)
            pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
            xs, ps = zigzag_shard(x, cu, rank, world)[None], zigzag_shard(pos, cu, rank, world)[None]
            attn = partial(dacp_attention, cu_seqlens_dist=cu, cu_seqlens_local=torch.zeros(1, dtype=torch.int32, device=dev))
            runs.append(({"lengths": lens}, (xs, ps, attn)))
        # DACP micro-batches: one distributed sequence plus k local ones on every rank, to measure how
        # much of the ring's communication the local compute hides (CostModel.comm_overlap)
        for s, k, sl in cp_opts.get("dacp_points", []):
            loc = [sl + 2 * i for i in range(k)]
            cu = torch.tensor([0, s], dtype=torch.int32, device=dev)
            cu_loc = torch.tensor([0] + list(itertools.accumulate(loc)), dtype=torch.int32, device=dev)
            g = torch.Generator().manual_seed(s * 17 + k)
            x = torch.randint(0, cfg.vocab_size, (s + sum(loc),), generator=g).to(dev)
            pos = torch.cat([torch.arange(s)] + [torch.arange(n) for n in loc]).to(dev)
            xs = torch.cat([zigzag_shard(x[:s], cu, rank, world), x[s:]])[None]
            ps = torch.cat([zigzag_shard(pos[:s], cu, rank, world), pos[s:]])[None]
            attn = partial(dacp_attention, cu_seqlens_dist=cu, cu_seqlens_local=cu_loc)
            runs.append(({"lengths": [s], "local": loc}, (xs, ps, attn)))
        # interleaved as in _profile_compute_worker: each pass times every (shape, mode) once, in a new
        # order; a run's time is the slowest rank's, its median over the passes
        jobs = [(i, mode) for i in range(len(runs)) for mode in ("real", "compute")]
        for i, mode in jobs:  # warm-up
            once(*runs[i][1], mode)
        ts = {job: [] for job in jobs}
        for rep in range(cp_opts["repeats"]):
            random.Random(rep).shuffle(jobs)  # the same order in both processes
            for job in jobs:
                t = torch.tensor(once(*runs[job[0]][1], job[1]))
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                ts[job].append(float(t))
        cp_out = [dict(rec, **{mode: statistics.median(ts[(i, mode)]) for mode in ("real", "compute")})
                  for i, (rec, _) in enumerate(runs)]
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"p2p": out, "cp": cp_out}, f)
    _leave_gloo_worker()


def _profile_measure(args, cfg, dev, dtype):
    """Every timing the fit needs: micro-batches without CP (all processes at once), P2P ping-pong, and the
    same 2 processes as a CP group (all distributed, and DACP), each with real and no-op hops."""
    import json
    import os
    import tempfile
    import numpy as np
    import torch
    import torch.multiprocessing as mp
    points = _profile_lengths_plan(args.max_len)
    opts = dict(device=args.device, model=args.model, dtype=dtype, threads=args.threads,
                repeats=args.repeats, points=points)
    print(f"profiling {args.model} on {args.device} ({dtype}), {args.procs} process(es) x {args.threads} thread(s), "
          f"{len(points)} micro-batch shapes up to {args.max_len} tokens ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "compute")
        if args.procs == 1:
            _profile_compute_worker(0, 1, opts, out_file)
        else:
            barrier = mp.get_context("spawn").Barrier(args.procs)
            mp.spawn(_profile_compute_worker, args=(args.procs, opts, out_file, barrier), nprocs=args.procs)
        runs = [json.load(open(f"{out_file}.{r}")) for r in range(args.procs)]
    secs = np.mean([[p["seconds"] for p in r["points"]] for r in runs], axis=0)
    meas = dict(runs[0], compute=[{"lengths": p["lengths"], "seconds": float(t)} for p, t in zip(runs[0]["points"], secs)],
                t_optim=float(np.mean([r["t_optim"] for r in runs])))
    backend = "nccl" if dev.type == "cuda" and torch.cuda.device_count() >= 2 else "gloo"
    sizes = [1 << e for e in range(10, 21 + (args.max_p2p_mb.bit_length() - 1), 2)]
    cp_opts = None
    if dev.type == "cpu" or backend == "nccl":  # one GPU: no CP group to time
        cp_pts = [(s, k) for s, k in points if (k in (1, 4) and s >= 64 or k == 16) and s * k <= max(4096, args.max_len // 2)]
        dacp_pts = [(s, k, sl) for s in (256, 1024, 2048) for k, sl in ((4, 64), (8, 128), (2, 512))]
        cp_opts = dict(model=args.model, points=cp_pts, repeats=args.repeats, dacp_points=dacp_pts)
    print(f"P2P ping-pong ({backend}) and CP=2 micro-batches (real ring and no-op hops) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "p2p.json")
        mp.spawn(_profile_p2p_worker, args=(2, os.path.join(tmp, "init"), backend, sizes, out_file, cp_opts), nprocs=2)
        got = json.load(open(out_file))
    meas.update(p2p=got["p2p"], cp=got["cp"], backend=backend)
    return meas


FIT = ("a", "a_attn", "a_ring", "b_call", "b_seq", "c_mb")  # the compute constants, fitted together


def _profile_plan(m, W=2):
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
    mb, lengths = _profile_plan(m)
    return cm.rank_times(mb, lengths)[0]


def _profile_fit(cfg, meas, comm_bytes):
    """The cost model's constants from the profile's own runs, in two steps.
    1. compute: without communication CostModel.rank_time is linear in FIT, so one non-negative least-
       squares fit (relative error: short micro-batches count as much as long ones) over the runs without
       CP and the CP runs with no-op hops. Each column is the model's prediction with that constant = 1.
    2. communication: bandwidth from the ping-pong; the hop latency under load and comm_overlap by a grid
       search on the real CP runs (all distributed, DACP), compute constants fixed: the share of each
       hop that the step's compute hides is measured, not assumed."""
    import numpy as np
    from scipy.optimize import nnls
    from scheduler import CostModel
    pb = np.array([p["bytes"] for p in meas["p2p"]], dtype=float)
    ps = np.array([p["seconds"] for p in meas["p2p"]])
    (lat0, inv_bw), _ = nnls(np.stack([np.ones_like(pb), pb], 1) / ps[:, None], np.ones_like(ps))
    bw = float(1 / inv_bw) if inv_bw > 0 else 1e12
    zero = dict.fromkeys(FIT, 0.0)
    nocomm = dict(p2p_latency=0.0, p2p_bandwidth=1e30, comm_overlap=0.0, comm_bytes=comm_bytes)
    runs = meas["compute"] + [dict(m, seconds=m["compute"]) for m in meas["cp"]]
    X = np.array([[_predict(CostModel(cfg, {**zero, **nocomm, k: 1.0}), m) for k in FIT] for m in runs])
    y = np.array([m["seconds"] for m in runs])
    coef, _ = nnls(X / y[:, None], np.ones_like(y))
    fit = dict(zip(FIT, (float(x) for x in coef)), p2p_bandwidth=bw, comm_bytes=comm_bytes)
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


def _profile_report(cfg, meas, fit):
    """Prints every profiled run beside the fitted model; returns the relative errors."""
    import numpy as np
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


def _profile_write(path, args, cfg, dev, dtype, meas, fit, errs):
    """The JSON that CostModel.from_profile, train.py --profile and bench.py e2e read."""
    import json
    import os
    import time
    import numpy as np
    import torch
    from memory import activation_model
    if dev.type == "cuda":  # memory per token and BucketSize C = (device memory - static - beta) / alpha
        toks = np.array([m["tokens"] for m in meas["mem"]], dtype=float)
        byts = np.array([m["bytes"] for m in meas["mem"]], dtype=float)
        alpha, beta = np.polyfit(toks, byts, 1)
        static, device_memory = float(meas["mem_static"]), float(meas["device_memory"])
        mem_note = "measured: torch.cuda.max_memory_allocated, linear fit over the k=1 points"
        usable = 0.9 * device_memory  # leave 10% for the allocator's fragmentation and NCCL buffers
    else:
        alpha, beta = activation_model(cfg, "none", torch.float32)
        static = 16.0 * meas["n_params"]  # fp32 weights, grads, AdamW m and v
        device_memory = (args.mem_gb * 1e9 if args.mem_gb else
                         os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / args.procs)
        usable = device_memory
        mem_note = "memory.activation_model: saved tensors counted on the meta device, fp32; CPU has no peak counter"
    bucket = int((usable - static - beta) / alpha)
    prof = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": dtype, "procs": args.procs, "threads": args.threads, "torch": torch.__version__,
        "taken": time.strftime("%Y-%m-%d %H:%M:%S"), "load": meas["load"],
        "model": {k: getattr(cfg, k) for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                                               "intermediate_size", "tie_embeddings")},
        **fit, "t_optim": meas["t_optim"], "grad_bytes": 4, "p2p_backend": meas["backend"],
        "mem_per_token": float(alpha), "mem_beta": float(beta), "mem_static": static,
        "device_memory": device_memory, "bucket_size": bucket, "mem_note": mem_note, "fit_errors": errs,
        "measurements": {k: meas[k] for k in ("compute", "p2p", "cp", "mem")},
    }
    with open(path, "w") as f:
        json.dump(prof, f, indent=1)
    gf = lambda a: f"{1 / a / 1e9:.1f} GFLOP/s" if a else "inf"  # noqa: E731
    print(f"\na = {fit['a']:.3e} s/FLOP ({gf(fit['a'])}, linear)   a_attn = {fit['a_attn']:.3e} ({gf(fit['a_attn'])}, "
          f"local attention)   a_ring = {fit['a_ring']:.3e} ({gf(fit['a_ring'])}, ring blocks)")
    print(f"b_call = {fit['b_call'] * 1e6:.1f} us/attention call/layer/pass   b_seq = {fit['b_seq'] * 1e6:.1f} us/sequence in a call   "
          f"c_mb = {fit['c_mb'] * 1e3:.3f} ms/micro-batch   t_optim = {meas['t_optim'] * 1e3:.2f} ms")
    print(f"P2P ({meas['backend']}): ping-pong latency {fit['p2p_pingpong_latency'] * 1e6:.1f} us, bandwidth "
          f"{fit['p2p_bandwidth'] / 1e9:.2f} GB/s; in the ring: hop latency {fit['p2p_latency'] * 1e6:.0f} us, "
          f"comm_overlap {fit['comm_overlap']:.2f} (share of a hop hidden behind the step's compute)")
    print(f"memory: {alpha / 1024:.1f} KiB/token, static {static / 2**20:.1f} MiB of {device_memory / 2**30:.1f} GiB "
          f"-> bucket_size {bucket} tokens ({mem_note})")
    print(f"machine load (1-minute average) {meas['load'][0]:.1f} before, {meas['load'][1]:.1f} after (this profile's own "
          f"{args.procs} process(es) count; a higher load means other work shared the machine, and these constants "
          f"then describe a busier machine than an idle one)")
    print(f"wrote {path}")


def bench_profile(argv):
    """Measure the cost model's constants (scheduler.CostModel) on this device and write them as JSON:
    measure (_profile_measure), fit (_profile_fit: compute constants by least squares, then hop latency
    and comm_overlap on the real CP runs), report every run beside the model, write (_profile_write).
    Memory per token and bucket_size are measured on CUDA and estimated from the config on CPU, where
    nothing reports peak tensor memory. Timings are medians over --repeats runs; on a shared machine
    expect +-15% between profiles.
        python bench.py profile [--out profile_cpu.json] [--model tiny] [--max_len 8192]
    then: python train.py config/long_sft_cpu.py --profile=profile_cpu.json"""
    import argparse
    import os
    import torch
    from model import PRESETS
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python bench.py profile")
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
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    cfg = PRESETS[args.model]
    load0 = os.getloadavg()[0]
    meas = _profile_measure(args, cfg, dev, dtype)
    meas["load"] = [load0, os.getloadavg()[0]]  # 1-minute load average before and after: was the machine shared?
    fit = _profile_fit(cfg, meas, 2 if dtype == "bfloat16" else 4)
    errs = _profile_report(cfg, meas, fit)
    _profile_write(args.out, args, cfg, dev, dtype, meas, fit, errs)

# -----------------------------------------------------------------------------
# memory


def bench_memory(argv):
    """FSDP2 (train.py fsdp=True) against the plain all-reduce, and the memory model against a GPU.
    CPU (default): config/long_sft_cpu.py on 4 gloo processes (dp 2 x cp 2, 1 thread each), fsdp off and on
    alternately, `--reps` times: median step time (steps after the first) and the state each rank holds.
    --gpu: config/long_sft.py on one CUDA GPU (dp 1 x cp 1, the bucket cut to what one rank holds) with
    fsdp=True, in each activation_checkpoint mode: torch.cuda.max_memory_allocated of every step next to
    memory.py's prediction for that step (static state + beta + alpha x the rank's peak tokens).
        python bench.py memory [--iters 6] [--reps 3]
        python bench.py memory --gpu [--iters 3] [--bucket_size 26000] [--batch_size 16]"""
    import argparse
    import tempfile
    ap = argparse.ArgumentParser(prog="bench.py memory")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket_size", type=int, default=26000)
    ap.add_argument("--batch_size", type=int, default=16)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    if args.gpu:
        iters = args.iters or 3
        print(f"config/long_sft.py, 1 GPU, fsdp=True, bucket {args.bucket_size}, batch {args.batch_size}, {iters} steps per mode")
        print(f"{'mode':>10} {'step':>4} {'peak tok':>8} {'measured GiB':>12} {'predicted GiB':>13} {'measured/pred':>13}")
        for mode in ("none", "full", "selective"):
            recs = _train_run(f"{tmp}/{mode}", 1, dict(cp=1, fsdp=True, activation_checkpoint=mode, max_iters=iters,
                                                      bucket_size=args.bucket_size, synthetic_max_len=args.bucket_size,
                                                      batch_size=args.batch_size, checkpoint_interval=0,
                                                      eval_interval=0, export=False),
                              config="config/long_sft.py")
            for r in recs:
                m, p = r["max_memory_allocated"], r["predicted_memory"]
                print(f"{mode:>10} {r['iter']:>4} {r['peak_tokens_per_rank']:>8} {m / 2**30:>12.2f} {p / 2**30:>13.2f} {m / p:>13.3f}")
        return
    iters = args.iters or 6
    print(f"config/long_sft_cpu.py, 4 gloo ranks (dp 2 x cp 2), {iters} steps, median step time of steps 2..{iters}")
    print(f"{'rep':>3} {'all-reduce ms':>13} {'fsdp ms':>8} {'fsdp/all-reduce':>15}")
    ratios, state = [], {}
    for rep in range(args.reps):
        ms = {}
        for fsdp in (False, True):
            recs = _train_run(f"{tmp}/{rep}_{fsdp}", 4, dict(cp=2, fsdp=fsdp, max_iters=iters, checkpoint_interval=0, threads=1,
                                                                   eval_interval=0, export=False))
            ms[fsdp] = statistics.median(r["dt_ms"] for r in recs[1:])
            state[fsdp] = (recs[0]["state_bytes_per_rank"], recs[0]["peak_state_bytes_per_rank"])
        ratios.append(ms[True] / ms[False])
        print(f"{rep:>3} {ms[False]:>13.1f} {ms[True]:>8.1f} {ratios[-1]:>15.2f}")
    print(f"fsdp/all-reduce step time: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    for fsdp in (False, True):
        print(f"fsdp={fsdp}: state_bytes_per_rank {state[fsdp][0]:,}  peak_state_bytes_per_rank {state[fsdp][1]:,}")
    print(f"state with fsdp / without: {state[True][0] / state[False][0]:.3f}")

# -----------------------------------------------------------------------------
# e2e


def _train_run(out_dir, nproc, overrides, config="config/long_sft_cpu.py"):
    """One `torchrun train.py <config>` run; returns its metrics.jsonl records."""
    import json
    import os
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [config] + [f"--{k}={v}" for k, v in overrides.items()] + [f"--out_dir={out_dir}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", "train.py"] + argv
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        with open(os.path.join(out_dir, "failed.log"), "w") as f:
            f.write(r.stdout + "\n" + r.stderr)
        raise SystemExit(f"{' '.join(cmd)} failed (full log: {out_dir}/failed.log):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def _plan_key(plan):
    """A plan up to what its time does not depend on: the order of DP ranks, of micro-batches, of CP
    ranks and of the distributed sequences (a rank's local sequences keep their order: it sets how
    dacp_attention slices them over the ring steps)."""
    return tuple(sorted(tuple(sorted((tuple(sorted(mb.distributed)), tuple(sorted(tuple(loc) for loc in mb.local)))
                                     for mb in mbs)) for mbs in plan))


def bench_e2e(argv):
    """End to end, measured against the cost model: train.py with 2 gloo processes (1 thread each) in two
    layouts, dp=2 x cp=1 (GDS balances DP ranks) and dp=1 x cp=2 (DACP local vs distributed), on a
    long-tail and a bimodal synthetic set (paper Table 1 shapes, scaled), every policy on the same global
    batches (same seed) with the same kernels and code path: only the plan differs. Policies whose plans
    are the same on every step run once (their times would differ by noise only: "same plans"). The
    runs are interleaved, rep after rep in a rotated order, so the policies see the same machine
    noise; each step's time is the median over reps. Beside it: CostModel's prediction for that step's
    plan from the profile (fitted on the profile's own runs, never on these). Each run's 1-minute load
    average is printed beside the profile's: on a shared machine the two drift apart, and so do
    prediction and measurement.
        python bench.py e2e [--profile profile_cpu.json] [--iters 6] [--reps 3] [--policies naive,skrull,skrull_plus]"""
    import argparse
    import json
    import os
    import tempfile
    import time
    import numpy as np
    from data.prepare import global_batch, heldout_split, load_dataset
    from data.synthetic import make_synthetic
    from scheduler import POLICIES, CostModel, schedule

    ap = argparse.ArgumentParser(prog="python bench.py e2e")
    ap.add_argument("--profile", default="profile_cpu.json", help="made by `python bench.py profile` if missing")
    ap.add_argument("--iters", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the timing")
    ap.add_argument("--reps", type=int, default=3, help="runs per policy and cell, interleaved")
    ap.add_argument("--batch_size", type=int, default=16, help="sequences per DP rank per step")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    bad = [p for p in policies if p not in POLICIES]
    if bad or args.iters <= args.warmup or args.reps < 1 or args.batch_size < 1:
        raise SystemExit(f"bench.py e2e: need known policies ({', '.join(POLICIES)}; got {', '.join(bad) or 'ok'}), "
                         f"iters > warmup, reps >= 1, batch_size >= 1")
    if not os.path.exists(args.profile):
        print(f"{args.profile} not found: profiling this machine first", flush=True)
        bench_profile(["--out", args.profile])
    cost = CostModel.from_profile(None, args.profile)
    with open(args.profile) as f:
        prof_meta = json.load(f)
    t_start, loads = time.time(), []
    # (name, Table 1 shape, max_len = bucket_size): the long-tail set at the CPU config's 8192 tokens,
    # the bimodal one at 4096 (its mean sample is 10x longer, so steps are 10x dearer)
    sets = (("long-tail", "wikipedia", 8192), ("bimodal", "chatqa2", 4096))
    layouts = ((2, 1), (1, 2))
    steps = list(range(args.warmup, args.iters))
    cells = []
    tmp = tempfile.mkdtemp(prefix="skrull_e2e_")  # kept: run logs for inspection
    for label, shape, max_len in sets:
        data = make_synthetic(os.path.join(tmp, shape), dist=shape, n=2000, max_len=max_len, seed=0, verbose=False)
        ds = load_dataset(data)
        for dp, cp in layouts:
            # the global batches train.py draws (its training split: nothing is held out, eval_fraction=0)
            train_ids, _ = heldout_split(len(ds), 0.0, args.seed)
            batches = [[int(ds.lengths[i]) for i in train_ids[global_batch(len(train_ids), dp * args.batch_size, it, args.seed)]]
                       for it in range(args.iters)]
            plans = {p: [schedule(b, dp=dp, cp=cp, bucket_size=max_len, policy=p, cost=cost, seed=args.seed + it)
                         for it, b in enumerate(batches)] for p in policies}
            pred = {p: np.array([cost.predict_step_time(plans[p][it], batches[it]) for it in steps]) for p in policies}
            # policies whose plans are the same on every step (e.g. naive and dacp without CP) run once:
            # their measured times would differ by noise only
            same, runs = {}, []
            for p in policies:
                key = tuple(_plan_key(plan) for plan in plans[p])
                first = next((q for q in runs if tuple(_plan_key(plan) for plan in plans[q]) == key), None)
                same[p] = first or p
                if first is None:
                    runs.append(p)
            meas = {p: [] for p in runs}  # per rep: the timed steps' seconds
            for rep in range(args.reps):
                for p in runs[rep % len(runs):] + runs[:rep % len(runs)]:  # each rep in a rotated order
                    loads.append(os.getloadavg()[0])
                    m = _train_run(os.path.join(tmp, f"{shape}_{dp}x{cp}_{p}_{rep}"), dp * cp, dict(
                        dataset=data, cp=cp, schedule=p, bucket_size=max_len, batch_size=args.batch_size,
                        max_iters=args.iters, checkpoint_interval=0, threads=1, seed=args.seed, profile=args.profile,
                        eval_fraction=0.0))
                    meas[p].append(np.array([r["dt_ms"] / 1e3 for r in m[args.warmup:]]))
                print(f"  {label} dp={dp} cp={cp} rep {rep}: " + "  ".join(f"{p} {meas[p][-1].sum():.2f}s" for p in runs), flush=True)
            cells.append((label, dp, cp, pred, {p: np.array(meas[same[p]]) for p in policies}, same))

    print(f"\nend to end, tiny model, 2 processes x 1 thread, gloo, {len(steps)} timed steps x {args.reps} interleaved runs "
          f"per policy and cell, batch_size {args.batch_size}/DP rank, bucket = max_len; predicted = scheduler.CostModel "
          f"with {args.profile}; a step's measured time is its median over the runs")
    pl = prof_meta.get("load")
    print(f"{time.time() - t_start:.0f} s; machine load (1-minute average) at the runs' starts {min(loads):.1f}-{max(loads):.1f}, "
          f"at the profile ({prof_meta.get('taken', '?')}) " + (f"{pl[0]:.1f}-{pl[1]:.1f}" if pl else "not recorded"))
    print("\nper step (ms, median over the timed steps of the per-step values) and per-step error |pred/meas - 1|:")
    print("| data | dp x cp | policy | measured ms/step | spread over runs | predicted ms/step | median per-step error |")
    print("|---|---|---|---|---|---|---|")
    all_err = []
    for label, dp, cp, pred, meas, same in cells:
        for p in policies:
            per_step = np.median(meas[p], axis=0)
            err = np.abs(pred[p] / per_step - 1)
            if same[p] == p:  # a policy with another's plans adds nothing new
                all_err += list(err)
            run_tot = meas[p].sum(axis=1) / len(steps)
            print(f"| {label} | {dp}x{cp} | {p}{'' if same[p] == p else f' (= {same[p]})'} | {np.median(per_step) * 1e3:.1f} | {run_tot.min() * 1e3:.1f}-{run_tot.max() * 1e3:.1f} "
                  f"| {np.median(pred[p]) * 1e3:.1f} | {np.median(err) * 100:.0f}% |")
    print(f"median absolute per-step error over every step, policy and cell: {np.median(all_err) * 100:.1f}% "
          f"(mean {np.mean(all_err) * 100:.1f}%, max {np.max(all_err) * 100:.0f}%)")
    pairs = [(a, b) for a, b in (("skrull_plus", "skrull"), ("skrull_plus", "naive"), ("skrull", "naive"),
                                 ("skrull_plus", "sorted"), ("skrull_plus", "dacp")) if a in policies and b in policies]
    print("\nspeedups (time of the second policy / time of the first, summed over the timed steps); spread = min-max over "
          "the runs paired by rep:")
    print("| data | dp x cp | " + " | ".join(f"{a} vs {b}: measured (spread) / predicted" for a, b in pairs) + " |")
    print("|---|---|" + "---|" * len(pairs))
    worst = 0.0
    for label, dp, cp, pred, meas, same in cells:
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



def bench_lora(argv):
    """LoRA vs full fine-tuning in one command: train.py config/long_sft_cpu.py (skrull schedule, 1 process,
    1 thread) with and without adapters on the same global batches, the two alternating. Trainable
    parameters and optimizer-state bytes are read back from each run's checkpoint (the AdamW tensors it
    holds: exp_avg, exp_avg_sq, step); tokens/s is the median over the timed steps of a run, and the table
    gives the median and the range over --reps runs.
        python bench.py lora [--iters 30] [--reps 3] [--lora_rank 8] [--lora_targets all]"""
    import argparse
    import os
    import tempfile
    from safetensors import safe_open

    ap = argparse.ArgumentParser(prog="python bench.py lora")
    ap.add_argument("--iters", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the timing")
    ap.add_argument("--reps", type=int, default=3, help="runs per setting, alternating LoRA and full")
    ap.add_argument("--lora_rank", type=int, default=8)
    ap.add_argument("--lora_targets", default="all")
    ap.add_argument("--model_preset", default="tiny", help="model.PRESETS key")
    args = ap.parse_args(argv)
    settings = {"full": {}, "lora": {"lora_rank": args.lora_rank, "lora_alpha": 2 * args.lora_rank,
                                     "lora_targets": args.lora_targets}}
    tmp = tempfile.mkdtemp(prefix="skrull_lora_")  # kept: run logs for inspection
    tps, state = {k: [] for k in settings}, {}
    for rep in range(args.reps):
        for name in (settings if rep % 2 == 0 else list(settings)[::-1]):
            out = os.path.join(tmp, f"{name}_{rep}")
            m = _train_run(out, 1, dict(max_iters=args.iters, checkpoint_interval=args.iters, threads=1, export=False,
                                        model_preset=args.model_preset, eval_interval=0, **settings[name]))
            tps[name].append(statistics.median(r["tok_per_s"] for r in m[args.warmup:]))
            with safe_open(os.path.join(out, "ckpt.safetensors"), "pt") as f:
                optim = {k: f.get_slice(k) for k in f.keys() if k.startswith("optim.")}
                trainable = sum(_numel(s.get_shape()) for k, s in optim.items() if k.endswith(".exp_avg"))
                nbytes = sum(_numel(s.get_shape()) * _itemsize(s.get_dtype()) for s in optim.values())
            state[name] = (trainable, nbytes)
            print(f"  {name} rep {rep}: {tps[name][-1]:,.0f} tok/s (median of steps {args.warmup}..{args.iters - 1})", flush=True)
    print(f"\nLoRA (r={args.lora_rank}, alpha={2 * args.lora_rank}, targets {args.lora_targets}) vs full fine-tuning, "
          f"model preset {args.model_preset}, train.py config/long_sft_cpu.py, 1 process x 1 thread, "
          f"{args.iters - args.warmup} timed steps x {args.reps} runs each, alternating")
    print("| setting | trainable params | vs full | optimizer-state bytes | tok/s median | tok/s range |")
    print("|---|---|---|---|---|---|")
    for name in settings:
        trainable, nbytes = state[name]
        t = sorted(tps[name])
        print(f"| {name} | {trainable:,} | {100 * trainable / state['full'][0]:.1f}% | {nbytes:,} | "
              f"{statistics.median(t):,.0f} | {t[0]:,.0f}-{t[-1]:,.0f} |")
    ratio = statistics.median(tps["lora"]) / statistics.median(tps["full"])
    print(f"LoRA / full: {state['lora'][0] / state['full'][0]:.3f}x trainable parameters, "
          f"{state['lora'][1] / state['full'][1]:.3f}x optimizer state, {ratio:.2f}x tokens/s")


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype):  # safetensors dtype names
    return {"F64": 8, "F32": 4, "I64": 8, "F16": 2, "BF16": 2, "I32": 4}[dtype]

# -----------------------------------------------------------------------------
# gpu

# Tolerances, fixed before any run: relative error ||got - ref|| / ||ref|| against an fp64 CPU
# reference. bf16 operands round each input to 8 bits of mantissa: one kernel lands between 1e-3
# and 1e-2; a model stacks layers, so its bound is looser. Losses compare runs of the same code.
GPU_TOL = {
    "kernel": 1e-2,      # one attention call (out, dq, dk, dv), bf16 vs fp64
    "ring": 1e-2,        # in-process ring, W ranks of blocks merged in fp32, bf16 vs fp64
    "model": 3e-2,       # 2-layer Qwen2 forward (loss) and backward (all gradients), bf16 autocast vs fp64
    "policy": 1e-2,      # naive vs skrull losses, same batches, bf16 autocast (summation order differs)
    "resume": 1e-3,      # resumed vs uninterrupted losses (flash backward accumulates dq with atomics)
}


def _rel(got, ref):
    import torch
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _gpu_kernel_checks(dev, dtype, rows):
    """The kernel path of model.varlen_attention on a local batch and on rectangular blocks."""
    import torch
    import context_parallel as cp
    from model import varlen_attention
    g = torch.Generator().manual_seed(0)
    H, Hkv, D = 14, 2, 64  # Qwen2.5-0.5B's heads
    lengths = [1, 100, 257, 512, 2048, 77]
    cu = torch.tensor([0] + list(__import__("itertools").accumulate(lengths)), dtype=torch.int32)
    ref_in = [torch.randn(int(cu[-1]), h, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv)]
    x = [t.detach().to(dev, dtype).requires_grad_() for t in ref_in]
    ref, out = varlen_attention(*ref_in, cu), varlen_attention(*x, cu.to(dev))
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(dout)
    out.backward(dout.to(dev, dtype))
    errs = [_rel(out, ref)] + [_rel(a.grad, b.grad) for a, b in zip(x, ref_in)]
    rows.append((f"kernel: varlen_attention fwd+bwd, {len(lengths)} seqs (1..2048), H {H}/{Hkv}", max(errs), GPU_TOL["kernel"],
                 "out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs)))
    # rectangular blocks (cu_q != cu_k, no mask: the ring's off-diagonal steps), lse layout (H, Tq)
    cu_q, cu_k = [0, 64, 65, 300, 556], [0, 128, 130, 600, 856]
    q, k, v = (torch.randn(n, h, D, generator=g, dtype=torch.float64) for n, h in ((556, H), (856, Hkv), (856, Hkv)))
    do = torch.randn(556, H, D, generator=g, dtype=torch.float64)
    ro, rl = cp._attn_fwd(q, k, v, cp._cu(cu_q, "cpu"), cp._cu(cu_k, "cpu"), False, D ** -0.5)
    rg = cp._attn_bwd(do, q, k, v, ro, rl, cp._cu(cu_q, "cpu"), cp._cu(cu_k, "cpu"), False, D ** -0.5)
    xq, xk, xv, xdo = (t.to(dev, dtype) for t in (q, k, v, do))
    o, lse = cp._attn_fwd(xq, xk, xv, cp._cu(cu_q, dev), cp._cu(cu_k, dev), False, D ** -0.5)
    if lse.shape != (H, 556) or lse.dtype != torch.float32:
        raise RuntimeError(f"lse {tuple(lse.shape)} {lse.dtype}, expected ({H}, 556) float32")
    gr = cp._attn_bwd(xdo, xq, xk, xv, o, lse, cp._cu(cu_q, dev), cp._cu(cu_k, dev), False, D ** -0.5)
    errs = [_rel(o, ro), _rel(lse, rl)] + [_rel(a, b) for a, b in zip(gr, rg)]
    rows.append(("kernel: rectangular blocks (cu_q != cu_k), lse (H, Tq) fp32", max(errs), GPU_TOL["kernel"],
                 "out/lse/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs)))


def _ring_inputs(W, dist_lens, local_lens, dev, dtype, g, H=14, Hkv=2, D=64):
    """fp64 CPU reference (plain varlen attention over whole sequences) and each emulated rank's inputs."""
    import itertools
    import torch
    import context_parallel as cp
    from model import varlen_attention
    cu_d = [0] + list(itertools.accumulate(dist_lens))
    make = lambda T, h: torch.randn(T, h, D, generator=g, dtype=torch.float64)  # noqa: E731
    d = [make(cu_d[-1], h) for h in (H, Hkv, Hkv, H)]
    locs = [[make(sum(ls), h) for h in (H, Hkv, Hkv, H)] for ls in local_lens]

    def ref(q, k, v, do, cu):
        if not cu[-1]:
            return [q, q, k, v]
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32))
        out.backward(do)
        return [out.detach(), q.grad, k.grad, v.grad]
    ref_d = ref(*d, cu_d)
    refs, xs = [], []
    for r in range(W):
        cu_l = [0] + list(itertools.accumulate(local_lens[r]))
        ref_l = ref(*locs[r], cu_l)
        refs.append([torch.cat([cp.zigzag_shard(a, cu_d, r, W), b]) for a, b in zip(ref_d, ref_l)])
        xs.append([torch.cat([cp.zigzag_shard(a, cu_d, r, W), b]).to(dev, dtype) for a, b in zip(d, locs[r])])
    cu_locals = [[0] + list(itertools.accumulate(ls)) for ls in local_lens]
    return cu_d, cu_locals, refs, xs


def _gpu_ring_checks(dev, dtype, rows):
    """The in-process ring (same blocks and step loop, hops handed over in memory) at W = 2, 4, 8."""
    import torch
    import context_parallel as cp
    g = torch.Generator().manual_seed(1)
    for W in (2, 4, 8):
        n2 = 2 * W
        dist_lens = [n2 * 96, n2 * 5, n2, n2 * 33]  # long, short, one chunk per rank, odd multiple
        local_lens = [[37 + 11 * r, 300, 1][:1 + r % 3] for r in range(W)]
        local_lens[W - 1] = []  # a rank without local sequences
        cu_d, cu_locals, refs, xs = _ring_inputs(W, dist_lens, local_lens, dev, dtype, g)
        qkv = [[x[i].requires_grad_() for x in xs] for i in range(3)]
        outs = cp.emulated_attention(*qkv, cu_d, cu_locals)
        torch.autograd.backward(outs, [x[3] for x in xs])
        got = [torch.cat(t) for t in (outs, *([x.grad for x in qkv[i]] for i in range(3)))]
        ref = [torch.cat([r[i] for r in refs]) for i in range(4)]
        errs = [_rel(a, b) for a, b in zip(got, ref)]
        rows.append((f"ring: in-process W={W}, {len(dist_lens)} distributed + local seqs", max(errs), GPU_TOL["ring"],
                     "out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs)))


def _gpu_sync_check(dev, dtype, rows):
    """A prebuilt plan makes a layer's attention forward and backward free of host-device syncs:
    CUDA's sync debug mode turns any sync into an error."""
    import torch
    import context_parallel as cp
    g = torch.Generator().manual_seed(2)
    for W, dist_lens, local_lens in ((1, [], [[100, 257, 1, 512]]), (4, [8 * 64, 8 * 3], [[50], [], [7, 300], [64]])):
        cu_d, cu_locals, _, xs = _ring_inputs(W, dist_lens, local_lens, dev, dtype, g)
        plans = [cp.AttnPlan(cu_d if dist_lens else None, cu_locals[r], dev, world=W, rank=r) for r in range(W)]
        qkv = [[x[i].requires_grad_() for x in xs] for i in range(3)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = cp._DACPAttention.apply(cp._MemoryRing() if W > 1 else None, plans, *qkv[0], *qkv[1], *qkv[2])
            torch.autograd.backward(outs, [x[3] for x in xs])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        rows.append((f"no host-device sync: attention fwd+bwd with a prebuilt plan, W={W}", 0.0, 0.0,
                     "torch.cuda.set_sync_debug_mode('error') raised nothing"))


def _gpu_model_check(dev, dtype, rows):
    """A 2-layer Qwen2 (0.5B's head layout): bf16 autocast on the device vs fp64 on the CPU, same weights."""
    import itertools
    import torch
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1024, n_layer=2, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864)
    ref = Transformer(cfg).double()
    model = Transformer(cfg).to(dev)
    model.load_state_dict(ref.state_dict())
    lengths = [700, 1, 33, 1290]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    idx = torch.randint(0, cfg.vocab_size, (1, int(cu[-1])))
    _, ref_loss = ref(idx, idx, cu_seqlens=cu)
    ref_loss.backward()
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32 and dev.type == "cuda"):
        _, loss = model(idx.to(dev), idx.to(dev), cu_seqlens=cu.to(dev))
    loss.backward()
    names = [n for n, _ in ref.named_parameters()]
    p_ref, p = dict(ref.named_parameters()), dict(model.named_parameters())
    g_err = _rel(torch.cat([p[n].grad.reshape(-1).cpu().double() for n in names]),
                 torch.cat([p_ref[n].grad.reshape(-1) for n in names]))
    worst = max(names, key=lambda n: _rel(p[n].grad, p_ref[n].grad))
    errs = [_rel(loss, ref_loss), g_err]
    rows.append((f"model: 2-layer Qwen2 (896 wide, 14/2 heads) fwd+bwd, {len(lengths)} packed seqs", max(errs), GPU_TOL["model"],
                 f"loss {errs[0]:.1e}, all grads {errs[1]:.1e} (worst tensor {worst} {_rel(p[worst].grad, p_ref[worst].grad):.1e})"))


def _gpu_train_checks(dev, rows, tput, args):
    """train.py as users run it: bf16 autocast steps under naive and skrull, checkpoint + resume with
    fused AdamW, and tokens/s of the Qwen2.5-0.5B shape on ChatQA2-shaped batches."""
    import os
    import statistics
    import tempfile
    import numpy as np
    from data.synthetic import make_synthetic
    tmp = tempfile.mkdtemp(prefix="skrull_gpu_")
    small = make_synthetic(os.path.join(tmp, "small"), dist="chatqa2", n=256, max_len=2048, seed=0, verbose=False)
    common = dict(dataset=small, model_preset="tiny", batch_size=8, bucket_size=2048, max_iters=8, warmup_iters=2,
                  lr_decay_iters=8, checkpoint_interval=0, device=dev.type, dtype="bfloat16" if dev.type == "cuda" else "float32")
    runs = {p: _train_run(os.path.join(tmp, p), 1, {**common, "schedule": p}) for p in ("naive", "skrull")}
    for p, m in runs.items():
        losses = [r["loss"] for r in m]
        ok = all(np.isfinite(losses)) and losses[-1] < losses[0]
        rows.append((f"train: {len(m)} {common['dtype']} steps, tiny Qwen2, schedule={p}", 0.0 if ok else float("nan"), 0.0,
                     f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (finite, falling)"))
    la, lb = (np.array([r["loss"] for r in runs[p]]) for p in ("naive", "skrull"))
    rows.append(("train: naive vs skrull, same batches", float(np.max(np.abs(la - lb) / np.abs(la))), GPU_TOL["policy"],
                 "max relative loss difference over steps"))
    part = os.path.join(tmp, "resume")
    _train_run(part, 1, {**common, "schedule": "skrull", "max_iters": 4, "checkpoint_interval": 4})
    resumed = _train_run(part, 1, {**common, "schedule": "skrull", "init_from": "resume"})
    lr_ = np.array([r["loss"] for r in resumed])
    rows.append(("train: checkpoint at 4, resume to 8 (fused AdamW on CUDA)", float(np.max(np.abs(lr_ - lb) / np.abs(lb))),
                 GPU_TOL["resume"], "max relative loss difference vs the uninterrupted run"))
    if args.skip_throughput:
        return
    # tokens/s: Qwen2.5-0.5B's layers (vocabulary: the synthetic byte tokenizer's, 320 rows), cp=1, one GPU
    big = make_synthetic(os.path.join(tmp, "chatqa2"), dist="chatqa2", n=512, max_len=args.max_len, seed=0, verbose=False)
    cfg = dict(dataset=big, model_preset="qwen2.5-0.5b", batch_size=args.batch_size, bucket_size=args.bucket,
               max_iters=args.iters, warmup_iters=2, learning_rate=2e-5, min_lr=2e-6, checkpoint_interval=0,
               device=dev.type, dtype="bfloat16", cp=1)
    res = {p: [] for p in ("naive", "skrull")}
    for rep in range(args.reps):
        for p in (("naive", "skrull") if rep % 2 == 0 else ("skrull", "naive")):
            m = _train_run(os.path.join(tmp, f"tput_{p}_{rep}"), 1, {**cfg, "schedule": p})[args.warmup:]
            res[p].append(m)
            print(f"  0.5B shape, {p}, rep {rep}: {sum(r['tokens'] for r in m) / sum(r['dt_ms'] for r in m) * 1e3:,.0f} tok/s", flush=True)
    for p, reps in res.items():
        tps = [sum(r["tokens"] for r in m) / sum(r["dt_ms"] for r in m) * 1e3 for m in reps]
        steps = [r for m in reps for r in m]
        top = max(steps, key=lambda r: r.get("max_memory_allocated", 0))
        gib = top.get("max_memory_allocated", 0) / 2 ** 30
        tput[p] = tps
        tput[p + "_mem"] = (gib, top["peak_tokens_per_rank"], statistics.median(r["n_microbatches"] for r in steps))
    tput["cfg"] = cfg


def bench_gpu(argv):
    """Every CUDA path on one GPU, each against a tolerance fixed in GPU_TOL; exits 1 if any row fails.
        python bench.py gpu                      # about 5 minutes on one H100/H200
        python bench.py gpu --skip-throughput    # the checks only, about 1 minute
    --device cpu runs the same checks on the CPU path (a dry run of this command, not a GPU result)."""
    import argparse
    import os
    import torch
    ap = argparse.ArgumentParser(prog="python bench.py gpu")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--skip-train", action="store_true", help="leave out the train.py rows")
    ap.add_argument("--skip-throughput", action="store_true", help="leave out the 0.5B tokens/s rows")
    ap.add_argument("--iters", type=int, default=8, help="steps per throughput run (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="throughput runs per policy, alternating")
    ap.add_argument("--batch_size", type=int, default=16, help="sequences per step in the throughput runs")
    ap.add_argument("--max_len", type=int, default=24576, help="longest synthetic ChatQA2-shaped sample")
    ap.add_argument("--bucket", type=int, default=26000, help="bucket_size (tokens per micro-batch) of the throughput runs")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"python bench.py gpu: no CUDA device visible to torch {torch.__version__}; run it on a machine with a GPU "
                 f"(or --device cpu for a dry run of the checks on the CPU path)")
    if args.warmup >= args.iters:
        sys.exit(f"python bench.py gpu: --warmup ({args.warmup}) must be below --iters ({args.iters})")
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"bench.py gpu on {name}, torch {torch.__version__}, {dtype} vs an fp64 CPU reference")
    print("tolerances (relative error ||got - ref|| / ||ref||): " + ", ".join(f"{k} {v:.0e}" for k, v in GPU_TOL.items()), flush=True)
    rows, tput = [], {}
    checks = [_gpu_kernel_checks, _gpu_ring_checks, _gpu_model_check]
    if dev.type == "cuda":
        checks.insert(2, _gpu_sync_check)
    for check in checks:
        try:
            check(dev, dtype, rows)
        except Exception as e:  # one failing path must not hide the others: a failing row, one line
            rows.append((f"{check.__name__[1:]}: raised", float("nan"), 0.0, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        print(f"  {check.__name__[1:]} done", flush=True)
    if not args.skip_train:
        try:
            _gpu_train_checks(dev, rows, tput, args)
        except (Exception, SystemExit) as e:
            rows.append(("train: raised", float("nan"), 0.0, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
    print("\n| check | error | tolerance | ok | detail |\n|---|---|---|---|---|")
    failed = 0
    for check, err, tol, detail in rows:
        ok = err <= tol  # NaN (non-finite results, an exception) fails
        failed += not ok
        print(f"| {check} | {err:.1e} | {tol:.0e} | {'yes' if ok else 'NO'} | {detail} |")
    if "naive" in tput:
        c = tput["cfg"]
        print(f"\ntokens/s, Qwen2.5-0.5B layers (vocabulary: the synthetic data's byte tokenizer's), cp=1, bf16 autocast, synthetic ChatQA2 shape "
              f"(max_len {args.max_len}), batch_size {c['batch_size']}, bucket_size {c['bucket_size']}, {args.iters - args.warmup} "
              f"timed steps x {args.reps} runs per policy, alternating; only the packing differs")
        print("| schedule | tok/s per run | median | micro-batches/step | peak max_memory_allocated | its step's tokens | bucket |")
        print("|---|---|---|---|---|---|---|")
        import statistics
        for p in ("naive", "skrull"):
            gib, toks, mbs = tput[p + "_mem"]
            print(f"| {p} | {', '.join(f'{t:,.0f}' for t in tput[p])} | {statistics.median(tput[p]):,.0f} | {mbs:g} | {gib:.1f} GiB | "
                  f"{toks} | {c['bucket_size']} |")
        print(f"skrull / naive: {statistics.median(tput['skrull']) / statistics.median(tput['naive']):.2f}x")
    print(f"\n{len(rows) - failed} of {len(rows)} rows within tolerance")
    if failed:
        sys.exit(1)

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    commands = {"ring": bench_ring, "profile": bench_profile, "e2e": bench_e2e, "gpu": bench_gpu, "memory": bench_memory,
                "lora": bench_lora}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python bench.py {{{','.join(commands)}}} [options]")
    commands[sys.argv[1]](sys.argv[2:])
