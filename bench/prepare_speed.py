"""data/prepare.py's throughput and peak memory on a large JSONL, at 1 process and at every core.

    python -m bench.prepare_speed [--gib 1.0] [--reps 2] [--tokenizer cl100k_base] [--dir /tmp/prepare_speed] [--keep]

First writes a deterministic JSONL of --gib GiB (seed 0) to --dir: long-context SFT samples of 1K-64K
characters (log-uniform), in turn in the four input formats prepare.py reads (messages, ShareGPT, Alpaca,
prompt/response), each a window into about 8 MB of text drawn from a fixed Zipf-weighted vocabulary of
common English words and made-up words. Then runs `data/prepare.py --workers=W` under /usr/bin/time -v, W = 1 and every core, alternating
(1, all, then all, 1, ...) for --reps rounds, deleting each output right after its run. Prints, per run:
wall seconds, tokens/s, CPU seconds (user + system, workers included), peak RSS (prepare.py's own figure: its process plus the sum of its workers' peaks,
an upper bound since pages shared after fork count once per process; and /usr/bin/time's maximum RSS, the
largest single process) and the 1-minute load average before and after. The JSONL is deleted at the end
unless --keep.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from bench.common import ROOT

COMMON = ("the of and to a in is it you that he was for on are with as his they be at one have this from or had "
          "by not word but what some we can out other were all there when up use your how said an each she which "
          "do their time if will way about many then them write would like so these her long make thing see him "
          "two has look more day could go come did number sound no most people my over know water than call first "
          "who may down side been now find any new work part take get place made live where after back little only "
          "round man year came show every good me give our under name very through just form sentence great think "
          "say help low line differ turn cause much mean before move right boy old too same tell does set three "
          "want air well also play small end put home read hand port large spell add even land here must big high "
          "such follow act why ask men change went light kind off need house picture try us again animal point "
          "mother world near build self earth father model train sequence attention memory token batch gradient").split()
SYLLABLES = "ka ter in on re st ing al mo vi ra ne lo de ur pe ti sa co ma ri ve ba lu ex pro con dis ly ment tion".split()


def vocabulary(rng, n_made_up=20000):
    """Common words, then made-up ones, with Zipf weights (rank r gets weight 1/r)."""
    made_up = {"".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(n_made_up)}
    words = COMMON + sorted(made_up - set(COMMON))
    weights = 1.0 / np.arange(1, len(words) + 1)
    return np.array(words), weights / weights.sum()


def paragraphs(rng, n=4096):
    words, p = vocabulary(rng)
    out = []
    for _ in range(n):
        w = rng.choice(words, size=rng.integers(30, 300), p=p)
        sentences = np.array_split(w, max(1, len(w) // 15))
        text = " ".join(" ".join(s).capitalize() + rng.choice([".", ".", ".", "?", "!", ","]) for s in sentences if len(s))
        if rng.random() < 0.2:
            text += f" {int(rng.integers(0, 100000))} ({rng.integers(1, 99)}%)"
        out.append(text)
    return out


def sample(i, rng, corpus):
    """One sample of about 1K-64K characters cut from the corpus, three quarters prompt, in format i % 4."""
    n_chars = int(np.exp(rng.uniform(np.log(1024), np.log(65536))))
    start = int(rng.integers(len(corpus) - n_chars))
    start = corpus.find(" ", start) + 1
    cut = corpus.find(" ", start + n_chars * 3 // 4)
    user, answer = corpus[start:cut], corpus[cut + 1:corpus.find(" ", start + n_chars)]
    kind = i % 4
    if kind == 0:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    if kind == 1:
        return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}
    if kind == 2:
        return {"instruction": "Continue the text.", "input": user, "output": answer}
    return {"prompt": user, "response": answer}


def write_jsonl(path, n_bytes, seed=0):
    rng = np.random.default_rng(seed)
    corpus = "\n".join(paragraphs(rng)) * 2  # about 8 MB of text, samples are windows into it
    written, i = 0, 0
    with open(path, "w") as f:
        while written < n_bytes:
            line = json.dumps(sample(i, rng, corpus)) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    return i


def run(src, out_dir, workers, tokenizer):
    cmd = ["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "data", "prepare.py"), "--input", src,
           "--out_dir", out_dir, "--tokenizer", tokenizer, f"--workers={workers}"]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr[-3000:]}")
    tokens = int(re.search(r"samples, ([\d,]+) tokens", r.stdout).group(1).replace(",", ""))
    here, in_workers = re.search(r"peak RSS (\d+) MiB(?: \+ (\d+) MiB in)?", r.stdout).groups()
    max_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", r.stderr).group(1)) for kind in ("User", "System"))
    shutil.rmtree(out_dir)
    return dict(workers=workers, wall=wall, tokens=tokens, rss_sum=float(here) + float(in_workers or 0), rss_max=max_rss,
                cpu=cpu, load=(load0, load1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--gib", type=float, default=1.0, help="size of the generated JSONL in GiB")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--tokenizer", default="cl100k_base")
    p.add_argument("--dir", default="/tmp/prepare_speed", help="where the JSONL and the outputs go")
    p.add_argument("--keep", action="store_true", help="keep the JSONL (it is reused if already there)")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, f"sft_{args.gib:g}gib.jsonl")
    n_bytes = int(args.gib * (1 << 30))
    if not (os.path.isfile(src) and os.path.getsize(src) >= n_bytes):
        t0 = time.perf_counter()
        n = write_jsonl(src, n_bytes)
        print(f"wrote {src}: {n:,} samples, {os.path.getsize(src) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    size = os.path.getsize(src)
    print(f"data/prepare.py on {size / 1e9:.2f} GB ({size:,} bytes), tokenizer {args.tokenizer}, {cores} cores; "
          f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"{'rep':>3} {'workers':>7} {'wall s':>7} {'tokens/s':>10} {'MB/s':>6} {'RSS sum MiB':>11} "
          f"{'max RSS MiB':>11} {'CPU s':>6} {'load before/after':>17}")
    results = []
    t_start = time.perf_counter()
    try:
        for rep in range(args.reps):
            for w in ((1, cores) if rep % 2 == 0 else (cores, 1)):
                r = run(src, os.path.join(args.dir, "out"), w, args.tokenizer)
                results.append(r)
                print(f"{rep:>3} {w:>7} {r['wall']:>7.1f} {r['tokens'] / r['wall']:>10,.0f} {size / r['wall'] / 1e6:>6.1f} "
                      f"{r['rss_sum']:>11.0f} {r['rss_max']:>11.0f} {r['cpu']:>6.0f} {r['load'][0]:>8.2f}/{r['load'][1]:.2f}", flush=True)
    finally:
        if not args.keep:
            os.remove(src)
        shutil.rmtree(os.path.join(args.dir, "out"), ignore_errors=True)
    print(f"{len(results)} runs in {time.perf_counter() - t_start:.0f} s; "
          f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for w in sorted({r["workers"] for r in results}):
        walls = [r["wall"] for r in results if r["workers"] == w]
        rate = [results[0]["tokens"] / t for t in walls]
        print(f"workers={w}: {results[0]['tokens']:,} tokens, tokens/s median {np.median(rate):,.0f} "
              f"(min {min(rate):,.0f}, max {max(rate):,.0f}) over {len(walls)} runs")
    one = [r["wall"] for r in results if r["workers"] == 1]
    many = [r["wall"] for r in results if r["workers"] == cores]
    if cores > 1 and one and many:
        print(f"speed-up {cores} workers / 1: median {np.median(one) / np.median(many):.2f} "
              f"(per round: {', '.join(f'{a / b:.2f}' for a, b in zip(one, many))})")


if __name__ == "__main__":
    main()
