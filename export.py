"""
Hand a trained model to transformers or vLLM: a Hugging Face Qwen2 directory, plus the PEFT adapter.

    python export.py --out_dir=out-cpu      # from out_dir/ckpt.safetensors; train.py does the same at the end

writes
    out_dir/hf/        config.json + model.safetensors (LoRA adapters merged into the weights), and the
                       tokenizer files when the data was prepared with a checkpoint's tokenizer.json
    out_dir/adapter/   (LoRA runs only) adapter_config.json + adapter_model.safetensors in PEFT's layout,
                       for peft.PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base), dir)

The byte and cl100k_base tokenizers of data/prepare.py have no Hugging Face tokenizer files; export
then writes the model only, and sample.py reads the tokenizer from the prepared dataset instead.
Only the files named above are (over)written; nothing else in out_dir/hf is touched.
"""
import argparse
import os
import shutil
import sys

from checkpoint import dataset_meta, load_model

# what a Qwen checkpoint ships for its tokenizer; copied when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def export_hf(model, out_dir, tokenizer=None, base_model=None):
    """Write out_dir/adapter/ (if the model has LoRA adapters) then out_dir/hf/ with the adapters merged
    (in place: the model is plain afterwards). tokenizer: the prepared dataset's tokenizer name; when it is
    a checkpoint directory its tokenizer files are copied. Returns the directories written."""
    written = []
    if getattr(model, "lora", None):
        from lora import merge_lora, save_adapter
        base = base_model if base_model not in (None, "scratch", "resume") else None
        save_adapter(model, os.path.join(out_dir, "adapter"), base_model=base)
        written.append(os.path.join(out_dir, "adapter"))
        merge_lora(model)
    hf = os.path.join(out_dir, "hf")
    model.save_pretrained(hf)
    if tokenizer and os.path.isdir(tokenizer):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer, name)):
                shutil.copyfile(os.path.join(tokenizer, name), os.path.join(hf, name))
    written.append(hf)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description="export out_dir/ckpt.safetensors to out_dir/hf (+ out_dir/adapter)")
    p.add_argument("--out_dir", required=True, help="a train.py out_dir holding ckpt.safetensors")
    args = p.parse_args(argv)
    try:
        model, meta = load_model(args.out_dir)
        tokenizer = (dataset_meta(meta) or {}).get("tokenizer")
        for path in export_hf(model, args.out_dir, tokenizer=tokenizer, base_model=meta["config"].get("init_from")):
            print(f"exported {path}")
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
