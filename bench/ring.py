"""Ring attention (forward + backward) over W gloo processes vs single-process attention over the same
packed batch, and how much of the P2P time the ring hides behind compute.

    python -m bench.ring [--tokens 4096] [--heads 8] [--kv-heads 2] [--head-dim 64] [--dtype float32]
                         [--iters 5] [--worlds 2,4]
"""
import argparse
import itertools
import os
import statistics
import time

import torch
import torch.distributed as dist

import context_parallel as cp
from bench.common import leave_gloo_worker, load_average, spawn_gloo


def workloads(T):
    """Packed batches of T tokens, every length a multiple of 8 (= 2W for W <= 4)."""
    mix = [T // 2, T // 4, T // 8] + [T // 64] * 8  # one long sequence and a tail of short ones
    return {f"1 x {T}": [T], f"varlen mix ({len(mix)} seqs)": mix}


def time_median(fn, iters, barrier=lambda: None, p2p=(0.0,)):
    """-> medians over iters (after one warm-up) of (wall time, growth of the p2p[0] counter)."""
    times, waits = [], []
    for _ in range(iters + 1):
        barrier()
        t0, w0 = time.perf_counter(), p2p[0]
        fn()
        times.append(time.perf_counter() - t0)
        waits.append(p2p[0] - w0)
    return statistics.median(times[1:]), statistics.median(waits[1:])


def fwd_bwd(lengths, W, rank, group, H, H_kv, D, dtype):
    """-> a closure running one forward + backward of ring attention on this rank's shards."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    x = [cp.zigzag_shard(torch.randn(int(cu[-1]), h, D, generator=g), cu, rank, W).to(dtype).requires_grad_()
         for h in (H, H_kv, H_kv)]
    dout = torch.randn_like(x[0])
    return lambda: cp.ring_attention(*x, cu, group=group).backward(dout)


def worker(rank, W, init_file, out_file, opts):
    """One rank: every workload timed as is ("total"), with no-op kernels ("comm") and with no-op hops
    ("compute"); rank 0 writes {"<workload>|<mode>": seconds, "<workload>|<mode>|p2p": seconds}."""
    import json
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
    for name, lengths in workloads(opts["T"]).items():
        step = fwd_bwd(lengths, W, rank, None, opts["H"], opts["H_kv"], opts["D"], getattr(torch, opts["dtype"]))
        for mode, patch in (("total", None), ("comm", comm_only), ("compute", compute_only)):
            cp._Ring.post = timed_post
            if patch:
                patch()
            wall, wait = (torch.tensor(x) for x in time_median(step, opts["iters"], dist.barrier, p2p))
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            # P2P time on the rank that waits least: the others also wait for a late peer (skew, not comm)
            dist.all_reduce(wait, op=dist.ReduceOp.MIN)
            results[f"{name}|{mode}"], results[f"{name}|{mode}|p2p"] = wall.item(), wait.item()
            cp._attn_fwd, cp._attn_bwd = kernels
            cp._Ring.post = post
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    leave_gloo_worker()


def print_table(a, rows):
    cores = os.cpu_count()
    print(f"ring attention fwd+bwd, {a.tokens} tokens, H={a.heads}, H_kv={a.kv_heads}, D={a.head_dim}, {a.dtype}, "
          f"gloo, 1 thread per process, {cores} CPU cores, median of {a.iters}, load average {load_average():.1f} at the end")
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__.split("\n\n")[0])
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
    single = {name: time_median(fwd_bwd(lengths, 1, 0, None, a.heads, a.kv_heads, a.head_dim, getattr(torch, a.dtype)), a.iters)[0]
              for name, lengths in workloads(a.tokens).items()}
    rows = []
    for W in (int(w) for w in a.worlds.split(",")):
        res = spawn_gloo(worker, W, opts)
        for name, t1 in single.items():
            tot, comp = res[f"{name}|total"], res[f"{name}|compute"]
            exposed, p2p = res[f"{name}|total|p2p"], res[f"{name}|comm|p2p"]
            rows.append(f"| {name} | {W} | {t1 * 1e3:.0f} | {tot * 1e3:.0f} | {t1 / tot:.2f}x | {t1 / (W * tot):.0%} "
                        f"| {comp * 1e3:.0f} | {p2p * 1e3:.1f} | {exposed * 1e3:.1f} | {1 - exposed / p2p:.0%} |")
    print_table(a, rows)


if __name__ == "__main__":
    main()
