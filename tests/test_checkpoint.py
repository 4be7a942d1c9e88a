"""checkpoint.py and export.py in one process (no process group): save then load gives back the weights and
AdamW state exactly (the next step is bitwise the same); a save that fails (an injected storage error), or
a process killed while saving, leaves the previous checkpoint the newest complete one; non-finite values are
never written; async_save writes the state as it was when save() returned; a single-file checkpoint of the
earlier format gets a one-line message and converts; export.py streams tensors into safetensors files that
transformers loads (sharded too), reading one tensor at a time. Resume through train.py, resharding across
world sizes and FSDP2 are in test_train.py."""
import copy
import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from conftest import ROOT
from model import PRESETS, Transformer, to_hf_name

CONFIG = {"lora_rank": 0, "seed": 1}  # what train.py's config holds, as far as these files care


@functools.lru_cache(maxsize=1)
def _trained():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        step(model, optimizer)
    return model, optimizer


def trained():
    """The tiny model and AdamW after two steps on random tokens (a copy of the one computed per session)."""
    return copy.deepcopy(_trained())


def step(model, optimizer):
    idx = torch.randint(0, 264, (1, 48), generator=torch.Generator().manual_seed(7))
    model(idx, idx)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def save(out_dir, model, optimizer, it=2, **kw):
    checkpoint.save(str(out_dir), model, optimizer, it=it, config=CONFIG, identity={"seed": 1}, dataset="data/x", **kw)


def fresh():
    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    model = Transformer(PRESETS["tiny"])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def assert_same_weights(a, b):
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n


def test_save_load_roundtrip(tmp_path):
    model, optimizer = trained()
    save(tmp_path, model, optimizer)
    path = checkpoint.latest(str(tmp_path))
    assert os.listdir(tmp_path / "ckpt") == ["step-00000002"] and path == str(tmp_path / "ckpt" / "step-00000002")
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "meta.json"]
    meta = checkpoint.read_metadata(path)
    assert set(meta) == {"iter", "model_config", "config", "resume_identity", "dataset", "optimizer"}
    assert meta["iter"] == 2 and meta["config"] == CONFIG and meta["dataset"] == os.path.abspath("data/x")

    model2, optimizer2 = fresh()
    assert checkpoint.load(path, model2, optimizer2)["iter"] == 2
    step(model, optimizer)
    step(model2, optimizer2)
    assert_same_weights(model, model2)

    loaded, meta = checkpoint.load_model(str(tmp_path))
    assert not loaded.training and meta["config"] == CONFIG
    assert_same_weights(trained()[0], loaded)  # the weights that were saved: after two steps


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A storage error in the middle of writing (injected into DCP's per-item writer) propagates; the
    half-written step-3.tmp/ is never read; the next save replaces it and removes the older step."""
    from torch.distributed.checkpoint import filesystem
    model, optimizer = trained()
    save(tmp_path, model, optimizer, it=2)
    calls = []
    write_item = filesystem._write_item

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:  # some tensors are written, then the disk fills
            raise OSError(28, "No space left on device")
        return write_item(*args, **kwargs)
    monkeypatch.setattr(filesystem, "_write_item", failing)
    step(model, optimizer)
    with pytest.raises(BaseException) as e:  # DCP wraps the OSError in a CheckpointException
        save(tmp_path, model, optimizer, it=3)
    assert "No space left" in repr(e.value) or "No space left" in str(getattr(e.value, "failures", ""))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-00000002", "step-00000003.tmp"]
    assert checkpoint.latest(str(tmp_path)).endswith("step-00000002")
    model2, optimizer2 = fresh()
    checkpoint.load(checkpoint.latest(str(tmp_path)), model2, optimizer2)
    assert_same_weights(trained()[0], model2)

    monkeypatch.setattr(filesystem, "_write_item", write_item)
    save(tmp_path, model, optimizer, it=3)
    assert os.listdir(tmp_path / "ckpt") == ["step-00000003"]


KILLED_SAVE = """
import sys, time, torch
sys.path.insert(0, {root!r})
import checkpoint
from torch.distributed.checkpoint import filesystem
from model import PRESETS, Transformer
torch.manual_seed(0)
model = Transformer(PRESETS["tiny"])
checkpoint.save({out!r}, model, None, it=1, config={{}}, identity={{}}, dataset="x")
write_item = filesystem._write_item
def slow(*args, **kwargs):  # one tensor at a time, slowly: the parent kills us in the middle
    time.sleep(0.02)
    return write_item(*args, **kwargs)
filesystem._write_item = slow
with torch.no_grad():
    next(model.parameters()).add_(1)
checkpoint.save({out!r}, model, None, it=2, config={{}}, identity={{}}, dataset="x")
"""


@pytest.mark.slow
def test_killed_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL while step-2 is being written: step-1 is still the newest complete checkpoint, and loads."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", KILLED_SAVE.format(root=ROOT, out=str(out))], env={**os.environ, "OMP_NUM_THREADS": "1"})
    tmp = out / "ckpt" / "step-00000002.tmp"
    deadline = time.time() + 120
    while not (tmp / "__0_0.distcp").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a few tensors into the file
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert sorted(os.listdir(out / "ckpt")) == ["step-00000001", "step-00000002.tmp"]
    assert not (tmp / "meta.json").exists()
    model, meta = checkpoint.load_model(str(out))
    torch.manual_seed(0)
    assert meta["iter"] == 1
    assert_same_weights(Transformer(PRESETS["tiny"]), model)


def test_nonfinite_checkpoint_is_never_written(tmp_path):
    model, optimizer = trained()
    save(tmp_path, model, optimizer)
    before = {f: (tmp_path / "ckpt" / "step-00000002" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt" / "step-00000002")}
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="iter 3: not writing a checkpoint with non-finite values in model.embed_tokens.weight"):
        save(tmp_path, model, optimizer, it=3)
    assert os.listdir(tmp_path / "ckpt") == ["step-00000002"]
    assert before == {f: (tmp_path / "ckpt" / "step-00000002" / f).read_bytes() for f in before}


def test_async_save_writes_the_state_at_the_call(tmp_path):
    """async_save returns once the state is staged: changing the weights afterwards does not reach the file.
    The folder is renamed into place as soon as it is written, before wait() is called."""
    model, optimizer = trained()
    save(tmp_path, model, optimizer, async_save=True)
    step(model, optimizer)  # training goes on while it writes
    deadline = time.time() + 60
    while checkpoint.latest(str(tmp_path)) is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.latest(str(tmp_path)) is not None
    checkpoint.wait()
    assert os.listdir(tmp_path / "ckpt") == ["step-00000002"]
    loaded, _ = checkpoint.load_model(str(tmp_path))
    assert_same_weights(trained()[0], loaded)


def test_old_single_file_checkpoint(tmp_path):
    """ckpt.safetensors of the earlier format: one-line message naming the conversion, which keeps the
    weights and AdamW state (the next step is the same as the original model's)."""
    from safetensors.torch import save_file
    model, optimizer = trained()
    names = {p: n for n, p in model.named_parameters()}
    tensors = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        tensors.update({f"optim.{names[p]}.{k}": v.clone() for k, v in st.items()})
    meta = {"iter": "2", "model_config": json.dumps(model.config.__dict__), "config": json.dumps(CONFIG),
            "resume_identity": json.dumps({"seed": 1}), "dataset": os.path.abspath("data/x")}
    save_file(tensors, str(tmp_path / "ckpt.safetensors"), metadata=meta)
    with pytest.raises(ValueError) as e:
        checkpoint.load_model(str(tmp_path))
    assert "single-file checkpoint of an older train.py" in str(e.value) and f"python checkpoint.py {tmp_path}" in str(e.value)
    checkpoint.main([str(tmp_path)])  # what `python checkpoint.py OUT_DIR` runs
    assert os.listdir(tmp_path / "ckpt") == ["step-00000002"]
    model2, optimizer2 = fresh()
    assert checkpoint.load(checkpoint.latest(str(tmp_path)), model2, optimizer2)["resume_identity"] == {"seed": 1}
    step(model, optimizer)
    step(model2, optimizer2)
    assert_same_weights(model, model2)


def test_export_streams_into_sharded_safetensors(tmp_path):
    """export.py reads one tensor of the checkpoint at a time and writes Hugging Face's sharded layout
    past --max_shard_size; transformers loads it and computes our logits; safetensors reads the files."""
    transformers = pytest.importorskip("transformers")
    import export
    model, optimizer = trained()
    save(tmp_path, model, optimizer)
    reads = []
    read_tensors = checkpoint.read_tensors

    def counting(path, specs):
        reads.append(len(specs))
        return read_tensors(path, specs)
    export.read_tensors = counting
    try:
        export.main([f"--out_dir={tmp_path}", "--max_shard_size=200000"])
    finally:
        export.read_tensors = read_tensors
    n_tensors = len(model.state_dict()) - 1  # the tied lm_head is not written
    assert reads == [1] * n_tensors  # one tensor in memory at a time
    hf_dir = tmp_path / "hf"
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")) == shards
    from safetensors.torch import load_file
    got = {k: v for s in shards for k, v in load_file(hf_dir / s).items()}
    assert set(got) == {to_hf_name(n) for n in model.state_dict() if n != "lm_head.weight"}
    for n, p in model.state_dict().items():
        if n != "lm_head.weight":
            assert torch.equal(got[to_hf_name(n)], p), n
    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    idx = torch.randint(0, 264, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, model(idx)[0], atol=2e-5, rtol=1e-4)
    export.main([f"--out_dir={tmp_path}"])  # one file now: the earlier shards and index are gone
    assert sorted(f for f in os.listdir(hf_dir) if f.startswith("model")) == ["model.safetensors"]


def test_start_metrics(tmp_path):
    lines = [json.dumps({"iter": i}) + "\n" for i in (1, 2, 3)] + ['{"iter": 4, "lo']  # a torn last line
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    (tmp_path / "notes.txt").write_text("mine")
    checkpoint.start_metrics(str(tmp_path), 2, resume=True)  # resumed at iter 2: steps 3 and 4 are redone
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])
    (tmp_path / "ckpt.safetensors").write_text("old run")
    (tmp_path / "ckpt" / "step-00000002").mkdir(parents=True)
    checkpoint.start_metrics(str(tmp_path), 0, resume=False)  # overwrite=True: a fresh run
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert not (tmp_path / "ckpt.safetensors").exists() and not (tmp_path / "ckpt").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
