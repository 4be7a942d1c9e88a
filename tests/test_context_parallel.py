"""
Tests of context_parallel.py on CPU: zigzag sharding helpers, and ring / DACP attention (forward and
backward) across gloo processes against a single-process fp64 reference (plain softmax attention
per sequence). One spawn per test function, many cases inside; each worker records its max abs
error per tensor and the parent asserts them, so the worst errors are also easy to print:

    python -m pytest tests/test_context_parallel.py -s     # prints the worst-error tables
    python tests/test_context_parallel.py                  # same tables, no pytest
"""
import datetime
import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import context_parallel as cp

TOL = {"float32": 1e-5, "bfloat16": 2.5e-2}
D = 16
TENSORS = ("out", "dq", "dk", "dv")

# -----------------------------------------------------------------------------
# reference


def offsets(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def reference(q, k, v, cu):
    """Plain causal softmax attention per sequence, in whatever dtype it is given (fp64 here)."""
    g, outs = q.shape[1] // k.shape[1], []
    for a, b in zip(cu[:-1], cu[1:]):
        qs = q[a:b].transpose(0, 1)
        ks, vs = (x[a:b].repeat_interleave(g, 1).transpose(0, 1) for x in (k, v))
        s = (qs @ ks.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((s.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def reference_grads(q, k, v, dout, cu):
    if len(cu) < 2:
        return q, torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = reference(q, k, v, cu)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout, allow_unused=True, materialize_grads=True))

# -----------------------------------------------------------------------------
# unit tests, no processes


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_zigzag_roundtrip(W):
    rng = random.Random(W)
    lengths = [2 * W * rng.randint(1, 9) for _ in range(7)] + [2 * W]
    cu = torch.tensor(offsets(lengths), dtype=torch.int32)
    x = torch.randn(cu[-1].item(), 3)
    shards = [cp.zigzag_shard(x, cu, r, W) for r in range(W)]
    assert [s.shape[0] for s in shards] == [cu[-1].item() // W] * W
    assert torch.equal(cp.zigzag_unshard(shards, cu, W), x)
    # rank r holds chunks r and 2W-1-r of every sequence, in that order
    c, y = lengths[0] // (2 * W), torch.arange(cu[-1].item())
    for r in range(W):
        head = cp.zigzag_shard(y, cu, r, W)[:2 * c].tolist()
        assert head == list(range(r * c, (r + 1) * c)) + list(range((2 * W - 1 - r) * c, (2 * W - r) * c))


def test_zigzag_rejects_bad_length():
    with pytest.raises(ValueError, match="multiple of 2"):
        cp.zigzag_shard(torch.zeros(10), [0, 4, 10], 0, 2)


def test_pad_to_multiple():
    lengths = [3, 8, 1, 0, 6]
    ids = torch.arange(1, 19)
    labels = ids + 100
    pos = torch.cat([torch.arange(n) + 5 for n in lengths])  # positions need not start at 0
    pids, plab, ppos, plen = cp.pad_to_multiple(ids, labels, pos, lengths, 4)
    assert plen == [4, 8, 4, 0, 8] and pids.shape == plab.shape == ppos.shape == (24,)
    start, pstart = 0, 0
    for n, m in zip(lengths, plen):
        assert torch.equal(pids[pstart:pstart + n], ids[start:start + n])
        assert torch.equal(plab[pstart:pstart + n], labels[start:start + n])
        assert (pids[pstart + n:pstart + m] == 0).all() and (plab[pstart + n:pstart + m] == -100).all()
        assert torch.equal(ppos[pstart:pstart + m], torch.arange(m) + 5)  # positions continue
        start, pstart = start + n, pstart + m
    _, _, _, tlen = cp.pad_to_multiple(ids, labels, pos, torch.tensor(lengths), 4)
    assert torch.is_tensor(tlen) and tlen.tolist() == plen


def test_single_process_matches_reference():
    """Without torch.distributed the ring degenerates to W = 1; also checks the shape errors."""
    torch.manual_seed(0)
    q, k, v, do = torch.randn(64, 4, D), torch.randn(64, 2, D), torch.randn(64, 2, D), torch.randn(64, 4, D)
    runs = [([0, 2, 30, 31, 64], lambda *x: cp.ring_attention(*x, torch.tensor([0, 2, 30, 31, 64], dtype=torch.int32))),
            ([0, 30, 31, 64], lambda *x: cp.dacp_attention(*x, [0, 30], [0, 1, 34]))]
    for cu, attn in runs:
        ref = reference_grads(q.double(), k.double(), v.double(), do.double(), cu)
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attn(*x)
        out.backward(do)
        for a, b in zip((out, *(t.grad for t in x)), ref):
            assert (a.double() - b).abs().max() <= TOL["float32"]
    with pytest.raises(ValueError, match="rows"):
        cp.dacp_attention(q, k, v, [0, 30], [0, 30])

# -----------------------------------------------------------------------------
# in-process ring: W emulated ranks, same blocks and step loop, hops handed over in memory


def emulated_case(dist_lens, local_lens, heads, dtype, W, seed, device="cpu"):
    """All W ranks of one case in this process -> max abs error per tensor vs the fp64 reference."""
    H, Hkv = heads
    gen = torch.Generator().manual_seed(seed)
    make = lambda T, h: torch.randn(T, h, D, generator=gen, dtype=torch.float64).to(dtype).double()  # noqa: E731
    cu_d = offsets(dist_lens)
    dist_qkvo = [make(cu_d[-1], h) for h in (H, Hkv, Hkv, H)]
    local_lens = local_lens or [[] for _ in range(W)]
    local_qkvo = [[make(sum(ls), h) for h in (H, Hkv, Hkv, H)] for ls in local_lens]
    ref_d = reference_grads(*dist_qkvo, cu_d)
    refs, xs = [], []
    for r in range(W):
        ref_l = reference_grads(*local_qkvo[r], offsets(local_lens[r]))
        refs.append([torch.cat([cp.zigzag_shard(a, cu_d, r, W), b]) for a, b in zip(ref_d, ref_l)])
        xs.append([torch.cat([cp.zigzag_shard(a, cu_d, r, W), b]).to(device, dtype) for a, b in zip(dist_qkvo, local_qkvo[r])])
    qkv = [[x[i].requires_grad_() for x in xs] for i in range(3)]
    outs = cp.emulated_attention(*qkv, cu_d, [offsets(ls) for ls in local_lens])
    torch.autograd.backward(outs, [x[3] for x in xs])
    errs = dict.fromkeys(TENSORS, 0.0)
    for r in range(W):
        got = (outs[r], qkv[0][r].grad, qkv[1][r].grad, qkv[2][r].grad)
        assert all(a.dtype == dtype and a.shape == b.shape for a, b in zip(got, refs[r]))
        for t, a, b in zip(TENSORS, got, refs[r]):
            if a.numel():
                errs[t] = max(errs[t], (a.double().cpu() - b).abs().max().item())
    return errs


@pytest.mark.parametrize("W", [2, 4, 8])
def test_emulated_ring_matches_reference(W):
    """The in-process ring over the same cases as the gloo tests, W = 2, 4, 8: what one GPU can check."""
    records = []
    for i, (name, dist_lens, local_lens) in enumerate(cases(W, seed=W)):
        for dtype in (torch.float32, torch.bfloat16) if W < 8 else (torch.float32,):  # W=8 bf16: tests/test_gpu.py
            errs = emulated_case(dist_lens, local_lens, (4, 2), dtype, W, seed=i)
            records.append({"case": name, "W": W, "heads": "4/2", "dtype": str(dtype).split(".")[1], "rank": "all", **errs})
    print(report(f"in-process ring, W={W}", records))
    check(records)


def test_emulated_ring_hands_over_like_p2p():
    """Each hop reaches rank r from rank r-1: break the hand-over and the result must be wrong."""
    W, lens = 4, [8 * 4, 8 * 2]
    ok = emulated_case(lens, None, (2, 2), torch.float32, W, seed=0)
    assert max(ok.values()) <= TOL["float32"]
    post = cp._MemoryRing.post
    cp._MemoryRing.post = lambda self, bufs, tag: (lambda: bufs[1:] + bufs[:1])  # from r+1: the wrong way round
    try:
        bad = emulated_case(lens, None, (2, 2), torch.float32, W, seed=0)
    finally:
        cp._MemoryRing.post = post
    assert bad["out"] > 1e-2


def test_rectangular_blocks_match_reference():
    """The kernels on blocks where q and k differ in length (cu_q != cu_k, no mask), as the ring's
    off-diagonal steps run them, and the lse layout (H, Tq) the merge and the backward rely on."""
    torch.manual_seed(0)
    cu_q, cu_k = [0, 5, 5, 17, 20], [0, 9, 12, 13, 30]
    q, k, v = torch.randn(20, 4, D, dtype=torch.float64), torch.randn(30, 2, D, dtype=torch.float64), torch.randn(30, 2, D, dtype=torch.float64)
    cq, ck = cp._offsets(cu_q, "cpu"), cp._offsets(cu_k, "cpu")
    out, lse = cp._attn_fwd(q.float(), k.float(), v.float(), cq, ck, False, D ** -0.5)
    assert lse.shape == (4, 20) and lse.dtype == torch.float32
    for a, b, c, d in [x for x in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]) if x[1] > x[0]]:
        s = q[a:b].transpose(0, 1) @ k[c:d].repeat_interleave(2, 1).permute(1, 2, 0) * D ** -0.5  # (H, q, k)
        ref = (s.softmax(-1) @ v[c:d].repeat_interleave(2, 1).transpose(0, 1)).transpose(0, 1)
        assert (out[a:b].double() - ref).abs().max() < 1e-5
        assert (lse[:, a:b].double() - s.logsumexp(-1)).abs().max() < 1e-5

# -----------------------------------------------------------------------------
# multi-process: each case runs on one CP group; records (max abs errors) go to a JSON per rank


def cases(W, seed):
    """(name, distributed lengths or None for ring_attention only, local lengths per CP rank)."""
    rng, n2 = random.Random(seed), 2 * W
    return [
        ("exact_2W", [n2] * 3, None),
        ("one_huge", [n2 * (512 // n2)], None),
        ("many_tiny", [n2 * rng.randint(1, 3) for _ in range(40)], None),
        ("mixed", [n2, n2 * 16, n2 * 3, n2 * 25, n2 * 2], None),
        ("dacp", [n2 * 16, n2 * 5, n2], [[rng.randint(1, 90) for _ in range(r + 1)] for r in range(W)]),
        ("dacp_some_local_empty", [n2 * 8, n2 * 2], [[] if r % 2 == 0 else [33, 2] for r in range(W)]),
        ("dacp_empty_dist", [], [[rng.randint(1, 70) for _ in range(2)] for r in range(W)]),
    ]


def run_case(name, dist_lens, local_lens, heads, dtype, W, r, group, seed):
    H, Hkv = heads
    gen = torch.Generator().manual_seed(seed)
    make = lambda T, h: torch.randn(T, h, D, generator=gen, dtype=torch.float64).to(dtype).double()  # noqa: E731
    cu_d = offsets(dist_lens)
    dist_qkvo = [make(cu_d[-1], h) for h in (H, Hkv, Hkv, H)]
    local_qkvo = [[make(sum(ls), h) for h in (H, Hkv, Hkv, H)] for ls in (local_lens or [[]] * W)]
    mine = local_qkvo[r]
    cu_l = offsets(local_lens[r]) if local_lens else [0]
    ref_d = reference_grads(*dist_qkvo, cu_d)
    ref_l = reference_grads(*mine, cu_l)
    ref = [torch.cat([cp.zigzag_shard(a, cu_d, r, W), b]) for a, b in zip(ref_d, ref_l)]
    x = [torch.cat([cp.zigzag_shard(a, cu_d, r, W), b]).to(dtype) for a, b in zip(dist_qkvo, mine)]
    q, k, v = (t.requires_grad_() for t in x[:3])
    calls_before = CALLS[0]
    cu_dt = torch.tensor(cu_d, dtype=torch.int32)
    if local_lens is None:
        out = cp.ring_attention(q, k, v, cu_dt, group=group)
    else:
        out = cp.dacp_attention(q, k, v, cu_dt, torch.tensor(cu_l, dtype=torch.int32), group=group)
    out.backward(x[3])
    hops = CALLS[0] - calls_before
    # forward: W-1 K/V hops; backward: W-1 K/V hops + W dK/dV hops; nothing without distributed seqs
    assert hops == (3 * W - 2 if dist_lens else 0), (name, hops)
    got = (out, q.grad, k.grad, v.grad)
    assert all(a.dtype == dtype for a in got)
    errs = {t: (a.double() - b).abs().max().item() if a.numel() else 0.0 for t, a, b in zip(TENSORS, got, ref)}
    # an absolute bf16 tolerance of 2.5e-2 presumes |x| < 8, where half a bf16 ulp is <= 1.6e-2
    assert max((b.abs().max().item() for b in ref if b.numel()), default=0) < 8, f"{name}: test data too large"
    return {"case": name, "W": W, "heads": f"{H}/{Hkv}", "dtype": str(dtype).split(".")[1], **errs}


CALLS = [0]


def worker(rank, world, init_file, out_dir, cp_sizes):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    batch = dist.batch_isend_irecv

    def counting(ops):  # count hops, to check that an empty distributed part never communicates
        CALLS[0] += 1
        return batch(ops)
    dist.batch_isend_irecv = counting
    try:
        records = []
        for cp_size in cp_sizes:
            # CP groups of cp_size inside the world (e.g. DP=2 x CP=2): every rank creates every group
            groups = [dist.new_group(list(range(s, s + cp_size))) for s in range(0, world, cp_size)]
            group = groups[rank // cp_size] if cp_size < world else None
            W, r = cp_size, dist.get_rank(group) if group is not None else rank
            for i, (name, dist_lens, local_lens) in enumerate(cases(W, seed=rank // cp_size)):
                for heads in ((4, 2), (2, 2)):
                    for dtype in (torch.float32, torch.bfloat16):
                        rec = run_case(name, dist_lens, local_lens, heads, dtype, W, r, group,
                                       seed=1000 * (rank // cp_size) + i)
                        records.append({"world": world, "rank": rank, **rec})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(records))
    finally:
        dist.batch_isend_irecv = batch
        dist.destroy_process_group()


def run_and_collect(tmp_path, world, cp_sizes):
    # mp.spawn re-raises any worker's exception (and ends the other workers): the test fails
    mp.spawn(worker, args=(world, str(tmp_path / "pg_init"), str(tmp_path), cp_sizes), nprocs=world, join=True)
    records = [rec for r in range(world) for rec in json.loads((tmp_path / f"rank{r}.json").read_text())]
    expected = world * sum(len(cases(c, 0)) for c in cp_sizes) * 2 * 2
    assert len(records) == expected, f"{len(records)} records, expected {expected}"
    return records


def worst(records):
    """{dtype: {tensor: (max error, case)}}"""
    table = {}
    for rec in records:
        for t in TENSORS:
            cur = table.setdefault(rec["dtype"], {}).get(t, (-1.0, ""))
            if rec[t] > cur[0]:
                table[rec["dtype"]][t] = (rec[t], f"{rec['case']} W={rec['W']} heads={rec['heads']}")
    return table


def report(title, records):
    lines = [f"\n{title}: worst max-abs error vs fp64 reference", "| dtype | tol | " + " | ".join(TENSORS) + " |",
             "|---|---|" + "---|" * len(TENSORS)]
    for dtype, row in worst(records).items():
        lines.append(f"| {dtype} | {TOL[dtype]:.1e} | " + " | ".join(f"{row[t][0]:.2e}" for t in TENSORS) + " |")
    return "\n".join(lines)


def check(records):
    bad = [f"{rec['case']} W={rec['W']} heads={rec['heads']} {rec['dtype']} rank {rec['rank']} {t}={rec[t]:.3g}"
           for rec in records for t in TENSORS if not rec[t] <= TOL[rec["dtype"]]]
    assert not bad, "errors over tolerance:\n" + "\n".join(bad)


def test_ring_uses_the_buffers_device_streams(monkeypatch):
    """_Ring on cuda:1 in a process whose current device is cuda:0 (one that never called set_device):
    every stream it waits on or makes wait is cuda:1's. CUDA is mocked: the calls are recorded."""
    calls, dev = [], torch.device("cuda", 1)

    class Stream:
        def __init__(self, device):
            self.device = device

        def wait_stream(self, other):
            calls.append(("side waits for", other.device))

    class CurrentStream(Stream):
        def wait_stream(self, other):
            calls.append(("current waits for", other.device))

    class Buffer:
        device = dev

        def record_stream(self, stream):
            calls.append(("record", stream.device))

    def current_stream(device=None):
        return CurrentStream(torch.device(device) if device is not None else torch.device("cuda", 0))

    import contextlib
    for name, fake in (("Stream", Stream), ("current_stream", current_stream),
                       ("stream", lambda s: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, fake)
    for name, fake in (("get_rank", lambda g: 0), ("get_world_size", lambda g: 2), ("get_global_rank", lambda g, r: r),
                       ("batch_isend_irecv", lambda ops: []), ("P2POp", lambda *a: a)):
        monkeypatch.setattr(cp.dist, name, fake)
    monkeypatch.setattr(cp.torch, "empty_like", lambda buf: Buffer())
    monkeypatch.setattr(cp, "_P2P_STREAMS", {})
    ring = cp._Ring(group=object(), device=dev)
    assert ring.stream.device == dev
    ring.post([Buffer()], tag=0)()
    assert calls and all(d == dev for _, d in calls), calls
    assert ("side waits for", dev) in calls and ("current waits for", dev) in calls


@pytest.mark.slow
def test_ring_world2(tmp_path):
    records = run_and_collect(tmp_path, world=2, cp_sizes=[2])
    print(report("world 2, one CP group of 2", records))
    check(records)


@pytest.mark.slow
def test_ring_world4_full_group_and_subgroups(tmp_path):
    """W = 4 on the whole world, then DP=2 x CP=2: two CP sub-groups, each with its own data."""
    records = run_and_collect(tmp_path, world=4, cp_sizes=[4, 2])
    print(report("world 4, CP=4 and two CP sub-groups of 2", records))
    check(records)


if __name__ == "__main__":
    import tempfile
    for world, cp_sizes in ((2, [2]), (4, [4, 2])):
        with tempfile.TemporaryDirectory() as d:
            print(report(f"world {world}, CP groups of {cp_sizes}", run_and_collect(Path(d), world, cp_sizes)))
