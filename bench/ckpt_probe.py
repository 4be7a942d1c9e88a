"""train.py with checkpoint.save and checkpoint.load measured on every rank: the seconds each call blocks
and this process's peak resident host memory (Linux VmHWM) over it, appended to
out_dir/probe.rank<R>.jsonl. save: the peak from the call's start to its return (VmHWM reset first by
writing "5" to /proc/self/clear_refs). load: the peak from the process's start to the load's return, i.e.
everything it took to be back where the checkpoint was (building the model included).

    torchrun --nproc_per_node=4 bench/ckpt_probe.py config/long_sft_cpu.py --out_dir=... [train.py args]
    SKRULL_ROOT=/path/to/another/checkout torchrun ... bench/ckpt_probe.py ...   # measure that code instead

It patches the two module functions train.py calls, so the same probe measures any version of the repo
whose train.py calls checkpoint.save and checkpoint.load (bench.ckpt uses it to compare two versions)."""
import json
import os
import runpy
import sys
import time

ROOT = os.environ.get("SKRULL_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402  the one train.py will import (ROOT's)


def vm_hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def probe(name, reset):
    orig = getattr(checkpoint, name)
    out_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out_dir="))
    path = os.path.join(out_dir, f"probe.rank{os.environ.get('RANK', 0)}.jsonl")

    def measured(*args, **kwargs):
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        t0 = time.time()
        out = orig(*args, **kwargs)
        rec = {"call": name, "seconds": round(time.time() - t0, 3), "peak": vm_hwm(), "rank": int(os.environ.get("RANK", 0))}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return out
    setattr(checkpoint, name, measured)


probe("save", reset=True)
probe("load", reset=False)
os.chdir(ROOT)
sys.argv = [os.path.join(ROOT, "train.py")] + sys.argv[1:]
runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
