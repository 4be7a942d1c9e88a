"""What the benchmarks share: the train.py launcher, the exit of a spawned gloo worker, a spawn of
gloo workers that returns rank 0's JSON, the machine's load average, and median with range."""
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_run(out_dir, nproc, overrides, config="config/long_sft_cpu.py", extra_configs=()):
    """One `torchrun train.py <config> <extra_configs>` run with --key=value overrides; returns its
    metrics.jsonl records. A failed run leaves its whole log in out_dir/failed.log and stops the benchmark."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [config, *extra_configs] + [f"--{k}={v}" for k, v in overrides.items()] + [f"--out_dir={out_dir}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", "train.py"] + argv
    r = _run_torchrun(cmd)
    if r.returncode != 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "failed.log"), "w") as f:
            f.write(r.stdout + "\n" + r.stderr)
        raise SystemExit(f"{' '.join(cmd)} failed (full log: {out_dir}/failed.log):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run_torchrun(cmd):
    """subprocess.run, except that a run interrupted in the caller (an exception, SIGTERM turned into
    SystemExit) is stopped with SIGTERM first, on which torchrun stops its workers; subprocess.run's SIGKILL
    would leave them running (each in its own session), holding the GPU."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def leave_gloo_worker():
    """End a spawned gloo worker after its results are written, skipping the interpreter's finalisation:
    there a gloo thread still running sometimes aborts the process ("terminate called without an active
    exception", SIGABRT), which mp.spawn reports as a failure of the whole benchmark. train.py leaves the
    same way. Only for processes started by mp.spawn: it ends the process."""
    import torch.distributed as dist
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(worker, world, *args):
    """mp.spawn(worker, args=(world, init_file, out_file, *args)) on `world` processes; returns the JSON
    that rank 0 wrote to out_file. init_file is for init_process_group's file:// rendezvous."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        out_file = os.path.join(d, "out.json")
        mp.spawn(worker, args=(world, os.path.join(d, "init"), out_file, *args), nprocs=world, join=True)
        with open(out_file) as f:
            return json.load(f)


def load_average():
    """The machine's 1-minute load average: printed beside timings, since other work on a shared
    machine slows them."""
    return os.getloadavg()[0]


def median_range(xs):
    """-> (median, min, max) of the values."""
    xs = list(xs)
    return statistics.median(xs), min(xs), max(xs)
