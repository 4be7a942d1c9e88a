"""run_guard.py: one run per out_dir, a checkpoint on preemption, one line when storage fails.
- the lock: a second owner is refused; a dead owner (same host: its PID; another host: its heartbeat) is
  taken over, atomically when several launches race; the heartbeat process keeps the lock fresh;
- storage errors are dug out of what the writers raise, and metrics lines are whole or absent;
- through train.py (slow): two launches into one out_dir and a resume during a run (one proceeds), kill -9
  then a takeover, SIGTERM in one process and under torchrun at cp 2 (the resumed losses equal an
  uninterrupted run's), a full tmpfs and a file-size limit (one `error:` line, nothing lost).
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import run_guard
from conftest import ROOT, assert_golden, command, env, train

# -----------------------------------------------------------------------------
# the lock, in this process


def write_lock(out_dir, owner, age=0.0):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, run_guard.LOCK_NAME)
    with open(path, "w") as f:
        json.dump(owner, f)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def here(pid, **extra):
    """A lock record as a process `pid` on this machine writes it."""
    stat = run_guard._proc_stat(pid)
    return {**run_guard._machine(), "pid": pid, "pid_start": stat and stat[1], "started": "then", "token": "t", **extra}


def test_second_owner_refused_until_released(tmp_path):
    me, owner = run_guard.acquire(str(tmp_path))
    assert owner is None and me["pid"] == os.getpid()
    again, owner = run_guard.acquire(str(tmp_path))
    assert again is None and owner == me
    assert "belongs to another run (host " in run_guard.refusal(str(tmp_path), owner)
    assert run_guard.live_owner(str(tmp_path)) is None  # this process's own lock does not refuse it
    run_guard.release(str(tmp_path), me["token"])
    assert os.listdir(tmp_path) == []
    assert run_guard.acquire(str(tmp_path))[0] is not None


def test_dead_owner_on_this_host_is_taken_over(tmp_path):
    child = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path, here(child.pid))
        assert run_guard.acquire(str(tmp_path))[1]["pid"] == child.pid  # alive: refused
        child.kill()
        time.sleep(0.2)  # killed, not yet reaped: a zombie is gone too
        assert run_guard._proc_stat(child.pid)[0] == "Z"
        me, owner = run_guard.acquire(str(tmp_path))
        assert owner is None and me["pid"] == os.getpid()
    finally:
        child.kill()
        child.wait()
    gone = here(os.getpid())
    gone["pid"] = child.pid  # reaped: no such process
    write_lock(tmp_path, gone)
    assert run_guard.acquire(str(tmp_path))[1] is None
    reused = here(os.getpid(), pid_start=1)  # a live PID that started at another time: reused, not the owner
    write_lock(tmp_path, reused)
    assert run_guard.acquire(str(tmp_path))[1] is None


def test_other_host_judged_by_heartbeat(tmp_path):
    other = {"host": "node7", "boot_id": "b", "pid_ns": "p", "pid": 1, "started": "then", "token": "t"}
    write_lock(tmp_path, other, age=1.0)
    assert run_guard.acquire(str(tmp_path), stale_s=30, heartbeat_s=10)[1] == other  # fresh: refused at once
    write_lock(tmp_path, other, age=31.0)
    assert run_guard.acquire(str(tmp_path), stale_s=30, heartbeat_s=10)[1] is None  # stale: taken over
    write_lock(tmp_path, other, age=1.0)  # silent for more than 3 heartbeats: waited for, then taken over
    t0 = time.time()
    assert run_guard.acquire(str(tmp_path), stale_s=2.0, heartbeat_s=0.2)[1] is None
    assert 0.8 < time.time() - t0 < 5
    write_lock(tmp_path, other, age=1.0)
    assert run_guard.acquire(str(tmp_path), stale_s=2.0, heartbeat_s=0.2, wait=False)[1] == other


def test_racing_takeovers_leave_one_owner(tmp_path):
    """Eight launches at once find one stale lock: exactly one becomes the owner, and the lock names it."""
    write_lock(tmp_path, {"host": "node7", "pid": 1, "token": "t"}, age=500)
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import run_guard\n"
            "time.sleep(max(0, float(sys.argv[1]) - time.time()))\n"
            f"me, owner = run_guard.acquire({str(tmp_path)!r})\n"
            "print('OWNER' if me else 'REFUSED', me and me['token'], flush=True)\n"
            "sys.stdin.read()\n")  # alive until every launch has decided: a dead owner's lock is stale
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(8)]
    outs = [p.stdout.readline().split() for p in procs]
    for p in procs:
        p.communicate(timeout=60)
    owners = [o for o in outs if o[0] == "OWNER"]
    assert len(owners) == 1, outs
    held = json.load(open(tmp_path / run_guard.LOCK_NAME))
    assert held["token"] == owners[0][1]
    assert sorted(os.listdir(tmp_path)) == [run_guard.LOCK_NAME]  # no temp or stale names left behind


def test_heartbeat_process(tmp_path):
    me, _ = run_guard.acquire(str(tmp_path))
    path = os.path.join(str(tmp_path), run_guard.LOCK_NAME)
    os.utime(path, (time.time() - 100, time.time() - 100))
    beat = subprocess.Popen([sys.executable, run_guard.__file__, path, me["token"], str(os.getpid()), "0.2"])
    try:
        time.sleep(1.0)
        assert time.time() - os.stat(path).st_mtime < 1.0
        write_lock(tmp_path, {**me, "token": "another run's"})  # taken over: the heartbeat stops
        beat.wait(timeout=5)
    finally:
        beat.kill()
        beat.wait()


def test_run_guard_in_one_process(tmp_path, capsys):
    """RunGuard at world size 1: the lock, the recheck under it, the stop reasons, and the release."""
    handlers = {sig: signal.getsignal(sig) for sig in run_guard.STOP_SIGNALS + (signal.SIGXFSZ,)}
    try:
        def refuse():
            raise SystemExit("error: out_dir holds a run now")
        with pytest.raises(SystemExit, match="holds a run now"):
            run_guard.RunGuard(str(tmp_path), True, 1, "cpu", recheck=refuse)
        assert os.listdir(tmp_path) == []  # released when the recheck refuses
        guard = run_guard.RunGuard(str(tmp_path), True, 1, "cpu")
        lock = tmp_path / run_guard.LOCK_NAME
        assert json.load(open(lock))["pid"] == os.getpid() and guard.heartbeat.poll() is None
        assert guard.agree_to_stop() is None
        guard.append_record(str(tmp_path / "missing" / "metrics.jsonl"), "{}")  # no such directory: a failed write
        assert guard.agree_to_stop() == "write"
        guard.write_failure = None
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler only sets the flag
        assert guard.agree_to_stop() == "signal" and guard.signal == signal.SIGUSR1
        write_lock(tmp_path, {"host": "node7", "pid": 1, "token": "t", "started": "later"})  # taken over
        guard.checked = 0.0
        assert guard.agree_to_stop() == "lost" and guard.owner is None
        beat = guard.heartbeat
        with pytest.raises(SystemExit):
            guard.stop("lost", 3, "ckpt", 0)
        assert "was taken over by another run (host node7, PID 1, started later)" in capsys.readouterr().err
        assert os.path.exists(lock) and beat.poll() is not None  # the new owner's lock stays; the heartbeat ended
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


# -----------------------------------------------------------------------------
# storage errors


def test_storage_error_is_dug_out():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception
    from safetensors import SafetensorError
    full = OSError(errno.ENOSPC, "No space left on device")
    assert run_guard.storage_error(full) is full
    try:  # torch.save into a full file: a RuntimeError raised while handling the OSError
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as e:
        wrapped = e
    assert run_guard.storage_error(wrapped).errno == errno.EIO
    dcp = CheckpointException("save failed", {1: _wrap_exception(wrapped)})  # a BaseException
    assert run_guard.storage_error(dcp).errno == errno.EIO
    st = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert run_guard.storage_error(st).errno == errno.ENOSPC
    assert run_guard.storage_error(ValueError("not a storage error")) is None
    msg = run_guard.storage_message("out/ckpt", run_guard.storage_error(st), run_guard.resume_hint("out/ckpt", 4))
    assert msg == ("error: cannot write out/ckpt: No space left on device (ENOSPC); the filesystem is full: free space on "
                   "it, or copy out_dir to a larger one, then resume with --init_from=resume: out/ckpt holds iter 4, intact")
    perm = run_guard.storage_message("o", OSError(errno.EACCES, "Permission denied", "o/m"), "retry")
    assert perm.startswith("error: cannot write o/m: Permission denied (EACCES); this user may not write there")


def test_append_line_keeps_whole_lines(tmp_path):
    """Under a real file-size limit (RLIMIT_FSIZE) the append that crosses it fails part-way (EFBIG): the
    partial line is cut off, so every line left is a whole record."""
    path = tmp_path / "metrics.jsonl"
    code = (f"import errno, json, resource, signal, sys; sys.path.insert(0, {ROOT!r}); import run_guard\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "for i in range(100):\n"
            "    try:\n"
            f"        run_guard.append_line({str(path)!r}, json.dumps({{'iter': i + 1, 'pad': 'x' * 70}}))\n"
            "    except OSError as e:\n"
            "        print(i, errno.errorcode[e.errno]); break\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    n, name = r.stdout.split()
    assert name == "EFBIG" and 5 < int(n) < 20, r.stdout + r.stderr
    lines = path.read_text().splitlines(keepends=True)
    assert [json.loads(line)["iter"] for line in lines] == list(range(1, int(n) + 1))
    assert all(line.endswith("\n") for line in lines)


# -----------------------------------------------------------------------------
# through train.py


def gated(tmp_path, step):
    """A train.py launcher whose optimizer step number `step` waits (inside the step) until the file `gate`
    beside it exists: the same losses, and a test knows which step a run is in when it acts."""
    path, gate = tmp_path / f"gated_{step}.py", tmp_path / f"gate_{step}"
    path.write_text("import os, runpy, sys, time, torch\n"
                    "step, calls = torch.optim.AdamW.step, []\n"
                    "def gated(self, *a, **k):\n"
                    "    calls.append(1)\n"
                    f"    while len(calls) == {step} and not os.path.exists({str(gate)!r}):\n"
                    "        time.sleep(0.02)\n"
                    "    return step(self, *a, **k)\n"
                    "torch.optim.AdamW.step = gated\n"
                    f"sys.argv = ['train.py'] + sys.argv[1:]\nsys.path.insert(0, {ROOT!r})\n"
                    f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n")
    return str(path), gate


def start(cmd, err=None, **environ):
    """Popen `cmd` as conftest.run does; stderr to the file `err` if given (a test can read it while it runs)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**env(), **environ},
                            stderr=open(err, "w") if err else subprocess.PIPE)


def records(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def wait_for(cond, timeout=300, procs=()):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        for p in procs:
            assert p.poll() is None, f"exited early ({p.returncode}): {p.communicate()}"
        time.sleep(0.02)


def ckpt_iter(out_dir):
    from checkpoint import latest, read_metadata
    return int(read_metadata(latest(str(out_dir)))["iter"])


def one_line(err):
    err = err.strip()
    assert "Traceback" not in err and "\n" not in err and err.startswith("error: "), err
    return err


@pytest.mark.slow
def test_one_run_per_out_dir(tmp_path, dataset):
    """Two launches 0.5 s apart: one proceeds, the other refuses with one line naming the owner. A resume
    launched while the run goes refuses too. kill -9 of the owner: a new launch takes over and finishes."""
    d = tmp_path / "dup"
    script, _ = gated(tmp_path, 7)  # the owner waits in step 7 (after the checkpoint at 5) until killed
    cmd = command(d, dataset, script=script, max_iters=20, checkpoint_interval=5)
    resume = command(d, dataset, init_from="resume", max_iters=20, checkpoint_interval=5)
    first = start(cmd)
    time.sleep(0.5)
    second = start(cmd)
    wait_for(lambda: os.path.exists(d / run_guard.LOCK_NAME))
    during = start(resume)  # launched while a run holds out_dir
    wait_for(lambda: first.poll() is not None or second.poll() is not None)  # the refused one ends
    refused, owner = (first, second) if first.poll() is not None else (second, first)
    for p in (refused, during):
        err = one_line(p.communicate(timeout=300)[1])
        assert p.returncode != 0 and "belongs to another run" in err and f"PID {owner.pid}," in err, err
        assert "started 20" in err and "host " in err
    wait_for(lambda: len(records(d)) == 6, procs=[owner])

    owner.kill()  # kill -9: the lock stays, naming a dead PID
    owner.wait()
    assert os.path.exists(d / run_guard.LOCK_NAME) and ckpt_iter(d) == 5
    r = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {d / 'ckpt' / 'step-00000005'} at iter 5" in r.stdout
    assert [rec["iter"] for rec in records(d)] == list(range(1, 21))  # strictly increasing, one run's records
    assert not os.path.exists(d / run_guard.LOCK_NAME)  # released at the end


def sigterm_in_step(cmd, gate, out_dir, err_path, step, signalled):
    """Run `cmd` (gated at `step`), SIGTERM `signalled(proc)` while it waits inside that step, let the step
    finish once rank 0 has noticed the signal, and return (returncode, stderr)."""
    # torchrun SIGKILLs its workers 30 s after forwarding a signal (--shutdown_timeout): too soon on a busy machine
    p = start(cmd, err_path, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600")
    wait_for(lambda: len(records(out_dir)) == step - 1, procs=[p])
    os.kill(signalled(p), signal.SIGTERM)
    wait_for(lambda: "stopping after this step" in open(err_path).read(), procs=[p])
    gate.touch()
    p.wait(timeout=300)
    return p.returncode, open(err_path).read()


def check_preempted(out_dir, rc, err, it):
    """The run stopped after step `it` with the resume line, and its checkpoint holds that step."""
    assert rc != 0 and [r["iter"] for r in records(out_dir)] == list(range(1, it + 1)), (rc, err[-3000:])
    assert (f"stopped by SIGTERM after iter {it}: {out_dir / 'ckpt'} holds iter {it}; resume with the same "
            f"command and --init_from=resume") in err.splitlines(), err[-3000:]
    assert ckpt_iter(out_dir) == it
    assert not os.path.exists(out_dir / run_guard.LOCK_NAME)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes_exactly(tmp_path, dataset):
    """One process: SIGTERM during step 3 lets it finish, writes a checkpoint of it (checkpoint_interval=0:
    only the signal writes one) and exits 143; resuming reaches the end with an uninterrupted run's losses.
    A second signal exits at once, without a checkpoint."""
    args = dict(max_iters=6, eval_fraction=0.25, eval_interval=2, eval_batches=2)
    d, twice = tmp_path / "term", tmp_path / "twice"
    reference = start(command(tmp_path / "ref", dataset, **args))
    script, gate = gated(tmp_path, 3)
    p = start(command(twice, dataset, script=gated(tmp_path, 2)[0], **args), tmp_path / "twice.err")
    rc, err = sigterm_in_step(command(d, dataset, script=script, **args), gate, d, tmp_path / "term.err", 3, lambda p: p.pid)
    assert rc == 128 + signal.SIGTERM and err.startswith("SIGTERM: stopping after this step with a checkpoint")
    check_preempted(d, rc, err, 3)

    wait_for(lambda: len(records(twice)) == 1, procs=[p])  # waiting in step 2, for good
    p.send_signal(signal.SIGTERM)
    time.sleep(run_guard.REPEAT_S + 0.3)  # sooner, it counts as the same signal delivered twice
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    p.wait(timeout=60)
    assert p.returncode == 128 + signal.SIGINT and time.time() - t0 < 1.5, p.returncode
    assert "SIGINT again: stopping now without a checkpoint" in open(tmp_path / "twice.err").read()
    assert not os.path.exists(twice / "ckpt") and not os.path.exists(twice / run_guard.LOCK_NAME)

    assert reference.wait(timeout=300) == 0, reference.communicate()
    resumed = train(d, dataset, init_from="resume", **args)
    want = records(tmp_path / "ref")
    assert len(want) == 6 and [(r["iter"], r["loss"], r.get("eval_loss")) for r in resumed] == \
           [(r["iter"], r["loss"], r.get("eval_loss")) for r in want]


@pytest.mark.slow
def test_sigterm_under_torchrun_cp2(tmp_path, dataset):
    """SIGTERM to torchrun during step 2: it forwards it to both ranks, which agree on the step, write one
    checkpoint together and stop. The resumed run's losses equal the uninterrupted run pinned in
    tests/golden (cp2_skrull_plus: the same settings)."""
    from golden.make_golden import TEST_RUNS
    args = {k: v for k, v in TEST_RUNS["cp2_skrull_plus"].items() if k not in ("dump_grads", "nproc")}
    d = tmp_path / "cp2"
    script, gate = gated(tmp_path, 2)
    rc, err = sigterm_in_step(command(d, dataset, nproc=2, script=script, **args), gate, d, tmp_path / "cp2.err", 2,
                              lambda p: p.pid)  # p is torchrun
    check_preempted(d, rc, err, 2)
    assert_golden("cp2_skrull_plus", train(d, dataset, nproc=2, init_from="resume", **args))


def mount_tmpfs(path, size):
    """Mount a tmpfs of `size` at `path`: whether it worked (it needs root)."""
    os.makedirs(path)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_storage_failures(tmp_path, dataset):
    """Real failing writes, each one `error:` line naming the path and what to do, a non-zero exit, and
    nothing lost:
    - a 14 MB tmpfs holds one checkpoint of the tiny model (9.4 MB) but not the next one's temp file: the
      checkpoint at iter 2 stays, metrics.jsonl is whole, and resumed in a larger directory the run ends;
    - a 2 MB tmpfs: the export fails;
    - a file-size limit (RLIMIT_FSIZE, 4000 bytes: EFBIG) stops a run at the step whose metrics line crosses it, and
      the file keeps whole records only (this one needs no mount)."""
    wrapper = tmp_path / "fsize.py"
    wrapper.write_text("import resource, runpy, sys\n"
                       "resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))\n"
                       f"sys.argv = ['train.py'] + sys.argv[1:]\nsys.path.insert(0, {ROOT!r})\n"
                       f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n")
    limited = tmp_path / "fsize"
    fsize = start(command(limited, dataset, script=str(wrapper), max_iters=30))
    small, tiny, big = tmp_path / "small", tmp_path / "tiny", tmp_path / "big"
    mounted = mount_tmpfs(small, "14m") and mount_tmpfs(tiny, "2m")
    try:
        if mounted:
            full = start(command(small / "run", dataset, max_iters=6, checkpoint_interval=2))
            no_export = start(command(tiny / "run", dataset, max_iters=1, export=True))
            err = one_line(full.communicate(timeout=300)[1])
            d = small / "run"
            assert full.returncode != 0
            assert err.startswith(f"error: cannot write {d / 'ckpt'}") and "(ENOSPC)" in err, err
            assert f"resume with --init_from=resume: {d / 'ckpt'} holds iter 2, intact" in err
            assert ckpt_iter(d) == 2 and [rec["iter"] for rec in records(d)] == [1, 2, 3, 4]
            shutil.copytree(d, big)

            err = one_line(no_export.communicate(timeout=300)[1])
            assert no_export.returncode != 0 and f"cannot write {tiny / 'run' / 'hf'}" in err and "(ENOSPC)" in err, err
            assert "train again" in err and records(tiny / "run")[0]["iter"] == 1
    finally:
        for m in (small, tiny):
            subprocess.run(["umount", str(m)], capture_output=True)

    err = one_line(fsize.communicate(timeout=300)[1])
    assert fsize.returncode != 0
    assert err.startswith(f"error: cannot write {limited / 'metrics.jsonl'}: File too large (EFBIG)"), err
    assert err.endswith("start the run again (no checkpoint had been written)")
    iters = [rec["iter"] for rec in records(limited)]
    assert 3 < len(iters) < 30 and iters == list(range(1, len(iters) + 1))
    assert open(limited / "metrics.jsonl").read().endswith("\n")

    if not mounted:
        pytest.skip("cannot mount a tmpfs here (mount needs root): the file-size limit above covered the logic")
    m = train(big, dataset, max_iters=6, checkpoint_interval=2, init_from="resume")
    assert [rec["iter"] for rec in m] == list(range(1, 7)) and ckpt_iter(big) == 6
