"""
Generate from a trained model, with the tokenizer and chat format its data was prepared with.

    python sample.py --out_dir=out-cpu "reverse hello"             # a train.py out_dir (its newest ckpt/step-N/)
    python sample.py --hf_dir=/path/to/Qwen2.5-0.5B --prompt_file=q.txt --temperature=0.7 --top_k=50
    python sample.py --out_dir=out-cpu --eval_synthetic=100        # exact-match accuracy per synthetic task

The prompt becomes one user turn, rendered exactly as data/prepare.py renders training data
(a system turn first when the data was prepared with --default_system, or when --system is given),
then the assistant's header, in the data's chat format: ChatML (Qwen)
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
or Llama 3
    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
and generation stops at the format's end of turn (<|im_end|> or <|eot_id|>) or after --max_new_tokens.
Tokenizer and chat format: for --out_dir the prepared dataset's (its meta.json names both); for --hf_dir
the directory's tokenizer.json and the format its special tokens imply, or --tokenizer (byte |
cl100k_base) for a directory exported from a run on such data. --chat_format overrides the format.
Decoding keeps a KV cache (model.KVCache), so each new token costs one token's forward pass.
--temperature=0 is greedy.

--eval_synthetic=N answers up to N held-out samples of each task of data/synthetic.py (reverse, upper,
key-value retrieval): the run's own held-out split (eval_fraction, seed), so none was trained on. Greedy
decoding; a sample counts as correct when the generated answer equals data.synthetic.solve(prompt) exactly.
"""
import argparse
import os
import sys

import torch

from model import KVCache, Transformer


@torch.no_grad()
def generate(model, ids, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, generator=None):
    """Prompt token ids -> list of new token ids (ending with eos_id if it was produced)."""
    device = model.embed_tokens.weight.device
    cache = KVCache(model.config.n_layer, len(ids) + max_new_tokens)
    x = torch.tensor([ids], device=device)
    pos = torch.arange(len(ids), device=device)
    out = []
    for _ in range(max_new_tokens):
        logits, _ = model(x, position_ids=pos, attn_fn=cache)  # (1, n, V): prompt first, then one token
        logits = logits[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        out.append(nxt)
        if nxt == eos_id:
            break
        x = torch.tensor([[nxt]], device=device)
        pos = torch.tensor([cache.length], device=device)
    return out


def chat_prompt(tok, prompt, system=None, chat_format=None):
    """The token ids data/prepare.py would give this user turn in `chat_format` (default: the tokenizer's),
    followed by the assistant header."""
    from data.prepare import generation_prompt
    return generation_prompt(tok, ([("system", system)] if system else []) + [("user", prompt)], chat_format)


def load(args):
    """-> (model, tokenizer, dataset dir or None, train config or None, dataset meta or {})."""
    from data.prepare import get_tokenizer
    if args.out_dir:
        from checkpoint import dataset_meta, load_model
        model, meta = load_model(args.out_dir)
        dataset, ds_meta = meta.get("dataset"), dataset_meta(meta)
        if ds_meta is None:
            raise ValueError(f"{args.out_dir} was trained on {dataset}, which is gone (its meta.json names the tokenizer)")
        tok = get_tokenizer(args.tokenizer or ds_meta["tokenizer"])
        config = meta["config"]
    else:
        model = Transformer.from_pretrained(args.hf_dir)
        if not args.tokenizer and not os.path.isfile(os.path.join(args.hf_dir, "tokenizer.json")):
            raise ValueError(f"{args.hf_dir} has no tokenizer.json: pass --tokenizer=byte or --tokenizer=cl100k_base "
                             "(the tokenizer its training data was prepared with)")
        tok = get_tokenizer(args.tokenizer or args.hf_dir)
        dataset, config, ds_meta = None, None, {}
    # a tokenizer with more ids than the embedding has rows would index past it (or silently mean other tokens)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} tokens, the model's vocabulary only "
                         f"{model.config.vocab_size}: use the tokenizer the model was trained with")
    return model.to(args.device).eval(), tok, dataset, config, ds_meta


def eval_synthetic(model, tok, dataset, config, n):
    """Exact-match accuracy per synthetic task on up to n held-out samples each -> {task: (correct, total)}."""
    from data.prepare import heldout_split, load_dataset
    from data.synthetic import TASKS, solve
    ds = load_dataset(dataset)
    if "synthetic" not in ds.meta:
        raise ValueError(f"{dataset} is not synthetic data (data/synthetic.py): --eval_synthetic has nothing to score")
    if not config.get("eval_fraction"):
        raise ValueError("this run held nothing out (eval_fraction=0): every sample was trainable, so none is a fair test")
    _, eval_ids = heldout_split(len(ds), config["eval_fraction"], config["seed"])
    scores = {t: [0, 0] for t in TASKS}
    for i in eval_ids:
        tokens, mask = ds.get(int(i))
        start = int(mask.argmax())  # the first trained token: the answer; everything before is the prompt
        text = tok.decode(tokens[:start])
        user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        task, answer = solve(user)
        if scores[task][1] >= n:
            continue
        want = tok.encode(answer)
        got = generate(model, tokens[:start].tolist(), len(want) + 1, temperature=0, eos_id=ds.meta["eos_id"])
        scores[task][0] += got == want + [ds.meta["eos_id"]]
        scores[task][1] += 1
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--out_dir", help="a train.py out_dir (reads its newest checkpoint, ckpt/step-N/, and the dataset's tokenizer)")
    src.add_argument("--hf_dir", help="a Hugging Face model directory (config.json + model.safetensors)")
    p.add_argument("prompt", nargs="?", help="the user turn (or use --prompt_file)")
    p.add_argument("--prompt_file", help="read the user turn from this file")
    p.add_argument("--system", default=None, help="system turn (default: the dataset's --default_system, if any)")
    p.add_argument("--tokenizer", default=None, help="override: byte | cl100k_base | a directory with tokenizer.json")
    p.add_argument("--chat_format", default=None, choices=("chatml", "llama3"),
                   help="override the prompt's rendering (default: the dataset's, else the tokenizer's)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval_synthetic", type=int, default=0, metavar="N",
                   help="score up to N held-out synthetic samples per task instead of sampling")
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1 or args.eval_synthetic < 0:
            raise ValueError("need --max_new_tokens >= 1, --temperature >= 0, --top_k >= 0, --num_samples >= 1, --eval_synthetic >= 0")
        if args.eval_synthetic and not args.out_dir:
            raise ValueError("--eval_synthetic needs --out_dir (the run's held-out split)")
        if not args.eval_synthetic:
            if args.prompt_file:
                if args.prompt is not None:
                    raise ValueError("give the prompt on the command line or with --prompt_file, not both")
                with open(args.prompt_file, encoding="utf-8") as f:
                    args.prompt = f.read()
            if not args.prompt or not args.prompt.strip():
                raise ValueError("empty prompt: give it as an argument or with --prompt_file")
        model, tok, dataset, config, ds_meta = load(args)
        from data.prepare import get_chat_format
        fmt = get_chat_format(tok, args.chat_format or ds_meta.get("chat_format"))
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")

    if args.eval_synthetic:
        try:
            scores = eval_synthetic(model, tok, dataset, config, args.eval_synthetic)
        except ValueError as e:
            sys.exit(f"error: {e}")
        print(f"exact match on held-out synthetic samples ({args.out_dir}, greedy):")
        for task, (ok, total) in scores.items():
            print(f"  {task:<10} {ok:4d}/{total:<4d} {100 * ok / max(total, 1):5.1f}%")
        return
    system = args.system if args.system is not None else ds_meta.get("default_system")
    ids = chat_prompt(tok, args.prompt, system, fmt.name)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    for k in range(args.num_samples):
        out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k or None, fmt.eos_id, g)
        text = tok.decode(out[:-1] if out and out[-1] == fmt.eos_id else out)
        print(text if args.num_samples == 1 else f"--- sample {k + 1}\n{text}", flush=True)


if __name__ == "__main__":
    main()
