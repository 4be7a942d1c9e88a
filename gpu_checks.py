"""
The CUDA paths against an fp64 CPU reference, each within a tolerance fixed in GPU_TOL: the attention
kernels, the in-process ring, the absence of host-device syncs, and a 2-layer Qwen2. Each check
returns its rows (check, error, tolerance, detail); a row passes when error <= tolerance (a NaN, from
non-finite results, fails).

tests/test_gpu.py asserts every row on a GPU; `python -m bench.gpu` prints them as a table beside
the train.py rows and the throughput. They live here, outside both, so that neither a test imports
a benchmark nor a benchmark a test. On the CPU path (float32) the same checks run too, except the
sync check, which needs CUDA.
"""
import itertools
from collections import namedtuple

import torch

import context_parallel as cp
from model import ModelConfig, Transformer, varlen_attention

# Tolerances, fixed before any run: relative error ||got - ref|| / ||ref|| against an fp64 CPU
# reference. bf16 operands round each input to 8 bits of mantissa: one kernel lands between 1e-3
# and 1e-2; a model stacks layers, so its bound is looser. Losses compare runs of the same code.
GPU_TOL = {
    "kernel": 1e-2,      # one attention call (out, dq, dk, dv), bf16 vs fp64
    "ring": 1e-2,        # in-process ring, W ranks of blocks merged in fp32, bf16 vs fp64
    "model": 3e-2,       # 2-layer Qwen2 forward (loss) and backward (all gradients), bf16 autocast vs fp64
    "policy": 1e-2,      # naive vs skrull losses, same batches, bf16 autocast (summation order differs)
    "resume": 1e-3,      # resumed vs uninterrupted losses (flash backward accumulates dq with atomics)
    "optimizer": 1e-5,   # fused AdamW in fp32 vs AdamW in fp64, 3 steps of a small MLP
    "paths": 2e-2,       # train.py losses, autocast path vs FSDP2 mixed precision, same batches (both bf16)
    "memory": 0.25,      # |measured peak / memory model's prediction - 1| of a train.py step on the GPU
}

Row = namedtuple("Row", "check error tolerance detail")


def rel_error(got, ref):
    """||got - ref|| / ||ref|| in fp64 on the CPU; NaN when got is not finite."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _errors(errs):
    return " ".join(f"{e:.1e}" for e in errs)


def check_kernels(dev, dtype):
    """The kernel path of model.varlen_attention on a local batch and on rectangular blocks."""
    g = torch.Generator().manual_seed(0)
    H, Hkv, D = 14, 2, 64  # Qwen2.5-0.5B's heads
    lengths = [1, 100, 257, 512, 2048, 77]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    ref_in = [torch.randn(int(cu[-1]), h, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv)]
    x = [t.detach().to(dev, dtype).requires_grad_() for t in ref_in]
    ref, out = varlen_attention(*ref_in, cu), varlen_attention(*x, cu.to(dev))
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(dout)
    out.backward(dout.to(dev, dtype))
    errs = [rel_error(out, ref)] + [rel_error(a.grad, b.grad) for a, b in zip(x, ref_in)]
    rows = [Row(f"kernel: varlen_attention fwd+bwd, {len(lengths)} seqs (1..2048), H {H}/{Hkv}", max(errs), GPU_TOL["kernel"],
                "out/dq/dk/dv " + _errors(errs))]
    # rectangular blocks (cu_q != cu_k, no mask: the ring's off-diagonal steps), lse layout (H, Tq)
    cu_q, cu_k = [0, 64, 65, 300, 556], [0, 128, 130, 600, 856]
    q, k, v = (torch.randn(n, h, D, generator=g, dtype=torch.float64) for n, h in ((556, H), (856, Hkv), (856, Hkv)))
    do = torch.randn(556, H, D, generator=g, dtype=torch.float64)
    ro, rl = cp._attn_fwd(q, k, v, cp._offsets(cu_q, "cpu"), cp._offsets(cu_k, "cpu"), False, D ** -0.5)
    rg = cp._attn_bwd(do, q, k, v, ro, rl, cp._offsets(cu_q, "cpu"), cp._offsets(cu_k, "cpu"), False, D ** -0.5)
    xq, xk, xv, xdo = (t.to(dev, dtype) for t in (q, k, v, do))
    o, lse = cp._attn_fwd(xq, xk, xv, cp._offsets(cu_q, dev), cp._offsets(cu_k, dev), False, D ** -0.5)
    if lse.shape != (H, 556) or lse.dtype != torch.float32:
        raise RuntimeError(f"lse {tuple(lse.shape)} {lse.dtype}, expected ({H}, 556) float32")
    gr = cp._attn_bwd(xdo, xq, xk, xv, o, lse, cp._offsets(cu_q, dev), cp._offsets(cu_k, dev), False, D ** -0.5)
    errs = [rel_error(o, ro), rel_error(lse, rl)] + [rel_error(a, b) for a, b in zip(gr, rg)]
    rows.append(Row("kernel: rectangular blocks (cu_q != cu_k), lse (H, Tq) fp32", max(errs), GPU_TOL["kernel"],
                    "out/lse/dq/dk/dv " + _errors(errs)))
    return rows


def _ring_inputs(W, dist_lens, local_lens, dev, dtype, g, H=14, Hkv=2, D=64):
    """fp64 CPU reference (plain varlen attention over whole sequences) and each emulated rank's inputs."""
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


def _ring_errors(W, dist_lens, local_lens, dev, dtype, g):
    """The in-process ring (context_parallel.emulated_attention) forward and backward on these sequences:
    relative errors of out, dq, dk, dv against the single-process reference."""
    cu_d, cu_locals, refs, xs = _ring_inputs(W, dist_lens, local_lens, dev, dtype, g)
    qkv = [[x[i].requires_grad_() for x in xs] for i in range(3)]
    outs = cp.emulated_attention(*qkv, cu_d, cu_locals)
    torch.autograd.backward(outs, [x[3] for x in xs])
    got = [torch.cat(t) for t in (outs, *([x.grad for x in qkv[i]] for i in range(3)))]
    ref = [torch.cat([r[i] for r in refs]) for i in range(4)]
    return [rel_error(a, b) for a, b in zip(got, ref)]


def check_ring(dev, dtype):
    """The in-process ring (same blocks and step loop, hops handed over in memory) at W = 2, 4, 8."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for W in (2, 4, 8):
        n2 = 2 * W
        dist_lens = [n2 * 96, n2 * 5, n2, n2 * 33]  # long, short, one chunk per rank, odd multiple
        local_lens = [[37 + 11 * r, 300, 1][:1 + r % 3] for r in range(W)]
        local_lens[W - 1] = []  # a rank without local sequences
        errs = _ring_errors(W, dist_lens, local_lens, dev, dtype, g)
        rows.append(Row(f"ring: in-process W={W}, {len(dist_lens)} distributed + local seqs", max(errs), GPU_TOL["ring"],
                        "out/dq/dk/dv " + _errors(errs)))
    return rows


def check_varlen_q1_gqa(dev, dtype):
    """Flash varlen with every query length 1 under GQA: the CUDA kernel then swaps the query-head groups
    into the sequence dimension (a path of its own), which a ring hits when every distributed sequence is
    one token per chunk (length 2W). Non-causal blocks of 1 query vs 1..300 keys, and the in-process ring
    at W=4 over sequences of 8 tokens only."""
    g = torch.Generator().manual_seed(3)
    H, Hkv, D = 14, 2, 64
    k_lens = [1, 5, 300, 2, 77, 1, 128, 33]
    cu_q, cu_k = list(range(len(k_lens) + 1)), [0] + list(itertools.accumulate(k_lens))
    q, k, v = (torch.randn(n, h, D, generator=g, dtype=torch.float64) for n, h in ((len(k_lens), H), (cu_k[-1], Hkv), (cu_k[-1], Hkv)))
    do = torch.randn(len(k_lens), H, D, generator=g, dtype=torch.float64)
    oq, ok = cp._offsets(cu_q, "cpu"), cp._offsets(cu_k, "cpu")
    ro, rl = cp._attn_fwd(q, k, v, oq, ok, False, D ** -0.5)
    rg = cp._attn_bwd(do, q, k, v, ro, rl, oq, ok, False, D ** -0.5)
    xq, xk, xv, xdo = (t.to(dev, dtype) for t in (q, k, v, do))
    dq_, dk_ = cp._offsets(cu_q, dev), cp._offsets(cu_k, dev)
    o, lse = cp._attn_fwd(xq, xk, xv, dq_, dk_, False, D ** -0.5)
    gr = cp._attn_bwd(xdo, xq, xk, xv, o, lse, dq_, dk_, False, D ** -0.5)
    errs = [rel_error(o, ro), rel_error(lse, rl)] + [rel_error(a, b) for a, b in zip(gr, rg)]
    rows = [Row(f"kernel: every query length 1, GQA {H}/{Hkv}, {len(k_lens)} blocks of 1..300 keys", max(errs), GPU_TOL["kernel"],
                "out/lse/dq/dk/dv " + _errors(errs))]
    W = 4
    errs = _ring_errors(W, [2 * W] * 24, [[] for _ in range(W)], dev, dtype, g)
    rows.append(Row(f"ring: in-process W={W}, 24 sequences of 2W tokens (one-token chunks, GQA)", max(errs), GPU_TOL["ring"],
                    "out/dq/dk/dv " + _errors(errs)))
    return rows


def check_allreduce_fused_adamw(dev, dtype):
    """The path train.py runs without FSDP2: parallelize.all_reduce_grads (one flat buffer, one all-reduce; here
    over a 1-rank group, NCCL on CUDA, gloo on CPU) and fused AdamW on plain tensors (no DTensors), three steps
    against AdamW in fp64 on the CPU."""
    import os
    import tempfile

    import torch.distributed as dist

    from parallelize import all_reduce_grads
    torch.manual_seed(4)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8)).double()
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8)).to(dev)
    model.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    started = not dist.is_initialized()
    if started:
        init = os.path.join(tempfile.mkdtemp(prefix="skrull_pg_"), "init")
        kw = {"device_id": torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev} if dev.type == "cuda" else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"file://{init}", rank=0, world_size=1, **kw)
    try:
        for step in range(3):
            x = torch.randn(32, 64, dtype=torch.float64)
            ref(x).square().sum().backward()
            model(x.to(dev, torch.float32)).square().sum().backward()
            # world_size=2 takes the flat-buffer all-reduce; over the 1-rank group the sum is the gradient itself
            all_reduce_grads(list(model.parameters()), world_size=2)
            opt_ref.step()
            opt.step()
            opt_ref.zero_grad()
            opt.zero_grad()
    finally:
        if started:
            dist.destroy_process_group()
    errs = [rel_error(p, q) for p, q in zip(model.parameters(), ref.parameters())]
    return [Row(f"step: all_reduce_grads ({'NCCL' if dev.type == 'cuda' else 'gloo'}, flat buffer) + fused AdamW, plain "
                f"tensors, 3 steps, fp32 vs fp64", max(errs), GPU_TOL["optimizer"], "parameters " + _errors(errs))]


def check_no_host_sync(dev, dtype):
    """Building a micro-batch's AttnPlan from CPU lists and copying its tokens (context_parallel.to_device:
    pinned, non-blocking), then attention forward and backward with that plan: no host-device sync, so the
    host can run ahead of the GPU. CUDA's sync debug mode turns any sync into an error. CUDA only."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for W, dist_lens, local_lens in ((1, [], [[100, 257, 1, 512]]), (4, [8 * 64, 8 * 3], [[50], [], [7, 300], [64]])):
        cu_d, cu_locals, _, xs = _ring_inputs(W, dist_lens, local_lens, dev, dtype, g)
        qkv = [[x[i].requires_grad_() for x in xs] for i in range(3)]
        tokens = torch.randint(0, 1000, (sum(map(sum, local_lens)) + sum(dist_lens),))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            plans = [cp.AttnPlan(cu_d if dist_lens else None, cu_locals[r], dev, world=W, rank=r) for r in range(W)]
            cp.to_device(tokens, dev)
            outs = cp._PlannedAttention.apply(cp._MemoryRing() if W > 1 else None, plans, *qkv[0], *qkv[1], *qkv[2])
            torch.autograd.backward(outs, [x[3] for x in xs])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        rows.append(Row(f"no host-device sync: plan + tokens to the GPU (pinned, non-blocking), attention fwd+bwd, W={W}",
                        0.0, 0.0, "torch.cuda.set_sync_debug_mode('error') raised nothing"))
    return rows


def check_model(dev, dtype):
    """A 2-layer Qwen2 (0.5B's head layout): bf16 autocast on the device vs fp64 on the CPU, same weights."""
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
    g_err = rel_error(torch.cat([p[n].grad.reshape(-1).cpu().double() for n in names]),
                      torch.cat([p_ref[n].grad.reshape(-1) for n in names]))
    worst = max(names, key=lambda n: rel_error(p[n].grad, p_ref[n].grad))
    errs = [rel_error(loss, ref_loss), g_err]
    return [Row(f"model: 2-layer Qwen2 (896 wide, 14/2 heads) fwd+bwd, {len(lengths)} packed seqs", max(errs), GPU_TOL["model"],
                f"loss {errs[0]:.1e}, all grads {errs[1]:.1e} (worst tensor {worst} {rel_error(p[worst].grad, p_ref[worst].grad):.1e})")]


CHECKS = (check_kernels, check_varlen_q1_gqa, check_ring, check_no_host_sync, check_model,
          check_allreduce_fused_adamw)  # the order bench.gpu runs them in
