"""
Hand a trained model to transformers or vLLM: a Hugging Face directory of the model's family (Qwen2,
Qwen3 or Llama: ModelConfig.to_hf writes its config.json, RoPE scaling included), plus the PEFT adapter.

    python export.py --out_dir=out-cpu      # from the newest out_dir/ckpt/step-N/; train.py does the same at the end

writes
    out_dir/hf/        config.json + model.safetensors (LoRA adapters merged into the weights), or, past
                       --max_shard_size, model-00001-of-0000N.safetensors ... + model.safetensors.index.json
                       (Hugging Face's sharded layout), and the tokenizer files when the data was prepared
                       with a checkpoint's tokenizer.json
    out_dir/adapter/   (LoRA runs only) adapter_config.json + adapter_model.safetensors in PEFT's layout,
                       for peft.PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base), dir)

The weights are streamed: each tensor is read (from the sharded checkpoint, or gathered from FSDP2's shards
at the end of training), merged with its LoRA adapter if it has one, and written, before the next is read.
safetensors files cannot be appended to, so write_safetensors writes the header from the shapes first and
then each tensor's bytes in turn: host memory holds one tensor (the largest, the embedding, sets the peak),
never the model. config.json is model.ModelConfig.to_hf(), tensor names model.to_hf_name.
The byte and cl100k_base tokenizers of data/prepare.py have no Hugging Face tokenizer files; export
then writes the model only, and sample.py reads the tokenizer from the prepared dataset instead.
Only the files named above are (over)written (stale model*.safetensors shards of an earlier export are
removed); nothing else in out_dir/hf is touched.
"""
import argparse
import json
import os
import shutil
import sys

import torch

from checkpoint import build_model, dataset_meta, find, lora_of, read_metadata, read_tensors
from model import ModelConfig, to_hf_name

# what a Qwen or Llama checkpoint ships for its tokenizer; copied when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
MAX_SHARD_BYTES = 5 * 10**9  # per safetensors file, as transformers' save_pretrained shards
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32"}


def export_hf(out_dir, model_config, read, lora=None, tokenizer=None, base_model=None, write=True,
              max_shard_bytes=MAX_SHARD_BYTES):
    """Write out_dir/adapter/ (if `lora`) and out_dir/hf/ (adapters merged) from `read`, a function
    {name: (shape, dtype)} -> {name: full CPU tensor} of our parameter names. tokenizer: the prepared
    dataset's tokenizer name; when it is a checkpoint directory its tokenizer files are copied. With
    write=False (every rank but 0 under FSDP2, whose `read` is a collective) it reads in the same order and
    writes nothing. Returns the directories written."""
    model = build_model(model_config, lora, device="meta")  # names, shapes and LoRA modules; no memory
    shapes = {n: (t.shape, t.dtype) for n, t in model.state_dict(keep_vars=True).items()}
    written = []
    adapters = {}
    if lora:  # the adapters are small: read them all, for the PEFT file and for merging
        from lora import save_adapter
        adapters = read({n: s for n, s in shapes.items() if ".lora_" in n})
        model.load_state_dict(adapters, strict=False, assign=True)
        if write:
            base = base_model if base_model not in (None, "scratch", "resume") else None  # a Hugging Face dir
            save_adapter(model, os.path.join(out_dir, "adapter"), base_model=base)
            written.append(os.path.join(out_dir, "adapter"))
    names = [n for n in shapes if ".lora_" not in n and not (n == "lm_head.weight" and model_config.tie_embeddings)]

    def tensors():  # the merged weights, one at a time, in `names` order
        for n in names:
            t = read({n: shapes[n]})[n]
            owner = n.rpartition(".")[0]
            if owner + ".lora_A.weight" in adapters and n.endswith(".weight"):
                t = t + model.get_submodule(owner).delta().to(t.dtype)  # W + (alpha / r) B @ A
            yield t

    hf = os.path.join(out_dir, "hf")
    specs = [(to_hf_name(n), tuple(shapes[n][0]), shapes[n][1]) for n in names]
    if not write:
        for _ in tensors():
            pass
        return written
    os.makedirs(hf, exist_ok=True)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(model_config.to_hf(), f, indent=2)
    weights = tensors()
    try:
        write_safetensors(hf, specs, weights, max_shard_bytes)
    except BaseException:
        for _ in weights:  # keep reading: under FSDP2 each read is a collective the other ranks wait in
            pass
        raise
    if tokenizer and os.path.isdir(tokenizer):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer, name)):
                shutil.copyfile(os.path.join(tokenizer, name), os.path.join(hf, name))
    written.append(hf)
    return written


def write_safetensors(directory, specs, tensors, max_shard_bytes=MAX_SHARD_BYTES):
    """specs [(name, shape, dtype)] and the iterator `tensors` giving them in that order -> model.safetensors,
    or Hugging Face's shards + index past max_shard_bytes. Each file's header (names, dtypes, shapes,
    offsets) is known from the specs, so it is written first and every tensor's bytes follow as it comes."""
    shards, size = [[]], 0
    for spec in specs:  # consecutive tensors, up to max_shard_bytes per file (a larger tensor gets its own)
        nbytes = spec[2].itemsize * int(torch.Size(spec[1]).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name in os.listdir(directory):  # an earlier export's files, which transformers would mix in
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json")) and name not in files:
            os.remove(os.path.join(directory, name))
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(os.path.join(directory, file), "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype in shard:
                t = next(tensors)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        total += offset
    if len(files) > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def live_reader(model):
    """read() for export_hf from a training model: its tensors, FSDP2's gathered one at a time (every rank
    must call it in the same order: each gather is a collective)."""
    state = model.state_dict(keep_vars=True)

    def read(specs):
        with torch.no_grad():
            return {n: (state[n].full_tensor() if hasattr(state[n], "full_tensor") else state[n]).detach().cpu()
                    for n in specs}
    return read


def main(argv=None):
    p = argparse.ArgumentParser(description="export the newest out_dir/ckpt/step-N/ to out_dir/hf (+ out_dir/adapter)")
    p.add_argument("--out_dir", required=True, help="a train.py out_dir holding ckpt/")
    p.add_argument("--max_shard_size", type=float, default=MAX_SHARD_BYTES, help="bytes per safetensors file")
    args = p.parse_args(argv)
    try:
        path = find(args.out_dir)
        meta = read_metadata(path)
        tokenizer = (dataset_meta(meta) or {}).get("tokenizer")
        for out in export_hf(args.out_dir, ModelConfig(**meta["model_config"]), lambda specs: read_tensors(path, specs),
                             lora=lora_of(meta["config"]), tokenizer=tokenizer, base_model=meta["config"].get("init_from"),
                             max_shard_bytes=args.max_shard_size):
            print(f"exported {out}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # a failed write (OSError, or safetensors' SafetensorError): one line, what to do
        from run_guard import storage_error, storage_message
        err = storage_error(e)
        if err is None:
            raise
        sys.exit(storage_message(os.path.join(args.out_dir, "hf"), err, "run this again"))


if __name__ == "__main__":
    main()
