"""
A run's checkpoint: one folder per saved step, written by torch.distributed.checkpoint (DCP) in the format
torchtitan uses, the same with or without FSDP2 and for a single process:

    out_dir/ckpt/step-00000050/
        .metadata            DCP's index: each tensor's full shape and which file holds which slice of it
        __<rank>_0.distcp    what that rank wrote: its own shards, written by every rank in parallel
        meta.json            iter, model_config, config (train.py's), resume_identity, dataset (resolved path)

    model.<name>                               every parameter (frozen weights and LoRA adapters alike)
    optim.state.<name>.{step,exp_avg,exp_avg_sq}  AdamW's state of each trainable parameter
    optim.param_groups.*                       AdamW's settings (kept for other readers; resume uses the config's)

The model and optimizer state go through torch.distributed.checkpoint.state_dict's get_state_dict /
set_state_dict without full_state_dict: each rank saves and loads only its own shards, and DCP reshards on
load, so a run resumes at any world size, dp or cp. No rank ever holds the full state (docs/memory.md).
A save writes step-N.tmp/ and renames it to step-N/ once every rank's files, .metadata and meta.json are
on disk (fsynced); only then are older folders removed. A crash at any moment leaves the last complete
folder, and latest() only ever returns complete ones. With async_save the files are written by a background
thread while training goes on; the next save (or wait(), before the run exits) waits for it.

train.py resumes with load(); export.py and sample.py read tensors with read_tensors() and load_model().
"""
import contextlib
import json
import os
import re
import shutil
import threading
import warnings

import torch
import torch.distributed as dist

from model import ModelConfig, Transformer


# The config keys a resumed run must keep: they decide the data order (seed, the global batch, the
# dataset) or the model, so changing them would silently train a different run. Everything else may
# change on resume: cp, schedule, bucket_size, profile, threads and device change only who computes what
# (the same losses, tested), and the intervals, max_iters and optimizer settings are the user's to
# change deliberately. "global_batch_size" is dp * batch_size: dp and batch_size may trade places.
RESUME_MUST_MATCH = ("seed", "global_batch_size", "dataset", "synthetic_dist", "synthetic_n", "synthetic_max_len",
                     "model_preset", "eval_fraction", "lora_rank", "lora_alpha", "lora_targets", "rope_theta",
                     "rope_scaling_type", "rope_scaling_factor", "rope_original_max_position")
STEP_DIR = re.compile(r"step-(\d+)$")  # a complete checkpoint; step-N.tmp is one being written
OLD_FILE = "ckpt.safetensors"  # the single-file format of earlier versions


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


def latest(out_dir):
    """The newest complete checkpoint folder of a run (out_dir/ckpt/step-N with its meta.json), or None."""
    root = os.path.join(out_dir, "ckpt")
    steps = [(int(m.group(1)), m.group(0)) for m in map(STEP_DIR.match, os.listdir(root) if os.path.isdir(root) else [])
             if m and os.path.isfile(os.path.join(root, m.group(0), "meta.json"))]
    return os.path.join(root, max(steps)[1]) if steps else None


def find(out_dir):
    """latest(out_dir), or a one-line ValueError saying why there is none and what to do."""
    path = latest(out_dir)
    if path is None and os.path.isfile(os.path.join(out_dir, OLD_FILE)):
        raise ValueError(f"{os.path.join(out_dir, OLD_FILE)} is a single-file checkpoint of an older train.py; this version "
                         f"reads sharded checkpoints (out_dir/ckpt/): convert it once with `python checkpoint.py {out_dir}`")
    if path is None:
        raise ValueError(f"{os.path.join(out_dir, 'ckpt')}: no checkpoint (train with checkpoint_interval > 0 to write one)")
    return path


def read_metadata(path):
    """A checkpoint folder's meta.json (no tensor is read). Missing or damaged: ValueError."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the checkpoint's meta.json ({e})") from None


def build_model(model_config, lora=None, device=None):
    """A plain Transformer (on `device`: "meta" allocates nothing), with LoRA adapters when `lora` =
    {rank, alpha, targets}."""
    with torch.device(device or "cpu"):
        model = Transformer(model_config)
        if lora:
            from lora import apply_lora
            apply_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    return model


def lora_of(config):
    """train.py's config -> the {rank, alpha, targets} of build_model, or None."""
    return {k: config[f"lora_{k}"] for k in ("rank", "alpha", "targets")} if config.get("lora_rank") else None


@contextlib.contextmanager
def _quiet():
    """One process without a process group is a normal run here (no_dist=True), not a mistake DCP should
    warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _no_dist():
    return not (dist.is_available() and dist.is_initialized())


def _local(t):  # this rank's part of a parameter or optimizer state: a DTensor's shard, else the tensor
    return t.to_local() if hasattr(t, "to_local") else t


def _nonfinite(state):
    """Names of this rank's floating tensors in a nested state dict that hold a NaN or an infinity."""
    bad = []
    for k, v in state.items():
        if isinstance(v, dict):
            bad += [f"{k}.{n}" for n in _nonfinite(v)]
        elif isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(_local(v)).all()):
            bad.append(k)
    return bad


_pending = None  # the async save in flight, on every rank: (an Event set once it is written and renamed, its errors)
_async_group = None  # a gloo group of its own: the writer thread's collectives never meet training's


def save(out_dir, model, optimizer, *, it, config, identity, dataset, async_save=False, extra=None):
    """Model + AdamW state after step `it` into out_dir/ckpt/step-<it>/; every rank calls it and writes
    its own shards. Non-finite weights or state are never written: ValueError on every rank, and the last
    checkpoint stays. Storage errors propagate (DCP wraps a rank's OSError in a CheckpointException).
    async_save: return once the state is copied, write in the background (see wait()).
    extra: {key: JSON-able value} kept in meta.json (train.py: the cost model's online fit)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    global _pending, _async_group
    wait()  # the previous save first: one in flight at a time
    # AdamW has no state before its first step (max_iters=0): then only the model is saved
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None and optimizer.state else (get_model_state_dict(model), None)
    state = {"model": model_sd, **({"optim": optim_sd} if optim_sd is not None else {})}
    bad = _nonfinite(state)
    if not _no_dist():  # every rank must agree to write (or not) before DCP's collectives
        n_bad = torch.tensor([len(bad)], dtype=torch.int64)
        dist.all_reduce(n_bad, group=_cpu_group())
        n_bad = int(n_bad)
    else:
        n_bad = len(bad)
    if n_bad:
        where = ", ".join(bad[:3]) or "another rank's shards"
        raise ValueError(f"iter {it}: not writing a checkpoint with non-finite values in {where}; "
                         f"{latest(out_dir) or os.path.join(out_dir, 'ckpt')} keeps the last good one")
    root = os.path.join(out_dir, "ckpt")
    final = os.path.join(root, f"step-{it:08d}")
    tmp = final + ".tmp"
    master = _no_dist() or dist.get_rank() == 0
    if master and os.path.exists(tmp):  # left by a killed save of this same step
        shutil.rmtree(tmp)
    if not _no_dist():
        dist.barrier(group=_cpu_group())  # no rank writes into tmp/ before it is clean
    meta = {"iter": it, "model_config": model.config.__dict__, "config": config, "resume_identity": identity,
            "dataset": os.path.abspath(dataset), "optimizer": optim_sd is not None, **(extra or {})}

    def finish():  # rank 0, once every rank's files and .metadata are written: meta.json, rename, prune
        if not master:
            return
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # the same step saved again: move the old one aside, then swap
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        _fsync_dir(root)  # the rename itself durable
        for name in os.listdir(root):  # older steps, a swapped-out copy, a killed save's tmp/
            if name != os.path.basename(final):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    writer = FileSystemWriter(tmp)  # fsyncs every file it writes
    if not async_save:
        import torch.distributed.checkpoint as dcp
        with _quiet():
            dcp.save(state, storage_writer=writer, no_dist=_no_dist())
        finish()
        return
    import torch.distributed.checkpoint as dcp
    if _async_group is None and not _no_dist():
        _async_group = dist.new_group(backend="gloo")
    with _quiet():
        future = dcp.async_save(state, storage_writer=writer, process_group=_async_group, no_dist=_no_dist())
    done, errors = threading.Event(), []

    def on_written(f):  # in the writer thread, as soon as every rank's files are written: rename it into place
        try:
            f.result()
            finish()
        except BaseException as e:  # noqa: B036  raised by wait(), in the training thread
            errors.append(e)
        finally:
            done.set()
    getattr(future, "upload_completion", future).add_done_callback(on_written)
    _pending = (done, errors)


def wait():
    """Block until the async save in flight (if any) is written and renamed into place; its errors
    (storage errors included) are raised here. Every rank calls it before the next save and before the run
    exits. The rename itself does not wait for this call: it happens as soon as the files are written."""
    global _pending
    if _pending is None:
        return
    (done, errors), _pending = _pending, None
    done.wait()
    if errors:
        raise errors[0]


_cpu = None


def _cpu_group():
    """The default group where it takes CPU tensors (gloo); with NCCL, a gloo group for the few scalars here."""
    global _cpu
    if _cpu is None:
        _cpu = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _cpu


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path, model, optimizer=None):
    """A checkpoint folder's weights into `model` and, given `optimizer`, AdamW's state (its settings stay
    this run's: lr, betas and weight decay come from the config). Each rank reads only the slices its own
    shards need, straight into them. Returns the metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)
    meta = read_metadata(path)
    if optimizer is not None and meta.get("optimizer"):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _quiet():
            dcp.load({"model": model_sd, "optim": {"state": optim_sd["state"]}}, checkpoint_id=path, no_dist=_no_dist())
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    else:
        model_sd = get_model_state_dict(model)
        with _quiet():
            dcp.load({"model": model_sd}, checkpoint_id=path, no_dist=_no_dist())
        set_model_state_dict(model, model_sd)
    return meta


def read_tensors(path, specs):
    """{name: (shape, dtype)} -> {name: the full tensor} from a checkpoint folder, in this process alone (no
    process group): only these tensors' bytes are read, so a caller holds a few tensors at a time."""
    import torch.distributed.checkpoint as dcp
    state = {"model": {n: torch.empty(shape, dtype=dtype) for n, (shape, dtype) in specs.items()}}
    with _quiet():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return state["model"]


def load_model(out_dir):
    """The newest checkpoint of out_dir -> (the Transformer on the CPU, in eval mode, with its LoRA adapters if
    the run had them; its metadata). The weights are read straight into the model (no second copy, no
    optimizer state). Errors are one-line ValueErrors."""
    path = find(out_dir)
    meta = read_metadata(path)
    if "model_config" not in meta:
        raise ValueError(f"{path}: not a train.py checkpoint (no model_config in its meta.json)")
    model = build_model(ModelConfig(**meta["model_config"]), lora_of(meta["config"]))
    load(path, model)
    return model.eval(), meta


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
    checkpoints and gradients; nothing else in out_dir is touched."""
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
        for f in (OLD_FILE, "grads.safetensors"):
            if os.path.exists(os.path.join(out_dir, f)):
                os.remove(os.path.join(out_dir, f))
        shutil.rmtree(os.path.join(out_dir, "ckpt"), ignore_errors=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def dataset_meta(meta):
    """The meta.json of the prepared dataset a checkpoint was trained on (it names the tokenizer), or
    None when that directory is gone."""
    path = os.path.join(meta.get("dataset") or "", "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def convert(out_dir):
    """out_dir/ckpt.safetensors (the single-file format of earlier versions) -> out_dir/ckpt/step-N/, the
    same weights and AdamW state. One process; it holds the full state once, as that format did."""
    from safetensors import safe_open
    old = os.path.join(out_dir, OLD_FILE)
    with safe_open(old, "pt") as f:
        meta = {k: json.loads(v) if k in ("model_config", "config", "resume_identity") else v for k, v in f.metadata().items()}
        model = build_model(ModelConfig(**meta["model_config"]), lora_of(meta["config"]))
        params = {n: p for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(f.get_tensor(f"model.{n}"))
        trainable = [n for n, p in params.items() if f"optim.{n}.step" in f.keys()]
        optimizer = torch.optim.AdamW([params[n] for n in trainable])
        for n in trainable:
            optimizer.state[params[n]] = {k: f.get_tensor(f"optim.{n}.{k}") for k in ("step", "exp_avg", "exp_avg_sq")}
    save(out_dir, model, optimizer, it=int(meta["iter"]), config=meta["config"], identity=meta["resume_identity"],
         dataset=meta["dataset"])
    return latest(out_dir)


def main(argv=None):
    """python checkpoint.py OUT_DIR: convert OUT_DIR/ckpt.safetensors (see convert)."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python checkpoint.py OUT_DIR   (converts OUT_DIR/ckpt.safetensors to OUT_DIR/ckpt/step-N/)")
    try:
        print(f"wrote {convert(argv[0])}; {os.path.join(argv[0], OLD_FILE)} can be deleted")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
