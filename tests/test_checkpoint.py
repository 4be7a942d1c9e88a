"""checkpoint.py in one process: save then load gives back the weights and AdamW state exactly (the next step
is bitwise the same), load_model builds the same model from the file alone, non-finite values are never
written, and start_metrics keeps a resumed run's history. Resume through train.py is in test_train.py."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import checkpoint
from model import PRESETS, Transformer

CONFIG = {"lora_rank": 0, "seed": 1}  # what train.py's config holds, as far as these files care


def trained(seed=0):
    """The tiny model and AdamW after two steps on random tokens."""
    torch.manual_seed(seed)
    model = Transformer(PRESETS["tiny"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        step(model, optimizer)
    return model, optimizer


def step(model, optimizer):
    idx = torch.randint(0, 264, (1, 48), generator=torch.Generator().manual_seed(7))
    model(idx, idx)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def save(path, model, optimizer, it=2):
    checkpoint.save(str(path), model, optimizer, it=it, config=CONFIG, identity={"seed": 1}, dataset="data/x")


def test_save_load_roundtrip(tmp_path):
    model, optimizer = trained()
    path = tmp_path / "ckpt.safetensors"
    save(path, model, optimizer)
    assert not os.path.exists(str(path) + ".tmp")
    with safe_open(str(path), "pt") as f:
        assert set(f.metadata()) == {"iter", "model_config", "config", "resume_identity", "dataset"}
        assert f.metadata()["iter"] == "2" and json.loads(f.metadata()["config"]) == CONFIG
        names = {n for n, _ in model.named_parameters()}
        assert {k for k in f.keys() if k.startswith("model.")} == {f"model.{n}" for n in names}
        assert {k for k in f.keys() if k.startswith("optim.")} == {f"optim.{n}.{k}" for n in names for k in checkpoint.OPTIM_KEYS}

    torch.manual_seed(1)  # other initial weights: everything must come from the file
    fresh = Transformer(PRESETS["tiny"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert checkpoint.load(str(path), fresh, fresh_opt)["iter"] == "2"
    step(model, optimizer)
    step(fresh, fresh_opt)
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n

    loaded, meta = checkpoint.load_model(str(tmp_path))
    assert not loaded.training and meta["config"] == CONFIG and meta["dataset"] == os.path.abspath("data/x")
    model, _ = trained()  # the weights that were saved: after two steps
    for (n, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), n


def test_nonfinite_checkpoint_is_never_written(tmp_path):
    model, optimizer = trained()
    path = tmp_path / "ckpt.safetensors"
    save(path, model, optimizer)
    before = path.read_bytes()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="iter 3: not writing a checkpoint with non-finite values"):
        save(path, model, optimizer, it=3)
    assert path.read_bytes() == before


def test_start_metrics(tmp_path):
    lines = [json.dumps({"iter": i}) + "\n" for i in (1, 2, 3)] + ['{"iter": 4, "lo']  # a torn last line
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    (tmp_path / "notes.txt").write_text("mine")
    checkpoint.start_metrics(str(tmp_path), 2, resume=True)  # resumed at iter 2: steps 3 and 4 are redone
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])
    (tmp_path / "ckpt.safetensors").write_text("old run")
    checkpoint.start_metrics(str(tmp_path), 0, resume=False)  # overwrite=True: a fresh run
    assert (tmp_path / "metrics.jsonl").read_text() == "" and not (tmp_path / "ckpt.safetensors").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
