"""
skrull_plus: our own policy, not in the paper. It starts where Skrull does (scheduler.gds_split,
gds_microbatches, dacp) and then scores alternatives with the cost model's time of each rank
(CostModel.rank_time), where the paper balances per-sequence estimates. About a millisecond per
micro-batch; never predicted slower than skrull, since the paper's plan is one of its candidates.

  rank_time_bound   a lower bound on CostModel.rank_time from sums, to prune the searches below
  refine            inside one micro-batch: move, distribute or keep whole one sequence at a time
  balance_dp        across DP ranks: move local sequences from the slowest DP rank to the fastest
  skrull_plus       the policy: per DP rank the best of a few candidates, refined; then balanced, and
                    compared with naive's plan
scheduler.POLICIES["skrull_plus"] imports this file on first use.
"""
import math
from collections import namedtuple

from scheduler import (MicroBatch, all_distributed, default_cost, gds_microbatches, gds_split, local_times,
                       naive, padded_len)

PLUS_EXTRA_MB = 1  # skrull_plus tries m0 and m0 + 1 micro-batches per DP rank (more: slower, rarely better)


def rank_time_bound(cost, tokens, n_local, sq_local, ring=None):
    """A lower bound on cost.rank_time from sums alone (tokens, how many local sequences, their sum of
    L^2): rank_time with the local slices' placement over the ring steps forgotten. Each step takes
    max(x + (1-o) c, c + (1-o) x) for compute x and communication c, a sum of maxima is at least the
    max of the sums, and the local work needs at least one call per pass. Without a ring: exact."""
    if not tokens:
        return 0.0
    linear = cost.c_mb + cost.a * cost.lin_flops * tokens
    a_attn = cost.a_attn * cost.attn_flops / cost.n_layer
    call = (cost.b_call + cost.b_seq * n_local) * (n_local > 0)
    if ring is None or ring.n == 0:
        return linear + cost.n_layer * (2 * call + a_attn * sq_local)
    N, o = ring.cp, cost.comm_overlap
    x = 2 * call + 2 * N * ring.block + a_attn * sq_local + N * ring.attn  # compute, fwd + bwd, every step
    c = 2 * (N - 1) * ring.hop + N * ring.hop_grad                        # communication
    return linear + cost.n_layer * max(x + (1 - o) * c, c + (1 - o) * x)


# The distributed set of a candidate in refine: CostModel.ring of it (None: nothing distributed), a rank's
# share of it in tokens, and a number naming it (refine remembers rank times per ring and local list).
Ring = namedtuple("Ring", "costs share key")


def refine(mb, lengths, bucket_size, cost=None):
    """A local search after Algorithm 1, inside one micro-batch: Algorithm 1 keeps a sequence whole
    whenever it fits, so one rank's quadratic attention can set the micro-batch's time. While it lowers
    the slowest CP rank j's time (CostModel.rank_time), within the bucket, apply the best of: move one of
    j's local sequences (4 longest, 2 shortest) to the least busy rank that holds it; distribute one of
    j's 2 longest; keep one of the 2 shortest distributed ones whole on the least busy rank that holds it.
    Each rank lists its local sequences longest first, which spreads dacp_attention's per-step slices.
    Candidates are bounded (rank_time_bound) before they are timed: faster, same result."""
    cp = len(mb.local)
    if cp == 1:
        return mb
    cost = cost or default_cost()
    key = lambda k: (-lengths[k], k)  # noqa: E731  longest first
    local = [sorted(loc, key=key) for loc in mb.local]
    dist = tuple(sorted(mb.distributed))
    ltok = [sum(lengths[k] for k in loc) for loc in local]        # per rank: local tokens, sum of L^2
    lsq = [sum(lengths[k] ** 2 for k in loc) for loc in local]
    rings, memo = {}, {}

    def ring_of(dist):  # the Ring of a distributed set, built once per set
        if dist not in rings:
            terms = cost.ring([lengths[k] for k in dist], cp) if dist else None
            rings[dist] = Ring(terms, terms.share if terms else 0, len(rings))
        return rings[dist]

    def time_of(loc, ring):  # CostModel.rank_time of a rank holding loc, remembered
        k = (ring.key, tuple(loc))
        if k not in memo:
            memo[k] = cost.rank_time(ring.share + sum(lengths[x] for x in loc), [lengths[x] for x in loc], ring.costs)
        return memo[k]

    def bound(tok, n, sq, ring):
        return rank_time_bound(cost, ring.share + tok, n, sq, ring.costs)

    ring = ring_of(dist)
    times = [time_of(loc, ring) for loc in local]
    for _ in range(2 * cp):
        order = sorted(range(cp), key=lambda i: (times[i], i))
        j = order[-1]
        move, move_t, move_n = None, times[j] * (1 - 1e-9), -1
        cands = []  # moves, bounded: (bound, n, v, i, the slowest unchanged rank)
        for n, v in enumerate(dict.fromkeys(local[j][:4] + local[j][-2:])):
            s = lengths[v]
            i = next((i for i in order[:-1] if ring.share + ltok[i] + s <= bucket_size), None)
            if i is None:
                continue
            others = next((times[x] for x in reversed(order) if x not in (i, j)), 0.0)
            lb = max(others, bound(ltok[j] - s, len(local[j]) - 1, lsq[j] - s * s, ring),
                     bound(ltok[i] + s, len(local[i]) + 1, lsq[i] + s * s, ring))
            cands.append((lb, n, v, i, others))
        for lb, n, v, i, others in sorted(cands):  # the same choice as computing all in order n
            if lb > move_t:
                break
            m = max(others, time_of([x for x in local[j] if x != v], ring),
                    time_of(sorted(local[i] + [v], key=key), ring))
            if (m, n) < (move_t, move_n):
                move, move_t, move_n = ("move", v, i), m, n
        shortest = sorted(dist, key=lambda k: (lengths[k], k))[:2]
        for kind, v in [("dist", v) for v in local[j][:2]] + [("local", v) for v in shortest]:
            s = lengths[v]
            new_dist = tuple(sorted(dist + (v,))) if kind == "dist" else tuple(x for x in dist if x != v)
            new_ring = ring_of(new_dist)  # every rank's share changes by new_ring.share - ring.share
            tok, n, sq = list(ltok), [len(loc) for loc in local], list(lsq)
            if kind == "dist":
                r = j
                tok[j], n[j], sq[j] = tok[j] - s, n[j] - 1, sq[j] - s * s
                if new_ring.share + max(tok) > bucket_size:
                    continue
                # the other ranks keep their sequences under a larger ring: each is at least as slow as
                # now, plus the linear layers' time on the added share (every ring step's time grows)
                if cp > 1 and times[order[-2]] + cost.a * cost.lin_flops * (new_ring.share - ring.share) >= move_t:
                    continue
            else:
                r = next((i for i in order if new_ring.share + ltok[i] + s <= bucket_size), None)
                if r is None:
                    continue
                tok[r], n[r], sq[r] = tok[r] + s, n[r] + 1, sq[r] + s * s
            if any(bound(tok[i], n[i], sq[i], new_ring) >= move_t for i in reversed(order)):
                continue
            new_local = [sorted(loc + [v], key=key) if kind == "local" and i == r else
                         [x for x in loc if x != v] for i, loc in enumerate(local)]
            m = 0.0
            for i in reversed(order):  # the slowest rank so far first; give up once it cannot win
                m = max(m, time_of(new_local[i], new_ring))
                if m >= move_t:
                    break
            if m < move_t:
                move, move_t = (kind, new_dist, new_local), m
        if move is None:
            break
        if move[0] == "move":
            _, v, i = move
            local[j] = [x for x in local[j] if x != v]
            local[i] = sorted(local[i] + [v], key=key)
            changed = (i, j)
        else:
            _, dist, local = move
            ring, changed = ring_of(dist), range(cp)
        for i in changed:
            ltok[i], lsq[i] = sum(lengths[k] for k in local[i]), sum(lengths[k] ** 2 for k in local[i])
            times[i] = time_of(local[i], ring)
    return MicroBatch(list(dist), local, mb.rollbacks)

def balance_dp(plan, lengths, bucket_size, cost, rounds=16):
    """Across DP ranks, after the fact: Algorithm 2 balances them by per-sequence estimates, which leave
    out micro-batch and ring fixed costs and how evenly the CP ranks came out, and the step waits for
    the slowest DP rank. Repeatedly move one local sequence from the slowest CP rank of a micro-batch of
    the slowest DP rank a to the least busy CP rank that holds it in a micro-batch of the fastest DP
    rank b: the move that lowers max(T_a, T_b) most, if below T_a. No DP rank ends slower than a was."""
    dp = len(plan)
    if dp == 1:
        return plan
    cp = next((len(mb.local) for mbs in plan for mb in mbs), 1)
    key = lambda k: (-lengths[k], k)  # noqa: E731  a rank that gets a sequence lists them longest first
    plan = [[MicroBatch(list(mb.distributed), [list(loc) for loc in mb.local], mb.rollbacks) for mb in mbs] for mbs in plan]
    rings = [[cost.ring([lengths[k] for k in mb.distributed], cp) if mb.distributed else None for mb in mbs] for mbs in plan]
    times = [[cost.rank_times(mb, lengths) for mb in mbs] for mbs in plan]
    dp_times = [cost.dp_rank_time(mbs, lengths, times=times[r]) for r, mbs in enumerate(plan)]

    def rank_time(r, m, loc):
        ring = rings[r][m]
        return cost.rank_time((ring.share if ring else 0) + sum(lengths[k] for k in loc), [lengths[k] for k in loc], ring)

    def sums(r, m, loc):  # the rank's tokens (its share of the ring included), sequences, sum of L^2
        ring = rings[r][m]
        return (ring.share if ring else 0) + sum(lengths[k] for k in loc), len(loc), sum(lengths[k] ** 2 for k in loc)

    def bound(r, m, tok, n, sq):
        return rank_time_bound(cost, tok, n, sq, rings[r][m])

    def with_time(r, m, j, seconds):  # DP rank r's time with CP rank j of micro-batch m taking `seconds`
        ts = [list(x) for x in times[r]]
        ts[m][j] = seconds
        return cost.dp_rank_time(plan[r], lengths, times=ts)

    for _ in range(rounds):
        a = max(range(dp), key=lambda r: (dp_times[r], -r))
        b = min(range(dp), key=lambda r: (dp_times[r], r))
        move, move_t = None, dp_times[a] * (1 - 1e-9)
        tok_b = [[sums(b, m, loc)[0] for loc in mb.local] for m, mb in enumerate(plan[b])]
        by_time = [sorted(range(cp), key=lambda j: (times[b][m][j], j)) for m in range(len(plan[b]))]
        # each candidate is bounded before it is computed (the DP time only grows with a rank's time;
        # rank_time_bound from sums), so most cost a few additions
        for ma, mb_a in enumerate(plan[a]):
            ja = max(range(cp), key=lambda j: (times[a][ma][j], -j))
            if with_time(a, ma, ja, 0.0) >= move_t:  # another rank or micro-batch keeps a this slow
                continue
            tok_a, n_a, sq_a = sums(a, ma, mb_a.local[ja])
            for v in mb_a.local[ja]:
                s = lengths[v]
                if with_time(a, ma, ja, bound(a, ma, tok_a - s, n_a - 1, sq_a - s * s)) >= move_t:
                    continue
                rest = [x for x in mb_a.local[ja] if x != v]
                time_a = with_time(a, ma, ja, rank_time(a, ma, rest))
                if time_a >= move_t:
                    continue
                for mbi in range(len(plan[b])):  # the least busy CP rank that can hold v
                    jb = next((j for j in by_time[mbi] if tok_b[mbi][j] + s <= bucket_size), None)
                    if jb is None:
                        continue
                    tok, n, sq = sums(b, mbi, plan[b][mbi].local[jb])
                    if with_time(b, mbi, jb, bound(b, mbi, tok + s, n + 1, sq + s * s)) >= move_t:
                        continue
                    new = sorted(plan[b][mbi].local[jb] + [v], key=key)
                    m = max(time_a, with_time(b, mbi, jb, rank_time(b, mbi, new)))
                    if m < move_t:
                        move, move_t = (v, ma, ja, rest, mbi, jb, new), m
        if move is None:
            break
        v, ma, ja, rest, mbi, jb, new = move
        plan[a][ma].local[ja], plan[b][mbi].local[jb] = rest, new
        times[a][ma][ja], times[b][mbi][jb] = rank_time(a, ma, rest), rank_time(b, mbi, new)
        dp_times[a], dp_times[b] = cost.dp_rank_time(plan[a], lengths, times=times[a]), cost.dp_rank_time(plan[b], lengths, times=times[b])
    return [[mb for mb in mbs if mb.distributed or any(mb.local)] for mbs in plan]


def skrull_plus(lengths, *, dp, cp, bucket_size, cost=None, seed=0):
    """The policy. Per DP rank of Algorithm 2's split: Algorithm 2's strided micro-batches for m0 and
    m0 + 1 micro-batches (the paper takes the fewest that fit), each placed by Algorithm 1 or with every
    sequence distributed, plus the best count's Algorithm 1 placement refined; the rank keeps the
    fastest (CostModel.dp_rank_time), and the paper's plan is among them. Then balance_dp, and last the
    whole plan against naive's, which wins on some bimodal batches."""
    cost = cost or default_cost()
    t_local = local_times(lengths, cost)
    plan = []
    for idx in gds_split(lengths, dp, cp, bucket_size, cost, t_local):
        tried = []  # per micro-batch count: (DACP placement, its time), (all distributed, its time)
        m0 = max(1, math.ceil(sum(lengths[k] for k in idx) / (bucket_size * cp)))
        for m in range(m0, m0 + PLUS_EXTRA_MB + 1):
            mbs = gds_microbatches(idx, lengths, cp, bucket_size, cost, t_local, m)
            if tried and len(mbs) == len(tried[-1][0][0]):
                continue
            # the same micro-batches with every sequence distributed, where that fits (padding can push
            # a micro-batch of many short sequences over cp*C)
            spread = [all_distributed(sorted(mb.distributed + sum(mb.local, [])), cp) for mb in mbs]
            fits = all(sum(padded_len(lengths[k], cp) for k in mb.distributed) <= cp * bucket_size for mb in spread)
            tried.append(((mbs, cost.dp_rank_time(mbs, lengths)), (spread, cost.dp_rank_time(spread, lengths) if fits else math.inf)))
        (mbs, _), _ = min(tried, key=lambda pair: min(pair[0][1], pair[1][1]))
        refined = [refine(mb, lengths, bucket_size, cost) for mb in mbs]
        cands = [c for pair in tried for c in pair] + [(refined, cost.dp_rank_time(refined, lengths))]
        plan.append(min(cands, key=lambda c: c[1])[0])  # ties: the first tried
    plan = balance_dp(plan, lengths, bucket_size, cost)
    baseline = naive(lengths, dp=dp, cp=cp, bucket_size=bucket_size)
    return min((plan, baseline), key=lambda p: cost.predict_step_time(p, lengths))
