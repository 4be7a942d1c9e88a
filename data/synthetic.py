"""
A synthetic SFT dataset whose lengths follow the paper's Table 1 (Skrull, arXiv 2505.19609), scaled
to a maximum length you choose, on a task a small model can actually learn.

    python data/synthetic.py --dist lmsys --n 2000 --max_len 4096 [--seed 0] [--out_dir DIR]

or from Python: make_synthetic("data/synthetic_x", dist="chatqa2", n=2000, max_len=4096) -> the dir.

Lengths (sample_lengths): pick a bin by the Table 1 CDF, then a length log-uniform inside the bin,
capped at the dataset's longest sample. The first bin, "< 1K", starts at SHORTEST = 64 tokens (the
paper gives no lower bound; this is our assumption). K = 1024. With max_len, every length is
multiplied by max_len / ref, ref = min(longest, 128K), so the CDF keeps its shape with the thresholds
scaled by the same factor; then lengths are clamped to [min_len, max_len], min_len = MIN_LEN = 32
by default (the shortest sample the generator can render). ref is the longest sample, as the design
says, except for LMsysChat1M: its longest (1643K) is a 0.01% outlier beyond the 128K threshold, and
scaling by it would squash 99.9% of samples into the clamp (at max_len 4096, 1K -> 2.5 tokens); we
cap that 0.01% at 128K instead, i.e. at max_len after scaling. Even so, shrinking 128K to a small
max_len shrinks 1K by the same factor, so at small max_len many short samples land on MIN_LEN. Share
of samples clamped to MIN_LEN (measured): Wikipedia 74% / 29% / 8% at max_len 4K / 16K / 32K,
LMsysChat1M 88% / 45% / 23%, ChatQA2 (mostly long) 20% / 9% / 4%.

Samples (byte tokenizer, so one character = one token and every length is hit exactly):
  - long (>= LONG_MIN tokens): key-value retrieval over a long context: "Records:" then many
    "k3x9: 48213" lines (distinct random keys, random digit values), then "What is the value of k3x9?";
    the assistant answers the value. A small model first learns the answer format (5 digits, then
    <|im_end|>), then to copy the value from the context (an induction-head task).
  - short: "reverse abc" -> "cba" or "upper abc" -> "ABC", the string sized to hit the length.
solve(prompt) recomputes the answer from the prompt alone (how sample.py --eval_synthetic scores a model).
The JSONL is written to a temp file and goes through data/prepare.py like any user dataset. Everything
is drawn from np.random.default_rng(seed), lengths first: sample_lengths(dist, n,
np.random.default_rng(seed), max_len) gives exactly the dataset's lengths.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

if __package__ in (None, ""):  # run as a script (python data/synthetic.py): make `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.prepare import _temp_prefix, load_dataset, prepare, remove_stale_temps  # noqa: E402

K = 1024
THRESHOLDS = (1 * K, 4 * K, 8 * K, 32 * K, 128 * K)
# Paper Table 1: share of sequences shorter than each threshold, and the longest sample.
TABLE1 = {
    "wikipedia": dict(name="Wikipedia (zh, filtered)", cdf=(0.8788, 0.9934, 0.9992, 0.9999, 1.0),
                      longest=78 * K, shape="long-tail"),
    "lmsys": dict(name="LMsysChat1M", cdf=(0.8712, 0.9935, 0.9987, 0.9998, 0.9999),
                  longest=1643 * K, shape="long-tail"),
    "chatqa2": dict(name="ChatQA2-Long-SFT", cdf=(0.2192, 0.3148, 0.4043, 0.9986, 1.0),
                    longest=99 * K, shape="bimodal"),
}
SHORTEST = 64   # lower edge of the "< 1K" bin, unscaled (assumption, see above)
MIN_LEN = 32    # shortest sample the generator renders (byte tokens)
LONG_MIN = 256  # from this length on, samples are key-value retrieval
GENERATOR_VERSION = 1  # bump when the samples change, so cached directories are regenerated


def _table(dist):
    if dist not in TABLE1:
        raise ValueError(f"unknown distribution {dist!r}; expected one of {', '.join(TABLE1)}")
    return TABLE1[dist]


def scale_ref(dist):
    """The length that max_len stands for: the longest sample, capped at the last threshold (128K)."""
    return min(_table(dist)["longest"], THRESHOLDS[-1])


def sample_lengths(dist, n, rng, max_len=None, min_len=MIN_LEN):
    """n lengths (np.int64) following TABLE1[dist]; see the module docstring for the scaling."""
    t = _table(dist)
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    # bins [SHORTEST, 1K), [1K, 4K), ..., [128K, longest), upper edges capped at the longest
    edges = np.minimum(np.array((SHORTEST,) + THRESHOLDS + (t["longest"],), dtype=np.float64), t["longest"])
    cdf = np.array((0.0,) + t["cdf"] + (1.0,))
    p = np.diff(cdf)
    p = p / p.sum()
    b = rng.choice(len(p), size=n, p=p)
    lo, hi = edges[b], np.maximum(edges[b + 1], edges[b] + 1)
    lengths = np.floor(np.exp(np.log(lo) + rng.random(n) * (np.log(hi) - np.log(lo))))
    if max_len is None:
        return lengths.astype(np.int64)
    if max_len < min_len:
        raise ValueError(f"max_len={max_len} < min_len={min_len}")
    ref = scale_ref(dist)
    lengths = np.floor(np.minimum(lengths, ref) * (max_len / ref))
    return np.clip(lengths, min_len, max_len).astype(np.int64)

# -----------------------------------------------------------------------------
# samples of an exact length (byte tokenizer)

# "<|im_start|>user\n" q "<|im_end|>\n<|im_start|>assistant\n" a "<|im_end|>\n" in byte tokens
_CHATML_OVERHEAD = 1 + len("user\n") + 1 + 1 + 1 + len("assistant\n") + 1 + 1  # 21
_B36 = np.frombuffer(b"0123456789abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
_HEAD, _ASK = "Records:\n", "What is the value of {}?"


def _short_sample(L, rng):
    task = ("reverse", "upper")[rng.integers(2)]
    prefix = task + " "
    if (L - _CHATML_OVERHEAD - len(prefix)) % 2:
        prefix = task + ": "  # one more character fixes the parity: q = prefix + s, a = f(s)
    k = (L - _CHATML_OVERHEAD - len(prefix)) // 2
    s = (_B36[10:][rng.integers(26, size=k)]).tobytes().decode()
    return prefix + s, (s[::-1] if task == "reverse" else s.upper())


def _long_sample(L, rng):
    fixed = _CHATML_OVERHEAD + len(_HEAD) + len(_ASK.format("xxxx")) + 5  # + the 5-digit answer
    m, r = divmod(L - fixed, 12)  # m lines "kkkk: ddddd\n" (12 chars); r of them get a 6th digit
    assert m > r, (L, m, r)
    if m > len(_B36) ** 4:
        raise ValueError(f"length {L} needs more than 36^4 distinct keys")
    keys = rng.choice(len(_B36) ** 4, size=m, replace=False)
    rows = np.empty((m, 13), dtype=np.uint8)  # key(4) ': '(2) digits(6) '\n'(1)
    for j in range(4):
        rows[:, 3 - j] = _B36[keys % 36]
        keys //= 36
    rows[:, 4:6] = np.frombuffer(b": ", dtype=np.uint8)
    rows[:, 6:12] = rng.integers(ord("0"), ord("9") + 1, size=(m, 6))
    rows[:, 12] = ord("\n")
    q = rng.integers(m)
    wide = np.zeros(m, dtype=bool)
    wide[rng.choice(np.delete(np.arange(m), q), size=r, replace=False)] = True  # never the asked line
    keep = np.ones((m, 13), dtype=bool)
    keep[~wide, 11] = False
    context = rows[keep].tobytes().decode()
    key, value = rows[q, :4].tobytes().decode(), rows[q, 6:11].tobytes().decode()
    return _HEAD + context + _ASK.format(key), value


def make_sample(L, rng):
    """One {"messages": [...]} sample whose byte-tokenized ChatML rendering has exactly L tokens."""
    if L < MIN_LEN:
        raise ValueError(f"length {L} < MIN_LEN={MIN_LEN}")
    q, a = (_long_sample if L >= LONG_MIN else _short_sample)(L, rng)
    assert _CHATML_OVERHEAD + len(q) + len(a) == L, (L, len(q), len(a))
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

# -----------------------------------------------------------------------------
# the answer a prompt asks for, computed from the prompt alone (sample.py --eval_synthetic scores with it)

TASKS = ("reverse", "upper", "key-value")


def solve(prompt):
    """A synthetic user prompt -> (task, the exact answer). Raises ValueError for any other prompt."""
    for task in ("reverse", "upper"):
        for prefix in (task + " ", task + ": "):
            if prompt.startswith(prefix) and prompt[len(prefix):].isalpha():
                s = prompt[len(prefix):]
                return task, (s[::-1] if task == "reverse" else s.upper())
    ask = _ASK.split("{}")
    if prompt.startswith(_HEAD) and prompt.endswith(ask[1]):
        lines = prompt[len(_HEAD):].split("\n")
        key = lines[-1][len(ask[0]):-len(ask[1])]
        values = [l[len(key) + 2:] for l in lines[:-1] if l.startswith(key + ": ")]
        if len(values) == 1:
            return "key-value", values[0]
    raise ValueError(f"not a synthetic prompt: {prompt[:60]!r}")


def default_dir(dist="wikipedia", n=2000, max_len=4096, seed=0):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"synthetic_{dist}_n{n}_L{max_len}_s{seed}")


def _cached(out_dir, params):
    try:
        return load_dataset(out_dir).meta.get("synthetic") == params
    except Exception:
        return False


def make_synthetic(out_dir=None, dist="wikipedia", n=2000, max_len=4096, seed=0, overwrite=False, verbose=True):
    """Generate (or reuse, if out_dir already holds the same parameters) the dataset; returns its dir.
    Safe to call from several processes at once: the first to finish publishes, the others reuse it."""
    out_dir = os.path.abspath(out_dir or default_dir(dist, n, max_len, seed))
    params = dict(dist=dist, n=n, max_len=max_len, seed=seed, generator=GENERATOR_VERSION)
    if os.path.exists(out_dir) and not overwrite:
        if _cached(out_dir, params):
            if verbose:
                print(f"{out_dir}: reusing synthetic data ({dist}, n={n}, max_len={max_len}, seed={seed})")
            return out_dir
        raise FileExistsError(f"{out_dir} exists and is not synthetic data with {params}; "
                              "remove it or pass overwrite=True (--overwrite)")
    rng = np.random.default_rng(seed)
    lengths = sample_lengths(dist, n, rng, max_len)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    remove_stale_temps(out_dir)
    fd, jsonl = tempfile.mkstemp(prefix=_temp_prefix(out_dir, "jsonl"), dir=os.path.dirname(out_dir))
    try:
        with os.fdopen(fd, "w") as f:
            for L in lengths:
                f.write(json.dumps(make_sample(int(L), rng)) + "\n")
        # one process: train.py's ranks call this, and writing the JSONL above costs more than tokenizing bytes
        prepare(jsonl, out_dir, tokenizer="byte", max_len=max_len, overlong="error", overwrite=overwrite,
                extra_meta={"synthetic": params, "source": f"data/synthetic.py {params}"}, verbose=verbose, workers=1)
    except FileExistsError:
        if not _cached(out_dir, params):  # lost a race to another process making the same data: fine
            raise
    finally:
        os.remove(jsonl)
    got = load_dataset(out_dir).lengths
    if not np.array_equal(got, lengths):
        raise RuntimeError(f"{out_dir}: sample lengths differ from the sampled ones (generator bug)")
    return out_dir


def describe(lengths, dist, max_len=None):
    """Lines comparing the empirical CDF of `lengths` with TABLE1[dist] at the (scaled) thresholds."""
    t = _table(dist)
    scale = 1.0 if max_len is None else max_len / scale_ref(dist)
    lines = [f"{t['name']} ({t['shape']}): n={len(lengths)}, mean {np.mean(lengths):.0f}, max {np.max(lengths)}"]
    for thr, c in zip(THRESHOLDS, t["cdf"]):
        x = thr * scale
        lines.append(f"  < {x:9.1f} tokens ({thr // K}K unscaled): {np.mean(lengths < x):7.2%}  (paper {c:.2%})")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="synthetic SFT data with the paper's Table 1 lengths")
    p.add_argument("--dist", choices=tuple(TABLE1), default="wikipedia")
    p.add_argument("--n", type=int, default=2000, help="number of samples")
    p.add_argument("--max_len", type=int, default=4096, help="longest sample (tokens); lengths scale with it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=None, help="default: data/synthetic_{dist}_n{n}_L{max_len}_s{seed}")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    try:
        d = make_synthetic(args.out_dir, args.dist, args.n, args.max_len, args.seed, args.overwrite)
    except (ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(describe(load_dataset(d).lengths, args.dist, args.max_len))
