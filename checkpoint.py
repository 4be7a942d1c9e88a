"""
A run's checkpoint: one safetensors file, out_dir/ckpt.safetensors, the same with or without FSDP2, so it
resumes at any world size and loads anywhere without torch.distributed.

    model.<name>            every parameter, full size (frozen weights and LoRA adapters alike)
    optim.<name>.<key>      AdamW's step, exp_avg and exp_avg_sq of each trainable parameter
    metadata                iter, model_config, config (train.py's), resume_identity, dataset (resolved path)

save() writes it atomically, load() reads it back into a model (and optimizer), and load_model() builds
the model from the file alone: train.py resumes with load(); export.py and sample.py use load_model().
"""
import json
import os

import torch

from model import ModelConfig, Transformer

# The config keys a resumed run must keep: they decide the data order (seed, the global batch, the
# dataset) or the model, so changing them would silently train a different run. Everything else may
# change on resume: cp, schedule, bucket_size, profile, threads and device change only who computes what
# (the same losses, tested), and the intervals, max_iters and optimizer settings are the user's to
# change deliberately. "global_batch_size" is dp * batch_size: dp and batch_size may trade places.
RESUME_MUST_MATCH = ("seed", "global_batch_size", "dataset", "synthetic_dist", "synthetic_n", "synthetic_max_len",
                     "model_preset", "eval_fraction", "lora_rank", "lora_alpha", "lora_targets", "rope_theta",
                     "rope_scaling_type", "rope_scaling_factor", "rope_original_max_position")
OPTIM_KEYS = ("step", "exp_avg", "exp_avg_sq")  # AdamW's state per parameter


def resume_identity(config, dp, ds_meta):
    """The RESUME_MUST_MATCH values of a run with train.py's `config` at `dp` DP ranks. A prepared dataset
    is identified by its contents' sizes and tokenizer (`ds_meta`, its meta.json), not its path, so a moved
    directory still resumes; reading all its tokens to hash them would cost minutes on a large set."""
    got = {k: config[k] for k in RESUME_MUST_MATCH if k in config}
    got["global_batch_size"] = dp * config["batch_size"]
    if config["dataset"] is not None:  # None: the synthetic set, named by the synthetic_* keys
        got["dataset"] = {k: ds_meta.get(k) for k in ("n_seqs", "n_tokens", "n_trained_tokens", "tokenizer")}
        for k in ("synthetic_dist", "synthetic_n", "synthetic_max_len"):
            got[k] = None  # unused with a prepared dataset
    return got


def read_metadata(path):
    """The checkpoint's metadata, from its header only (no tensor is read). A damaged file: ValueError."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types: say which file
        raise ValueError(f"{path}: cannot read the checkpoint ({e})") from None


def build_model(model_config, lora=None):
    """A plain Transformer on the CPU, with LoRA adapters when `lora` = {rank, alpha, targets}."""
    model = Transformer(model_config)
    if lora:
        from lora import apply_lora
        apply_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    return model


def full_params(model, fsdp):
    """{name: full CPU tensor} of every parameter. Every rank must call it: under FSDP2 gathering the
    shards is a collective, and only rank 0 receives the tensors (the others get {})."""
    if not fsdp:
        return {n: p.detach().cpu() for n, p in model.named_parameters()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model(model, fsdp, master):
    """The trained model as one plain module, for export: the model itself without FSDP2; under FSDP2 a
    CPU copy gathered from the shards on rank 0 (None elsewhere). Every rank calls it (a collective)."""
    if not fsdp:
        return model
    params = full_params(model, fsdp)
    if not master:
        return None
    plain = build_model(model.config, getattr(model, "lora", None))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(params[n])
    return plain


def save(path, model, optimizer, *, it, config, identity, dataset, fsdp=False, master=True, extra=None):
    """Model + AdamW state after step `it`, written to a temp file, fsynced and renamed into place (the
    directory fsynced too), so a crash leaves the previous checkpoint or the new one, never half of one.
    Non-finite weights or state are never written: ValueError, and the previous file stays.
    Every rank calls it; rank 0 writes. Under FSDP2 the shards are gathered into full CPU tensors on rank
    0, which then holds the full state in host memory while it writes (16 bytes per parameter).
    extra: {key: JSON-able value} kept in the metadata as JSON (train.py: the cost model's online fit)."""
    from safetensors.torch import save_file
    names = [n for n, _ in model.named_parameters()]
    params = full_params(model, fsdp)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=full).get("state", {})  # {} off rank 0
    else:
        state = {n: optimizer.state[p] for n, p in model.named_parameters() if p in optimizer.state}
    if not master:
        return
    tensors = {f"model.{n}": params[n].contiguous() for n in names}
    for n, st in state.items():
        for k, v in st.items():
            tensors[f"optim.{n}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"iter {it}: not writing a checkpoint with non-finite values in {', '.join(bad[:3])}; "
                         f"{path} keeps the last good one")
    meta = {"iter": str(it), "model_config": json.dumps(model.config.__dict__), "config": json.dumps(config),
            "resume_identity": json.dumps(identity), "dataset": os.path.abspath(dataset),
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_grads(path, params, fsdp, master):
    """{name: parameter} -> their gradients, full size, in one safetensors file (dump_grads: the tests
    compare them across schedules). Every rank calls it: gathering FSDP2's gradient shards is a collective."""
    from safetensors.torch import save_file
    full = {n: (p.grad.full_tensor() if fsdp else p.grad).detach().cpu().contiguous() for n, p in params.items()}
    if master:
        save_file(full, path)


def start_metrics(out_dir, start_iter, resume):
    """Rank 0, before the first step. metrics.jsonl numbers steps like the console and the checkpoint
    ("iter" k is the k-th optimizer step, 1-based; a checkpoint at iter k holds the state after step k), so
    a resumed run keeps the records up to its checkpoint's iter and drops what a crashed run wrote after
    it. A fresh run (with overwrite=True: preflight refused anything else) also removes the earlier run's
    checkpoint and gradients; nothing else in out_dir is touched."""
    path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if start_iter > 0 and os.path.exists(path):
        for line in open(path):
            try:
                if json.loads(line)["iter"] <= start_iter:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line torn by a killed run
    elif not resume:
        for f in ("ckpt.safetensors", "grads.safetensors"):
            if os.path.exists(os.path.join(out_dir, f)):
                os.remove(os.path.join(out_dir, f))
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def load(path, model, optimizer=None, fsdp=False):
    """Weights into `model` and, given `optimizer`, AdamW state through its load_state_dict, which puts
    every value where this optimizer needs it (fused AdamW on CUDA keeps `step` on the GPU). Only the
    tensors asked for are read. Under FSDP2 every rank reads the full tensors and keeps its own shards.
    Returns the metadata."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True)
    names = [n for n, _ in model.named_parameters()]
    with safe_open(path, "pt", device="cpu") as f:
        meta, keys = f.metadata() or {}, set(f.keys())
        state = {n: {k: f.get_tensor(f"optim.{n}.{k}") for k in OPTIM_KEYS}
                 for n in names if optimizer is not None and f"optim.{n}.step" in keys}
        if fsdp:
            set_model_state_dict(model, {n: f.get_tensor(f"model.{n}") for n in names}, options=full)
        else:
            with torch.no_grad():  # one tensor at a time: host memory holds the model, not a second copy
                for n, p in model.named_parameters():
                    p.copy_(f.get_tensor(f"model.{n}"))
    if fsdp and state:
        groups = get_optimizer_state_dict(model, optimizer, options=full)["param_groups"]  # names, not ids
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=full)
    elif state:  # its state_dict numbers the parameters in param_groups order
        names_of = {id(p): n for n, p in model.named_parameters()}
        order = [names_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
        sd = optimizer.state_dict()
        sd["state"] = {i: state[n] for i, n in enumerate(order) if n in state}
        optimizer.load_state_dict(sd)
    return meta


def load_model(out_dir):
    """out_dir/ckpt.safetensors -> (the Transformer on the CPU, in eval mode, with its LoRA adapters if
    the run had them; the metadata with "config" parsed). Errors are one-line ValueErrors."""
    path = os.path.join(out_dir, "ckpt.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no checkpoint (train with checkpoint_interval > 0 to write one)")
    meta = read_metadata(path)
    if "model_config" not in meta:
        raise ValueError(f"{path}: not a train.py checkpoint (no model_config in its metadata)")
    config = json.loads(meta["config"])
    lora = {k: config[f"lora_{k}"] for k in ("rank", "alpha", "targets")} if config.get("lora_rank") else None
    model = build_model(ModelConfig(**json.loads(meta["model_config"])), lora)
    load(path, model)
    return model.eval(), {**meta, "config": config}


def dataset_meta(meta):
    """The meta.json of the prepared dataset a checkpoint was trained on (it names the tokenizer), or
    None when that directory is gone."""
    path = os.path.join(meta.get("dataset") or "", "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
