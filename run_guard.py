"""
What lets a training run live on a shared cluster: one run per out_dir, a checkpoint when the job is
preempted, and one clear line when storage fails. train.py builds a RunGuard after its dry run (which
writes nothing); export.py and sample.py only read a checkpoint and take no lock.

One run owns an out_dir. Rank 0 creates out_dir/run.lock before anything else in out_dir is written, and
every rank learns the outcome (one broadcast): all ranks proceed or all refuse. The lock is written under
a unique name and hard-linked into place, so it appears whole or not at all, and link() fails when the
name exists, on NFS too (O_EXCL was not atomic over NFSv2 and still is not on some servers). It names its
owner: host, PID and start time. A second run (fresh, resume or overwrite) refuses with one line naming
it. The lock is removed on every exit Python sees (the end, an error, a signal); a lock left by an owner
that is gone (kill -9, a lost node) is recognised:
  - on the same machine (host name, boot id and PID namespace all match) by its PID: gone, a zombie, or
    reused by another process (its start time in /proc differs). Taken over at once.
  - from another machine, which shares only the filesystem, by a heartbeat: a child process of rank 0
    touches the lock every HEARTBEAT_S, and a lock not touched for STALE_S is stale. A process, not a
    thread, so a long call holding the GIL (a large checkpoint write) cannot stop the heartbeat. fcntl or
    flock locks are not used: over NFS they depend on the lock manager (silently local with `nolock`),
    and a lost node's lock is held until the server notices. The cost is that clocks must agree to well
    under STALE_S (NTP does), and that a run started within STALE_S of its predecessor's node failure
    waits for the lock to go stale. A new launch that finds a lock already silent for a few heartbeats
    waits for it (the owner is almost surely gone); a fresh heartbeat means a live run: refuse at once.
  Taking over is safe against racing launches: each takes an flock on the stale lock file, and removes
  it only while the lock's name still points at that file and it still names the stale owner, so no
  launch removes a lock another has just linked in; the new lock is then linked in as above. If the owner finds that its lock now names another run
  (it was judged stale: its heartbeat stalled past STALE_S), it stops at the next step.

Preemption. SIGTERM (what clusters and torchrun send), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
`--signal`) only set a flag: the current step finishes. At the end of every step all ranks agree whether
any of them was signalled (agree_to_stop: one all_reduce of two integers), so they stop at the same step,
write one checkpoint together and exit with 128 + the signal number and one line saying how to resume.
A second signal exits at once (no checkpoint); one within REPEAT_S of the first counts as the same
signal, delivered twice (SLURM signals every process of a job step, and torchrun forwards it again).

Storage errors. A checkpoint, metrics.jsonl or export write that fails with ENOSPC, EIO, EACCES and the
like ends every rank with one `error:` line naming the path and what to do (storage_message). The
OSError is dug out of whatever the writer raised (storage_error): a plain OSError, safetensors'
SafetensorError ("... (os error 28)"), or torch.distributed.checkpoint's CheckpointException, which
wraps each rank's exception. The previous checkpoint stays (checkpoint.save writes a temp and renames),
and metrics.jsonl keeps whole lines only (append_line). SIGXFSZ is ignored, so a file-size limit
(`ulimit -f`) is an EFBIG error too, not a silent kill.
"""
import atexit
import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0  # the owner touches its lock this often
STALE_S = 120.0  # a lock whose mtime is this much older than our clock belongs to a run that is gone
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_S = 1.0  # a repeat this soon is the same signal delivered twice (by the scheduler and by torchrun)

# -----------------------------------------------------------------------------
# the out_dir lock


def _proc_stat(pid):
    """(state, start time in clock ticks since boot) of process `pid` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return None


def _machine():
    """Host name, boot id and PID namespace: processes that agree on all three can check each other's PIDs."""
    def read(f, path):
        try:
            return f(path)
        except OSError:
            return None
    return {"host": socket.gethostname(),
            "boot_id": read(lambda p: open(p).read().strip(), "/proc/sys/kernel/random/boot_id"),
            "pid_ns": read(os.readlink, "/proc/self/ns/pid")}


def _read(path):
    """(owner record, os.stat_result) of the lock at `path`, or None when there is none. Opening the file
    revalidates its attributes on NFS (close-to-open consistency), so the mtime is the server's latest."""
    try:
        with open(path) as f:
            st = os.fstat(f.fileno())
            text = f.read()
    except FileNotFoundError:
        return None
    return _record(text), st


def _record(text):
    """A lock file's owner record; {} for one that is not ours to read, judged by its age alone."""
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def same_machine(owner):
    """Whether lock record `owner` was written on this machine, where its PID can be checked."""
    here = _machine()
    return bool(here["boot_id"]) and all(owner.get(k) == v for k, v in here.items())


def owner_alive(owner, mtime, stale_s=STALE_S):
    """Whether the run that wrote lock record `owner` (last touched at `mtime`) may still be running."""
    if not same_machine(owner):
        return time.time() - mtime < stale_s
    stat = _proc_stat(owner.get("pid"))
    if stat is None:
        return False  # no such process (this machine has /proc: its boot id was read there)
    return stat[0] != "Z" and owner.get("pid_start") in (None, stat[1])  # a zombie, or a reused PID: gone


def describe(owner):
    if not owner:
        return "an unreadable lock"
    return f"host {owner.get('host')}, PID {owner.get('pid')}, started {owner.get('started')}"


def live_owner(out_dir):
    """The record of the live run that owns `out_dir`, or None (no lock, a stale one, or this process's own).
    Reads only."""
    held = _read(os.path.join(out_dir, LOCK_NAME))
    if held is None or (held[0].get("pid") == os.getpid() and same_machine(held[0])):
        return None
    return held[0] if owner_alive(held[0], held[1].st_mtime) else None


def refusal(out_dir, owner):
    """The one line (after "error: ") a run gets when `owner` holds its out_dir."""
    return (f"out_dir={out_dir!r} belongs to another run ({describe(owner)}): wait for it to end or stop it, "
            f"or use another out_dir (a lock whose run is gone is taken over: at once on its host, after "
            f"{STALE_S:.0f}s without a heartbeat from another)")


def acquire(out_dir, stale_s=STALE_S, heartbeat_s=HEARTBEAT_S, wait=True):
    """Make this process the owner of `out_dir`: (its lock record, None), or (None, the live owner's record).
    A lock whose owner is gone is taken over; one that has missed a few heartbeats is waited for (wait=True),
    as its owner is almost surely gone."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    stat = _proc_stat(os.getpid())
    me = {**_machine(), "pid": os.getpid(), "pid_start": stat and stat[1], "token": uuid.uuid4().hex,
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    mine = f"{path}.{me['host']}.{me['pid']}.{me['token'][:8]}"
    with open(mine, "w") as f:
        json.dump(me, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        while True:
            try:
                os.link(mine, path)
                return me, None
            except FileExistsError:
                if os.stat(mine).st_nlink == 2:  # NFS: the link was made but its reply was lost
                    return me, None
            held = _read(path)
            if held is None:  # released meanwhile
                continue
            owner, st = held
            if owner_alive(owner, st.st_mtime, stale_s):
                silent = time.time() - st.st_mtime
                if not (wait and 3 * heartbeat_s < silent and not same_machine(owner)):
                    return None, owner
                print(f"{path}: the lock of {describe(owner)} has had no heartbeat for {silent:.0f}s; "
                      f"taking it over if it stays silent for {stale_s:.0f}s", file=sys.stderr, flush=True)
                time.sleep(min(heartbeat_s, stale_s - silent + 0.1))
                continue
            _take_over(path, owner, st)
    finally:
        os.unlink(mine)


def _take_over(path, owner, st):
    """Remove the stale lock (`owner`, `st`) at `path`, unless another launch has replaced it meanwhile.
    Launches taking it over take turns under an flock on the stale lock file itself (the kernel drops the
    flock of a launch that dies), and each removes it only while `path` still is that file and still names
    that owner: no launch can remove a lock another has just made in its place."""
    try:
        f = open(path, "r+")  # for writing: NFS emulates flock with POSIX locks, whose exclusive kind needs it
    except FileNotFoundError:  # another launch removed it first
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        mine = os.fstat(f.fileno())
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return
        if now.st_ino == mine.st_ino == st.st_ino and _record(f.read()) == owner:
            os.unlink(path)


def release(out_dir, token):
    """Remove out_dir's lock if it is still the one with `token`."""
    path = os.path.join(out_dir, LOCK_NAME)
    held = _read(path)
    if held is not None and held[0].get("token") == token:
        os.unlink(path)


def _heartbeat(path, token, parent, every):
    """The heartbeat process: touch the lock while its parent lives and the lock is still its parent's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    last = 0.0
    while os.getppid() == parent:
        if time.monotonic() - last >= every:
            held = _read(path)
            if held is None or held[0].get("token") != token:
                return
            try:
                os.utime(path)  # on NFS the server's clock sets the mtime
            except FileNotFoundError:  # released meanwhile
                return
            last = time.monotonic()
        time.sleep(min(every, 0.5))


# -----------------------------------------------------------------------------
# storage errors


def storage_error(e):
    """The OSError (with an errno) behind exception `e`, or None. Looks at `e`, its cause and context chain,
    the per-rank exceptions of a CheckpointException (its `failures`), then at an errno named in a message
    ("(os error 28)" from safetensors' SafetensorError, "[Errno 28]")."""
    chain, todo = [], [e]
    while todo:
        x = todo.pop(0)
        if x is None or any(x is y for y in chain):
            continue
        chain.append(x)
        failures = getattr(x, "failures", None)  # torch.distributed.checkpoint: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [x.__cause__, x.__context__]
    for x in chain:
        if isinstance(x, OSError) and x.errno:
            return x
    for x in chain:
        m = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(x))
        if m:
            n = int(m.group(1) or m.group(2))
            return OSError(n, os.strerror(n))
    return None


ADVICE = {
    errno.ENOSPC: "the filesystem is full: free space on it, or copy out_dir to a larger one",
    errno.EDQUOT: "the disk quota is used up: free space or raise the quota, or copy out_dir elsewhere",
    errno.EFBIG: "a file-size limit (ulimit -f) or the filesystem's largest file is in the way: raise it",
    errno.EIO: "the storage reported an I/O error: check the disk or mount, or copy out_dir to healthy storage",
    errno.EROFS: "the filesystem is read-only: remount it read-write or use another out_dir",
    errno.EACCES: "this user may not write there: fix the permissions or use another out_dir",
    errno.EPERM: "this user may not write there: fix the permissions or use another out_dir",
}


def storage_message(path, err, then):
    """One line for a failed write of `path` (err: the OSError): what failed, what to do, and `then`."""
    name = errno.errorcode.get(err.errno, str(err.errno))
    advice = ADVICE.get(err.errno, "check the storage that holds it")
    return f"error: cannot write {err.filename or path}: {err.strerror} ({name}); {advice}, then {then}"


def resume_hint(ckpt_path, last_saved):
    if not last_saved:
        return "start the run again (no checkpoint had been written)"
    return f"resume with --init_from=resume: {ckpt_path} holds iter {last_saved}, intact"


def append_line(path, text):
    """Append `text` and a newline to `path` in one write. If the write fails part-way, the file is cut
    back to its old end (then the error is raised), so it holds whole lines only."""
    data = (text + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # a torn last line is still dropped by checkpoint.start_metrics on resume
            raise
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# what train.py holds


class RunGuard:
    """A run's hold on its out_dir, its preemption flag and its storage-error handling. Every rank builds
    one (a collective: rank 0 takes the lock and broadcasts the outcome); `recheck` runs on rank 0 under the
    lock (train.py's out_dir checks again: another run may have written there since they first ran)."""

    def __init__(self, out_dir, master, world_size, device, recheck=None):
        import torch
        import torch.distributed as dist
        self.out_dir, self.master, self.world_size, self.device = out_dir, master, world_size, device
        self.owner, self.heartbeat, self.signal, self.write_failure, self.lost, self.checked = None, None, None, None, None, 0.0
        refused = self._own(recheck) if master else None
        if world_size > 1:
            ok = torch.tensor([refused is None], dtype=torch.int32, device=device)
            dist.broadcast(ok, 0)
            refused = refused or (None if ok.item() else 1)
        if refused is not None:
            raise SystemExit(refused if master else 1)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past `ulimit -f` fails with EFBIG instead

    def _own(self, recheck):
        """Rank 0: take the lock, start its heartbeat, run `recheck` under it. Returns the refusal, or None."""
        try:
            me, owner = acquire(self.out_dir)
        except OSError as e:  # out_dir cannot be created, or is full: nothing of the run was written
            return storage_message(os.path.join(self.out_dir, LOCK_NAME), e, "start the run again")
        if me is None:
            return "error: " + refusal(self.out_dir, owner)
        self.owner = me
        atexit.register(self.release)
        self.heartbeat = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), os.path.join(self.out_dir, LOCK_NAME), me["token"],
             str(os.getpid()), str(HEARTBEAT_S)], start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if recheck is not None:
                recheck()
        except SystemExit as e:
            self.release()
            return e.code
        return None

    def release(self):
        """Stop the heartbeat and remove the lock if it is still this run's. Any exit, any number of times."""
        if self.heartbeat is not None:
            self.heartbeat.kill()
            self.heartbeat.wait()
            self.heartbeat = None
        if self.owner is not None:
            release(self.out_dir, self.owner["token"])
            self.owner = None

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self.signal_time = signum, time.monotonic()
            if self.master:  # os.write: print could re-enter a stream the main thread is writing
                os.write(2, f"{name}: stopping after this step with a checkpoint (a second signal stops at once)\n".encode())
            return
        if time.monotonic() - self.signal_time < REPEAT_S:
            return
        if self.master:
            os.write(2, f"{name} again: stopping now without a checkpoint; resume from the last one with "
                        f"--init_from=resume\n".encode())
        self.release()
        os._exit(128 + signum)

    def append_record(self, path, text):
        """Rank 0: one metrics.jsonl line (append_line). A failure is kept and stops every rank at this step's
        agree_to_stop."""
        try:
            append_line(path, text)
        except OSError as e:
            self.write_failure = (path, e)

    def agree_to_stop(self):
        """Every rank, at the end of every step: whether any rank was signalled, failed to write metrics, or
        lost the lock. One all_reduce (MAX) of (reason, signal number). Returns None, "signal", "write" or "lost"."""
        reason = 2 if self.write_failure else 1 if self.signal else 0
        if self.master and self.owner and time.monotonic() - self.checked > HEARTBEAT_S:
            self.checked = time.monotonic()
            held = _read(os.path.join(self.out_dir, LOCK_NAME))
            if held is None or held[0].get("token") != self.owner["token"]:
                self.lost, reason, self.owner = held and held[0], 3, None
        sig = self.signal or 0
        if self.world_size > 1:
            import torch
            import torch.distributed as dist
            t = torch.tensor([reason, sig], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            reason, sig = t.tolist()
        if sig and not self.signal:  # another rank was signalled: a signal here now is a second one
            self.signal, self.signal_time = sig, time.monotonic() - REPEAT_S
        return [None, "signal", "write", "lost"][reason]

    def stop(self, reason, it, ckpt_path, last_saved):
        """Every rank, after agree_to_stop said `reason` (and, for a signal, after the checkpoint at `it`): one
        line from rank 0, the lock released, a non-zero exit."""
        if reason == "signal":
            name = signal.Signals(self.signal).name
            self.exit(128 + self.signal, f"stopped by {name} after iter {it}: {ckpt_path} holds iter {it}; "
                                         f"resume with the same command and --init_from=resume")
        if reason == "write":
            path, err = self.write_failure or (None, None)
            self.exit(1, storage_message(path, err, resume_hint(ckpt_path, last_saved)) if err else 1)
        self.exit(1, f"error: out_dir={self.out_dir!r} was taken over by another run "
                     f"({describe(self.lost)}) after this run's heartbeat stalled for "
                     f"{STALE_S:.0f}s; stopping so the two do not mix. {resume_hint(ckpt_path, last_saved)}")

    def checked_write(self, path, write, then, rank0_only=False):
        """Every rank calls write() (it may hold collectives; rank0_only: only rank 0 does), then all agree
        whether it failed (one all_gather of the messages): a storage error on any rank, or a ValueError (a
        write refused, e.g. non-finite weights), ends every rank with one line naming `path` and saying what
        to do, then `then`."""
        msg = None
        try:
            if self.master or not rank0_only:
                write()
        except ValueError as e:
            msg = f"error: {e}"
        except BaseException as e:  # CheckpointException derives from BaseException
            err = None if isinstance(e, (KeyboardInterrupt, SystemExit)) else storage_error(e)
            if err is None:
                raise
            msg = storage_message(path, err, then)
        if self.world_size > 1:
            import torch.distributed as dist
            msgs = [None] * self.world_size
            dist.all_gather_object(msgs, msg)
            msg = next((m for m in msgs if m), None)
        if msg:
            self.exit(1, msg)

    def exit(self, code, msg):
        """End this rank: rank 0 prints `msg`; the lock is released; under torchrun through os._exit (as
        train.py's own end does, past gloo's threads)."""
        if self.master and isinstance(msg, str):
            print(msg, file=sys.stderr, flush=True)
        self.release()
        sys.stdout.flush()
        sys.stderr.flush()
        if self.world_size > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
            os._exit(code)
        sys.exit(code)


if __name__ == "__main__":  # the heartbeat process: run_guard.py LOCK TOKEN PARENT_PID EVERY_S
    _heartbeat(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
