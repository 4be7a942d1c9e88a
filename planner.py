"""
Planning ahead, off the training loop's critical path. A global batch's plan depends only on its lengths,
the seed and the cost model's constants, all known before the step (data.prepare.global_batch is a pure
function of the step), so a planner process makes the next step's plan, and the held-out batches', while
the current step runs; the step then only takes it, and waits only if planning is slower than a step.

    planner = Planner()                              # forks the planner process: early, before sockets and CUDA
    planner.plan_kwargs = dict(dp=..., cp=..., bucket_size=..., policy=..., dp_rank=...)  # scheduler.schedule's
    planner.submit(key, lengths, seed, cost)         # returns at once
    planned = planner.take(key, lengths, seed, cost)   # .plan, .cost, .plan_ms, .wait_ms

Which constants plan which step: every request carries the CostModel to plan with, and the caller decides.
train.py submits step s + 1 when step s begins, with the CostModel in force then (so the plan of step s uses
the constants in force when step s - 1 began), and the held-out batches evaluated after step s with the
CostModel that planned step s. A CostModel is never changed once a plan used it (a calibration makes a new
one and swaps the reference), so every rank plans every step with the same constants. A resumed run plans
its first step when it starts, under the cost given to take(): it plans as the uninterrupted run did when
that is the CostModel in force when the step before began (with fixed constants, always).

Why a process and not a thread: a thread shares the GIL with the training loop. Every torch call releases
the GIL while its kernel runs and takes it back after, and while a thread holds it the loop waits up to
sys.getswitchinterval() (5 ms) each time: measured here, a loop of small CPU ops ran 3-4x slower beside a
planning thread (docs/results.md, "Planning per rank, one step ahead"), the convoy effect. A process plans on another core
and costs the loop one pickled request and one pickled RankPlan per plan. It is forked (the loop's modules,
registered policies and their code are already there; spawn would rerun train.py, which has no main guard),
before train.py starts the process group, touches CUDA or opens the data, so it holds none of their sockets,
state or files, and it runs only scheduler code: scheduler.schedule and the policies registered before the
fork, looked up there by name (each request carries the policy's name and arguments). It ignores
SIGINT and takes SIGTERM's default action, so the trainer's signal handlers never run in it, and exits
within a second once its parent is gone.
"""
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
import weakref
from dataclasses import dataclass, replace

import scheduler


@dataclass
class Planned:
    plan: object          # what scheduler.schedule returned (train.py: a scheduler.RankPlan)
    cost: object          # the CostModel that planned it
    plan_ms: float        # CPU time of the planning, ms (the planner's own time, whatever the machine's load)
    wait_ms: float = 0.0  # how long take() waited for it, ms


def _plan(plan_kwargs, lengths, seed, cost):
    """(scheduler.schedule's plan or the exception it raised, CPU ms)."""
    t0 = time.thread_time()
    try:
        plan = scheduler.schedule(lengths, seed=seed, cost=cost, **plan_kwargs)
    except Exception as e:  # raised again where the plan is taken
        plan = e
    return plan, (time.thread_time() - t0) * 1e3


def _serve(requests, results, parent):
    """The planner process: plan each request, in order, until told to stop or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handler (preemption checkpoints)
    while True:
        try:
            request = requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if request is None:
            return
        rid, key, plan_kwargs, lengths, seed, cost = pickle.loads(request)
        plan, ms = _plan(plan_kwargs, lengths, seed, cost)
        try:
            blob = pickle.dumps(plan)
        except Exception as e:  # e.g. an exception that does not pickle: its text
            blob = pickle.dumps(RuntimeError(f"{type(plan).__name__}: {plan} (while planning; pickling it failed: {e})"))
        results.put((rid, key, blob, ms))


class Planner:
    """Plans requests in order, scheduler.schedule(lengths, seed=, cost=, **plan_kwargs), in a forked process
    (ahead=True, where fork exists), or in take() itself (ahead=False: synchronous, the wait is the planning).
    Set plan_kwargs before the first request."""

    def __init__(self, plan_kwargs=None, ahead=True):
        self.plan_kwargs, self._ids = plan_kwargs, 0
        self._wanted = {}  # key -> (request id, cost) of its newest request
        self._done = {}    # key -> Planned of that request
        self._proc, self._stop = None, None
        if ahead and "fork" in mp.get_all_start_methods():
            ctx = mp.get_context("fork")
            self._requests, self._results = ctx.Queue(), ctx.Queue()
            self._requests.cancel_join_thread()  # exiting never waits on a request the process will not read
            self._proc = ctx.Process(target=_serve, args=(self._requests, self._results, os.getpid()),
                                     name="planner", daemon=True)
            self._proc.start()
            # a Planner dropped without close() (train.py run in-process by a test) stops its process too
            self._stop = weakref.finalize(self, self._requests.put, None)
            self._stop.atexit = False  # at exit multiprocessing ends it (a daemon); no thread starts then

    def submit(self, key, lengths, seed, cost):
        """Start planning `lengths` with `seed` under `cost` as `key`, unless key is already planned or being
        planned under this same cost (a CostModel is compared by identity: it never changes)."""
        if key in self._wanted and self._wanted[key][1] is cost:
            return
        self._ids += 1
        self._wanted[key] = (self._ids, cost)
        self._done.pop(key, None)
        if self._proc is not None:
            # pickled here, so that what does not pickle raises here, not in the queue's feeder thread
            self._requests.put(pickle.dumps((self._ids, key, self.plan_kwargs, lengths, seed, cost)))

    def take(self, key, lengths, seed, cost, keep=False):
        """The Planned of key: as submitted earlier (with the cost given then), else planned now under `cost`.
        keep=True keeps it for the next take (the held-out batches, planned once per CostModel). Raises what
        planning raised."""
        t0 = time.perf_counter()
        self.submit(key, lengths, seed, self._wanted[key][1] if key in self._wanted else cost)
        while key not in self._done:
            if self._proc is None:
                rid, c = self._wanted[key]
                plan, ms = _plan(self.plan_kwargs, lengths, seed, c)
                self._done[key] = Planned(plan, c, ms)
            else:
                self._receive()
        planned = self._done[key] if keep else self._done.pop(key)
        if not keep:
            del self._wanted[key]
        if isinstance(planned.plan, BaseException):
            raise planned.plan
        return replace(planned, wait_ms=(time.perf_counter() - t0) * 1e3)

    def _receive(self):
        """One answer from the process, kept if it answers the newest request of its key."""
        try:
            rid, key, blob, ms = self._results.get(timeout=1.0)
        except queue.Empty:
            if not self._proc.is_alive():  # killed, e.g. by a launcher signalling the whole process group while
                self._proc = None  # the trainer writes its preemption checkpoint: plan here from now on (same plans)
            return
        if key in self._wanted and self._wanted[key][0] == rid:
            self._done[key] = Planned(pickle.loads(blob), self._wanted[key][1], ms)

    def close(self):
        """Stop the process (it also stops by itself once its parent is gone)."""
        if self._proc is not None:
            self._stop()
            self._proc.join(timeout=5)
            self._proc = None
