"""
skrull_plus: our own policy, not in the paper. It starts where Skrull does (scheduler.gds_split,
gds_microbatches, dacp) and then scores alternatives with the cost model's time of each rank
(CostModel.rank_time), where the paper balances per-sequence estimates. About a millisecond per
micro-batch; never predicted slower than skrull, since the paper's plan is one of its candidates.

  rank_time_bound   a lower bound on CostModel.rank_time from sums, to prune the searches below
  ideal_step_time   a lower bound on any plan's step time (the simulator's "possible" column)
  refine            inside one micro-batch: move, distribute or keep whole one sequence at a time
  balance_dp        across DP ranks: move local sequences from the slowest DP rank to the fastest
  skrull_plus       the policy: per DP rank the best of a few candidates, refined; then, up to
                    PLUS_GLOBAL_DP DP ranks, balanced and compared with naive's plan
Importing this file registers the policy: scheduler.POLICIES["skrull_plus"], as any policy of your own.
"""
import math
from collections import namedtuple

from scheduler import (POLICIES, MicroBatch, all_distributed, default_cost, gds_microbatches, gds_split, local_times,
                       naive, padded_len, plan_ranks)

PLUS_EXTRA_MB = 1  # skrull_plus tries m0 and m0 + 1 micro-batches per DP rank (more: slower, rarely better)
# The steps across DP ranks (balance_dp, the comparison with naive) need every DP rank's plan, so every rank
# would plan them all. Up to this many DP ranks they run (each rank plans at most 8 DP ranks' micro-batches);
# beyond it each DP rank's plan is its own, and a rank plans only its own (docs/how_it_works.md, section 7:
# in the simulator they lower the step time by 1.1% at dp 4, 0.3-0.4% at dp 16 and nothing at dp 64).
PLUS_GLOBAL_DP = 8

# -----------------------------------------------------------------------------
# bounds


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


def ideal_step_time(cost, lengths, dp, cp, bucket_size, include_step=True):
    """A lower bound on any plan's step time under `cost` (a CostModel), for the simulator's "possible"
    column: the larger of the total work (each sequence in its cheapest form) spread perfectly over
    dp*cp ranks plus the fixed costs every working rank pays, and a micro-batch holding only the
    costliest sequence (rank_time only grows with what is added)."""
    work, longest = 0.0, 0.0
    for s in lengths:
        work += min(([cost.t_local(s)] if s <= bucket_size else []) + ([cp * cost.t_dist(s, cp)] if cp > 1 else []))
        alone = []  # rank_time of a micro-batch holding only s, local or distributed: whatever else
        if s <= bucket_size:  # shares its micro-batch only adds to it
            alone.append(cost.rank_time(s, [s]))
        if cp > 1:
            ring = cost.ring([s], cp)
            alone.append(cost.rank_time(ring.share, [], ring))
        longest = max(longest, min(alone))
    # every rank that works pays at least one micro-batch (c_mb) and one attention call per layer and
    # pass, and the ranks pay one c_mb per C tokens between them
    mbs_per_rank = sum(lengths) / (dp * cp * bucket_size)
    fixed = max(1.0, mbs_per_rank) * cost.c_mb + 2 * cost.n_layer * cost.b_call
    bound = max(work / (dp * cp) + fixed, longest)
    return bound + (cost.t_step(dp * cp) if include_step else 0.0)

# -----------------------------------------------------------------------------
# refine: inside one micro-batch


# The distributed set of a candidate in refine: CostModel.ring of it (None: nothing distributed), a rank's
# share of it in tokens, and a number naming it (refine remembers rank times per ring and local list).
Ring = namedtuple("Ring", "costs share key")


def refine(mb, lengths, bucket_size, cost=None):
    """A local search after Algorithm 1, inside one micro-batch: Algorithm 1 keeps a sequence whole
    whenever it fits, so one rank's quadratic attention can set the micro-batch's time. Each round takes
    the best of these changes around the slowest CP rank (CostModel.rank_time), within the bucket, if it
    lowers that rank's time: move one of its local sequences, distribute one, or make one distributed
    sequence local. Candidates are bounded (rank_time_bound) before they are timed: faster, same result."""
    cp = len(mb.local)
    if cp == 1:
        return mb
    search = _CPSearch(mb, lengths, bucket_size, cost or default_cost())
    for _ in range(2 * cp):
        order = sorted(range(cp), key=lambda i: (search.times[i], i))  # least busy first, the slowest last
        j = order[-1]
        move, move_t = search.move_local(order, search.times[j] * (1 - 1e-9))
        # then the ring changes, each against the best so far: distribute one of j's 2 longest, or keep
        # one of the 2 shortest distributed sequences whole
        changes = [(search.distribute, v) for v in search.local[j][:2]] + \
                  [(search.make_local, v) for v in sorted(search.dist, key=lambda k: (lengths[k], k))[:2]]
        for change, v in changes:
            found = change(order, v, move_t)
            if found is not None:
                move, move_t = found
        if move is None:
            break
        search.apply(move)
    return MicroBatch(list(search.dist), search.local, mb.rollbacks)


class _CPSearch:
    """refine's state for one micro-batch: the distributed set and its Ring; per CP rank its local
    sequences (longest first, which spreads dacp_attention's per-step slices), their tokens, sum of
    L^2, and the rank's time. Rank times are remembered per (ring, local list): rounds retry many."""

    def __init__(self, mb, lengths, bucket_size, cost):
        self.lengths, self.bucket_size, self.cost, self.cp = lengths, bucket_size, cost, len(mb.local)
        self.rings, self.memo = {}, {}
        self.local = [sorted(loc, key=self.longest_first) for loc in mb.local]
        self.dist = tuple(sorted(mb.distributed))
        self.ring = self.ring_of(self.dist)
        self.ltok, self.lsq, self.times = [0] * self.cp, [0] * self.cp, [0.0] * self.cp
        self.update(range(self.cp))

    def longest_first(self, k):
        return (-self.lengths[k], k)

    def ring_of(self, dist):
        """The Ring of a distributed set, built once per set."""
        if dist not in self.rings:
            terms = self.cost.ring([self.lengths[k] for k in dist], self.cp) if dist else None
            self.rings[dist] = Ring(terms, terms.share if terms else 0, len(self.rings))
        return self.rings[dist]

    def time_of(self, loc, ring):
        """CostModel.rank_time of a rank holding the local sequences loc under ring, remembered."""
        k = (ring.key, tuple(loc))
        if k not in self.memo:
            lens = [self.lengths[x] for x in loc]
            self.memo[k] = self.cost.rank_time(ring.share + sum(lens), lens, ring.costs)
        return self.memo[k]

    def bound(self, tok, n, sq, ring):
        return rank_time_bound(self.cost, ring.share + tok, n, sq, ring.costs)

    def update(self, ranks):  # after a change: these ranks' sums and times
        for i in ranks:
            self.ltok[i] = sum(self.lengths[k] for k in self.local[i])
            self.lsq[i] = sum(self.lengths[k] ** 2 for k in self.local[i])
            self.times[i] = self.time_of(self.local[i], self.ring)

    def move_local(self, order, move_t):
        """The best move of one of the slowest rank j's local sequences (its 4 longest, 2 shortest) to the
        least busy rank with room for it, as (("move", v, i, j), time) if it beats move_t, else (None,
        move_t). Bounded candidates are timed lowest bound first, until a bound cannot win; ties go to
        the earlier candidate in the listed order, as if all were timed in that order."""
        j, lengths, ring = order[-1], self.lengths, self.ring
        cands = []  # (bound, n, v, i, the slowest unchanged rank's time)
        for n, v in enumerate(dict.fromkeys(self.local[j][:4] + self.local[j][-2:])):
            s = lengths[v]
            i = next((i for i in order[:-1] if ring.share + self.ltok[i] + s <= self.bucket_size), None)
            if i is None:
                continue
            others = next((self.times[x] for x in reversed(order) if x not in (i, j)), 0.0)
            lb = max(others, self.bound(self.ltok[j] - s, len(self.local[j]) - 1, self.lsq[j] - s * s, ring),
                     self.bound(self.ltok[i] + s, len(self.local[i]) + 1, self.lsq[i] + s * s, ring))
            cands.append((lb, n, v, i, others))
        move, move_n = None, -1
        for lb, n, v, i, others in sorted(cands):
            if lb > move_t:
                break
            m = max(others, self.time_of([x for x in self.local[j] if x != v], ring),
                    self.time_of(sorted(self.local[i] + [v], key=self.longest_first), ring))
            if (m, n) < (move_t, move_n):
                move, move_t, move_n = ("move", v, i, j), m, n
        return move, move_t

    def distribute(self, order, v, move_t):
        """Distribute v, one of the slowest rank's local sequences: (move, time) if that beats move_t."""
        j, s = order[-1], self.lengths[v]
        new_dist = tuple(sorted(self.dist + (v,)))
        new_ring = self.ring_of(new_dist)  # every rank's share grows by new_ring.share - ring.share
        tok, n, sq = list(self.ltok), [len(loc) for loc in self.local], list(self.lsq)
        tok[j], n[j], sq[j] = tok[j] - s, n[j] - 1, sq[j] - s * s
        if new_ring.share + max(tok) > self.bucket_size:
            return None
        # the other ranks keep their sequences under a larger ring: each is at least as slow as now, plus
        # the linear layers' time on the added share (every ring step's time grows)
        cost = self.cost
        if self.times[order[-2]] + cost.a * cost.lin_flops * (new_ring.share - self.ring.share) >= move_t:
            return None
        new_local = [[x for x in loc if x != v] for loc in self.local]
        return self.ring_change(order, new_dist, new_local, (tok, n, sq), move_t)

    def make_local(self, order, v, move_t):
        """Keep the distributed sequence v whole on the least busy rank with room for it: (move, time) if
        that beats move_t."""
        s = self.lengths[v]
        new_dist = tuple(x for x in self.dist if x != v)
        new_ring = self.ring_of(new_dist)  # every rank's share shrinks
        r = next((i for i in order if new_ring.share + self.ltok[i] + s <= self.bucket_size), None)
        if r is None:
            return None
        tok, n, sq = list(self.ltok), [len(loc) for loc in self.local], list(self.lsq)
        tok[r], n[r], sq[r] = tok[r] + s, n[r] + 1, sq[r] + s * s
        new_local = [sorted(loc + [v], key=self.longest_first) if i == r else list(loc)
                     for i, loc in enumerate(self.local)]
        return self.ring_change(order, new_dist, new_local, (tok, n, sq), move_t)

    def ring_change(self, order, new_dist, new_local, sums, move_t):
        """A new distributed set changes every rank's time: (("ring", new_dist, new_local), the slowest
        rank's time) if it beats move_t. Every rank is bounded from its sums (tokens, sequences, sum of L^2)
        first; then ranks are timed, the slowest so far first, giving up once one cannot win."""
        ring, (tok, n, sq) = self.ring_of(new_dist), sums
        if any(self.bound(tok[i], n[i], sq[i], ring) >= move_t for i in reversed(order)):
            return None
        m = 0.0
        for i in reversed(order):
            m = max(m, self.time_of(new_local[i], ring))
            if m >= move_t:
                return None
        return ("ring", new_dist, new_local), m

    def apply(self, move):
        """Make a move of move_local, or a ring change of distribute or make_local."""
        if move[0] == "move":
            _, v, i, j = move
            self.local[j] = [x for x in self.local[j] if x != v]
            self.local[i] = sorted(self.local[i] + [v], key=self.longest_first)
            self.update((i, j))
        else:
            _, self.dist, self.local = move
            self.ring = self.ring_of(self.dist)
            self.update(range(self.cp))

# -----------------------------------------------------------------------------
# balance_dp: across DP ranks


def balance_dp(plan, lengths, bucket_size, cost, rounds=16):
    """Across DP ranks, after the fact: Algorithm 2 balances them by per-sequence estimates, which leave
    out micro-batch and ring fixed costs and how evenly the CP ranks came out, and the step waits for
    the slowest DP rank. Repeatedly move one local sequence from the slowest CP rank of a micro-batch of
    the slowest DP rank a to the least busy CP rank that holds it in a micro-batch of the fastest DP
    rank b: the move that lowers max(T_a, T_b) most, if below T_a. No DP rank ends slower than a was."""
    dp = len(plan)
    if dp == 1:
        return plan
    search = _DPSearch(plan, lengths, bucket_size, cost)
    for _ in range(rounds):
        a = max(range(dp), key=lambda r: (search.dp_times[r], -r))
        b = min(range(dp), key=lambda r: (search.dp_times[r], r))
        move = search.best_move(a, b)
        if move is None:
            break
        search.apply(a, b, move)
    return [[mb for mb in mbs if mb.distributed or any(mb.local)] for mbs in search.plan]


class _DPSearch:
    """balance_dp's state: a copy of the plan, each micro-batch's ring (CostModel.ring, or None), every
    CP rank's time in every micro-batch, and every DP rank's time (CostModel.dp_rank_time)."""

    def __init__(self, plan, lengths, bucket_size, cost):
        self.lengths, self.bucket_size, self.cost = lengths, bucket_size, cost
        self.cp = next((len(mb.local) for mbs in plan for mb in mbs), 1)
        self.plan = [[MicroBatch(list(mb.distributed), [list(loc) for loc in mb.local], mb.rollbacks) for mb in mbs]
                     for mbs in plan]
        self.rings = [[cost.ring([lengths[k] for k in mb.distributed], self.cp) if mb.distributed else None
                       for mb in mbs] for mbs in self.plan]
        self.times = [[cost.rank_times(mb, lengths) for mb in mbs] for mbs in self.plan]
        self.dp_times = [cost.dp_rank_time(mbs, lengths, times=self.times[r]) for r, mbs in enumerate(self.plan)]

    def longest_first(self, k):  # a rank that gets a sequence lists them longest first
        return (-self.lengths[k], k)

    def tokens(self, r, m, loc):
        """Tokens of a CP rank of micro-batch m of DP rank r holding loc: its share of the ring included."""
        ring = self.rings[r][m]
        return (ring.share if ring else 0) + sum(self.lengths[k] for k in loc)

    def sums(self, r, m, loc):  # what rank_time_bound takes: tokens, how many local sequences, sum of L^2
        return self.tokens(r, m, loc), len(loc), sum(self.lengths[k] ** 2 for k in loc)

    def rank_time(self, r, m, loc):
        return self.cost.rank_time(self.tokens(r, m, loc), [self.lengths[k] for k in loc], self.rings[r][m])

    def bound(self, r, m, tok, n, sq):
        return rank_time_bound(self.cost, tok, n, sq, self.rings[r][m])

    def with_time(self, r, m, j, seconds):
        """DP rank r's time with CP rank j of its micro-batch m taking `seconds`."""
        ts = [list(x) for x in self.times[r]]
        ts[m][j] = seconds
        return self.cost.dp_rank_time(self.plan[r], self.lengths, times=ts)

    def best_move(self, a, b):
        """The best move from DP rank a to DP rank b, (v, ma, ja, rest, mbi, jb, new), or None if none
        lowers max(T_a, T_b) below T_a. Each candidate is bounded before it is timed (the DP time only
        grows with a rank's time; rank_time_bound from sums), so most cost a few additions."""
        lengths, cp = self.lengths, self.cp
        move, move_t = None, self.dp_times[a] * (1 - 1e-9)
        tok_b = [[self.tokens(b, m, loc) for loc in mb.local] for m, mb in enumerate(self.plan[b])]
        by_time = [sorted(range(cp), key=lambda j: (self.times[b][m][j], j)) for m in range(len(self.plan[b]))]
        for ma, mb_a in enumerate(self.plan[a]):
            ja = max(range(cp), key=lambda j: (self.times[a][ma][j], -j))
            if self.with_time(a, ma, ja, 0.0) >= move_t:  # another rank or micro-batch keeps a this slow
                continue
            tok_a, n_a, sq_a = self.sums(a, ma, mb_a.local[ja])
            for v in mb_a.local[ja]:
                s = lengths[v]
                if self.with_time(a, ma, ja, self.bound(a, ma, tok_a - s, n_a - 1, sq_a - s * s)) >= move_t:
                    continue
                rest = [x for x in mb_a.local[ja] if x != v]
                time_a = self.with_time(a, ma, ja, self.rank_time(a, ma, rest))
                if time_a >= move_t:
                    continue
                for mbi in range(len(self.plan[b])):  # the least busy CP rank that can hold v
                    jb = next((j for j in by_time[mbi] if tok_b[mbi][j] + s <= self.bucket_size), None)
                    if jb is None:
                        continue
                    tok, n, sq = self.sums(b, mbi, self.plan[b][mbi].local[jb])
                    if self.with_time(b, mbi, jb, self.bound(b, mbi, tok + s, n + 1, sq + s * s)) >= move_t:
                        continue
                    new = sorted(self.plan[b][mbi].local[jb] + [v], key=self.longest_first)
                    m = max(time_a, self.with_time(b, mbi, jb, self.rank_time(b, mbi, new)))
                    if m < move_t:
                        move, move_t = (v, ma, ja, rest, mbi, jb, new), m
        return move

    def apply(self, a, b, move):
        _, ma, ja, rest, mbi, jb, new = move
        self.plan[a][ma].local[ja], self.plan[b][mbi].local[jb] = rest, new
        self.times[a][ma][ja], self.times[b][mbi][jb] = self.rank_time(a, ma, rest), self.rank_time(b, mbi, new)
        for r in (a, b):
            self.dp_times[r] = self.cost.dp_rank_time(self.plan[r], self.lengths, times=self.times[r])

# -----------------------------------------------------------------------------
# the policy


def skrull_plus(lengths, *, dp, cp, bucket_size, cost=None, seed=0, dp_rank=None):
    """The policy. Per DP rank of Algorithm 2's split (plus_rank): Algorithm 2's strided micro-batches for m0
    and m0 + 1 micro-batches, each placed by Algorithm 1 or with every sequence distributed, plus the best
    count's Algorithm 1 placement refined; the rank keeps the fastest (CostModel.dp_rank_time), and the
    paper's plan is among them. Then, for dp <= PLUS_GLOBAL_DP, balance_dp, and last the whole plan against
    naive's, which wins on some bimodal batches. With dp_rank and dp > PLUS_GLOBAL_DP, only that DP rank's
    micro-batches are planned (a RankPlan); below, the whole plan (schedule() keeps that rank's part)."""
    cost = cost or default_cost()
    t_local = local_times(lengths, cost)
    split = gds_split(lengths, dp, cp, bucket_size, cost, t_local)
    if dp > PLUS_GLOBAL_DP:
        return plan_ranks(split, dp_rank, lambda idx: plus_rank(idx, lengths, cp, bucket_size, cost, t_local))
    plan = balance_dp([plus_rank(idx, lengths, cp, bucket_size, cost, t_local) for idx in split], lengths, bucket_size, cost)
    baseline = naive(lengths, dp=dp, cp=cp, bucket_size=bucket_size)
    return min((plan, baseline), key=lambda p: cost.predict_step_time(p, lengths))


def plus_rank(idx, lengths, cp, bucket_size, cost, t_local):
    """One DP rank's micro-batches for the sequences idx: the fastest of skrull_plus's candidates."""
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
    return min(cands, key=lambda c: c[1])[0]  # ties: the first tried


POLICIES["skrull_plus"] = skrull_plus
