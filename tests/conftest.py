"""Shared test set-up: the repo root on sys.path, the small synthetic datasets, the launcher that runs
train.py as a user does (python, or torchrun with gloo on CPU), and a tiny Llama 3 style tokenizer.

Markers (`python -m pytest -q -m "not slow" tests` is the quick subset, for editing one file):
  slow  starts train.py, torchrun or spawned workers, or takes more than a few seconds
  cuda  needs a GPU; skips itself only when CUDA is absent
"""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes (train.py, torchrun, spawn) or runs for seconds")
    config.addinivalue_line("markers", "cuda: needs a GPU (skips itself without CUDA)")


def pytest_collection_modifyitems(config, items):
    import torch
    no_cuda = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False here")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    return _free_port


def make_dataset(path):
    """64 bimodal (ChatQA2-shaped) byte-token samples of at most 512 tokens: the training tests' data."""
    from data.synthetic import make_synthetic
    return make_synthetic(str(path), dist="chatqa2", n=64, max_len=512, seed=0, verbose=False)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "syn")


def command(out_dir, dataset, nproc=1, script="train.py", configs=(), **overrides):
    """train.py's command line on the tiny CPU config (then `configs`, more config files), one process or
    torchrun with `nproc` gloo ranks."""
    args = dict(out_dir=str(out_dir), dataset=dataset, batch_size=4, bucket_size=512, max_iters=4, warmup_iters=2,
                lr_decay_iters=8, checkpoint_interval=0, threads=1, device="cpu", dtype="float32",
                eval_fraction=0.0, export=False)
    args.update(overrides)
    argv = ["config/long_sft_cpu.py", *map(str, configs)] + [f"--{k}={v}" for k, v in args.items() if v is not None]
    if nproc == 1:
        return [sys.executable, script] + argv
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", script] + argv


def env():
    """Every train.py process runs one thread, so side-by-side runs share the cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env())


def train(out_dir, dataset, nproc=1, configs=(), **overrides):
    """Run train.py and return its metrics.jsonl records."""
    return train_all((out_dir, dataset, dict(nproc=nproc, configs=configs, **overrides)))[0]


def train_all(*jobs):
    """Several train.py runs at once, as many as the cores take (a torchrun job counts its ranks): each job is
    (out_dir, dataset, overrides). Returns their metrics.jsonl records, in order. Independent runs of a test
    side by side: on 2 cores two one-process runs take about the time of one."""
    room = (os.cpu_count() or 1) + 1  # processes running at once: one more than the cores
    pending, running, done = list(enumerate(jobs)), [], {}
    while pending or running:
        nproc = pending[0][1][2].get("nproc", 1) if pending else 0
        if pending and (not running or sum(n for _, n, _, _ in running) + nproc <= room):
            i, (out_dir, data, overrides) = pending.pop(0)
            cmd = command(out_dir, data, **overrides)
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
            running.append((i, nproc, cmd, proc))
            continue
        i, _, cmd, proc = running.pop(0)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-3000:]}"
        done[i] = [json.loads(line) for line in open(os.path.join(jobs[i][0], "metrics.jsonl"))]
    return [done[i] for i in range(len(jobs))]


def assert_golden(name, records):
    """The losses and eval losses of `records` equal those pinned in tests/golden/losses.json for `name`."""
    import torch
    from golden.make_golden import golden_losses, losses_of
    want, got = golden_losses(name), losses_of(records)
    assert [e is None for e in got["eval_loss"]] == [e is None for e in want["eval_loss"]], (got, want)
    for key in ("loss", "eval_loss"):
        pairs = [(g, w) for g, w in zip(got[key], want[key]) if w is not None]
        torch.testing.assert_close(torch.tensor([g for g, _ in pairs]), torch.tensor([w for _, w in pairs]),
                                   rtol=1e-5, atol=2e-6, msg=lambda m: f"{name} {key}: {m}")


# Llama 3's special tokens (ids 0..5 in tokenizer_dir) and its pre-tokenizer split (its tokenizer.json)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|finetune_right_pad_id|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer_dir(path, specials, config=None, vocab_size=300):
    """A checkpoint directory with a tiny BPE tokenizer.json, pre-tokenized as Llama 3's is, with `specials`
    first (ids 0, 1, ...): built here, no download. -> (its path, the tokenizers.Tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["hello world, be brief", "2+2? 4 hi there", "Add. the user said\n\n"] * 10,
                          trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir()
    t.save(str(path / "tokenizer.json"))
    if config:
        (path / "config.json").write_text(json.dumps(config))
    return str(path), t
