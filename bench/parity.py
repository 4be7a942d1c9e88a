"""Our model against transformers' own Qwen2ForCausalLM, Qwen3ForCausalLM and LlamaForCausalLM, for every
RoPE scaling model.py implements, on small random configs (built with transformers' config classes, no
download), at positions before and past the original context length.

    python -m bench.parity                          # the parity table in docs/results.md
    python -m bench.parity --tiny qwen3 DIR         # write a tiny random Qwen3 (YaRN) directory to train from
    python -m bench.parity --tiny llama DIR         # ... a tiny random Llama 3 (llama3 scaling) directory
    python -m bench.parity --export OUT_DIR         # a run's OUT_DIR/hf in transformers vs its checkpoint in ours

Each table case writes a random transformers model with save_pretrained, loads it with
Transformer.from_pretrained and runs both on the same tokens, fp32, CPU: row 0 at positions 0..T-1, row 1
at PAST..PAST+T-1, beyond ORIGINAL (and beyond factor x ORIGINAL). Errors:
    logits abs   max |ours - theirs| over every logit (and over row 1 alone: past the original length)
    logits rel   that, divided by max |theirs|
    grad rel     over every parameter, max |our grad - their grad| / max |their grad| of the loss
tests/test_model_families.py asserts them (the same cases); this prints them.
"""
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model import Transformer  # noqa: E402

ORIGINAL = 256  # original_max_position_embeddings of the scaled configs
PAST = 1000     # row 1 starts here: past ORIGINAL, and its last positions past 4 x ORIGINAL
T = 48          # tokens per row
VOCAB = 300

# name -> the rope_parameters of transformers 5.x (rope_theta added per case). head_dim 32 and ORIGINAL 256
# put YaRN's ramp over dims 0-7 of 16 and llama3's three bands (kept, blended, divided) all in the head.
SCALINGS = {
    "default": {},
    "linear": dict(rope_type="linear", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL),
    "yarn+mscale": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL, mscale=0.707,
                        mscale_all_dim=1.0, beta_fast=16, beta_slow=2, truncate=False),
    "yarn+attention_factor": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL,
                                  attention_factor=1.25),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=ORIGINAL),
}
FAMILIES = ("qwen2", "qwen3", "llama")


def hf_config(family, scaling, tie=False):
    """A small transformers config of `family` with the RoPE scaling SCALINGS[scaling]; head_dim 32."""
    import transformers
    common = dict(vocab_size=VOCAB, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tie, max_position_embeddings=4 * ORIGINAL,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **SCALINGS[scaling]})
    if family == "qwen2":
        return transformers.Qwen2Config(hidden_size=128, **common)
    if family == "qwen3":  # head_dim given and != hidden / heads, as in Qwen3-0.6B (1024 / 16 heads, head_dim 128)
        return transformers.Qwen3Config(hidden_size=64, head_dim=32, **common)
    return transformers.LlamaConfig(hidden_size=128, **common)


def hf_model(family, scaling, path, tie=False, seed=0):
    """A random transformers model saved to `path`; weights far from their init so every term matters."""
    import transformers
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "llama": transformers.LlamaForCausalLM}[family]
    torch.manual_seed(seed)
    config = hf_config(family, scaling, tie)
    config._attn_implementation = "eager"
    hf = cls(config).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # HF inits biases to 0 and norms to 1: randomise so they are tested
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (2, T), generator=g)
    pos = torch.stack([torch.arange(T), PAST + torch.arange(T)])
    labels = idx.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    return idx, pos, labels


def compare(family, scaling, path):
    """(ours, theirs, errors) for one case: the loaded models and a dict of the errors in the docstring."""
    hf = hf_model(family, scaling, path)
    ours = Transformer.from_pretrained(path)
    idx, pos, labels = batch()
    out = hf(input_ids=idx, position_ids=pos, labels=labels)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # HF shifts inside its loss
    logits, loss = ours(idx, shifted, position_ids=pos, return_logits=True)
    out.loss.backward()
    loss.backward()
    diff = (logits - out.logits).abs()
    grad_rel = max(((p.grad - hf.get_parameter(name if name == "lm_head.weight" else "model." + name).grad).abs().max()
                    / hf.get_parameter(name if name == "lm_head.weight" else "model." + name).grad.abs().max()).item()
                   for name, p in ours.named_parameters())
    errors = {"logits_abs": diff.max().item(), "logits_rel": (diff.max() / out.logits.abs().max()).item(),
              "past_abs": diff[1].max().item(), "loss_abs": (loss - out.loss).abs().item(), "grad_rel": grad_rel}
    return ours, hf, errors


def write_tiny_hf(path, family):
    """A tiny random Qwen3 (YaRN x4 over 128 positions, tied embeddings) or Llama 3 (llama3 x8 over 128,
    untied) directory, written by transformers' save_pretrained, for the byte-level synthetic data (vocab 320)."""
    import transformers
    common = dict(vocab_size=320, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512 if family == "qwen3" else 2048,
                  tie_word_embeddings=family == "qwen3")
    if family == "qwen3":
        config = transformers.Qwen3Config(hidden_size=96, head_dim=32, **common, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128))
        cls = transformers.Qwen3ForCausalLM
    elif family == "llama":
        config = transformers.LlamaConfig(hidden_size=128, **common, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=128))
        cls = transformers.LlamaForCausalLM
    else:
        raise SystemExit(f"error: --tiny {family!r}: expected qwen3 or llama")
    torch.manual_seed(0)
    cls(config).save_pretrained(path)
    return path


def check_export(out_dir, n_tokens=600, seed=0):
    """Max |logit difference| between the newest checkpoint of out_dir in our model and out_dir/hf in transformers,
    on n_tokens random tokens (positions 0..n_tokens-1)."""
    import transformers

    from checkpoint import load_model
    ours, _ = load_model(out_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "hf"), attn_implementation="eager",
                                                               dtype=torch.float32)
    idx = torch.randint(0, ours.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = ours(idx)[0], theirs(input_ids=idx).logits
    return type(theirs).__name__, theirs.config.rope_parameters, (a - b).abs().max().item(), b.abs().max().item()


def main():
    import argparse

    import transformers
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", nargs=2, metavar=("FAMILY", "DIR"), help="write a tiny random qwen3 or llama directory")
    ap.add_argument("--export", metavar="OUT_DIR", help="compare a run's export (OUT_DIR/hf) with its checkpoint")
    args = ap.parse_args()
    if args.tiny:
        print(f"wrote {write_tiny_hf(args.tiny[1], args.tiny[0])}")
        return
    if args.export:
        cls, rope, diff, scale = check_export(args.export)
        print(f"{args.export}/hf loads as {cls}, rope_parameters {rope}: max |logit difference| {diff:.1e} "
              f"(max |logit| {scale:.1f}) over 600 positions")
        return
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, fp32 CPU; rows at positions 0..{T - 1} "
          f"and {PAST}..{PAST + T - 1}, original length {ORIGINAL}")
    print("| family | RoPE | logits max abs | logits max rel | max abs past original | loss abs | grad max rel |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            for scaling in SCALINGS:
                _, _, e = compare(family, scaling, os.path.join(tmp, f"{family}-{scaling}"))
                print(f"| {family} | {scaling} | {e['logits_abs']:.1e} | {e['logits_rel']:.1e} | {e['past_abs']:.1e} | "
                      f"{e['loss_abs']:.1e} | {e['grad_rel']:.1e} |")


if __name__ == "__main__":
    main()
