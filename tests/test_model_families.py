"""Qwen2, Qwen3 and Llama 3 against transformers' own classes for every RoPE scaling (bench/parity.py's
cases), RoPE frequencies bit for bit, config.json both ways, context-extension overrides, the shapes the cost
and memory models read, and (slow) training from a Qwen3 and a Llama 3 directory at cp=1 and cp=2."""
import json

import pytest
import torch

from bench.parity import FAMILIES, SCALINGS, batch, check_export, compare, hf_config, write_tiny_hf
from model import ModelConfig, Transformer, rope_frequencies

transformers = pytest.importorskip("transformers")  # the oracle; listed in requirements.txt

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32; eager softmax vs torch's CPU flash kernel differ in the last bits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_matches_transformers(tmp_path, family, scaling):
    """Logits (rows before and past the original length), loss and every gradient; then our save_pretrained
    loads back in transformers with the same config.json RoPE and the same logits."""
    ours, hf, errors = compare(family, scaling, tmp_path / "hf")
    assert errors["logits_rel"] < 1e-5 and errors["grad_rel"] < 1e-4, errors
    assert ours.config.model_type == family and ours.config.head_dim == 32
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    # RoPE: the same inverse frequencies and attention factor, bit for bit
    inv_freq, factor = rope_frequencies(ours.config.head_dim, ours.config.rope_theta, ours.config.rope_scaling)
    assert torch.equal(inv_freq, hf.model.rotary_emb.inv_freq) and factor == hf.model.rotary_emb.attention_scaling
    if scaling != "default":
        assert not torch.equal(inv_freq, rope_frequencies(32, 10000.0)[0]) or factor != 1.0

    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                             dtype=torch.float32)
    assert type(back) is type(hf)
    assert back.config.rope_parameters == hf.config.rope_parameters
    idx, pos, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, position_ids=pos)[0], back(input_ids=idx, position_ids=pos).logits, **TOL)
    assert Transformer.from_pretrained(tmp_path / "ours").config == ours.config


def test_qk_norm_under_autocast_keeps_the_attention_dtype():
    """Qwen3's q/k norms have fp32 weights: under bf16 autocast q and k still reach the attention in bf16 (the
    flash kernels on CUDA take nothing else), and the loss stays close to fp32's."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=16,
                                    intermediate_size=64, model_type="qwen3", qkv_bias=False, qk_norm=True))
    seen = []

    def attn_fn(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype))
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, 0),
                                                                v.transpose(0, 1).repeat_interleave(2, 0), is_causal=True).transpose(0, 1)
    idx = torch.randint(0, 97, (1, 24))
    ref = model(idx, idx, attn_fn=attn_fn)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx, attn_fn=attn_fn)[1]
    assert seen[:2] == [(torch.float32,) * 3] * 2 and seen[2:] == [(torch.bfloat16,) * 3] * 2
    torch.testing.assert_close(loss, ref, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_and_config_both_ways(tmp_path, family):
    """Tied embeddings per family, and from_hf(to_hf()) is the identity."""
    from bench.parity import hf_model
    hf_model(family, "yarn", tmp_path, tie=True)
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.tie_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    assert ModelConfig.from_hf(ours.config.to_hf()) == ours.config
    assert ModelConfig.from_hf(json.loads(json.dumps(ours.config.to_hf()))) == ours.config


def test_released_config_files():
    """The config.json layouts the released checkpoints ship (values from their public files)."""
    llama31_8b = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
                  "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
                  "intermediate_size": 14336, "max_position_embeddings": 131072, "num_attention_heads": 32,
                  "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                  "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256}
    c = ModelConfig.from_hf(llama31_8b)
    assert (c.head_dim, c.qkv_bias, c.o_bias, c.qk_norm, c.tie_embeddings, c.rope_theta) == (128, False, False, False, False, 5e5)
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["original_max_position_embeddings"] == 8192
    qwen3_8b = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
                "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
                "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
                "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
                "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}
    c = ModelConfig.from_hf(qwen3_8b)
    assert c.qk_norm and not c.qkv_bias and c.rope_scaling is None and c.head_dim == 128
    with torch.device("meta"):  # the published sizes: Llama-3.1-8B 8.03B, Qwen3-8B 8.19B
        assert Transformer(ModelConfig.from_hf(llama31_8b)).num_params() == 8_030_261_248
        assert Transformer(c).num_params() == 8_190_735_360
    # Qwen2.5's model card for > 32K: add this to config.json (transformers 4.x "type" key, top-level theta)
    qwen25 = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_hidden_layers": 24, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1e6,
              "max_position_embeddings": 32768,
              "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}}
    c = ModelConfig.from_hf(qwen25)
    assert c.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert c.rope_theta == 1e6 and c.qkv_bias and not c.o_bias
    for bad, match in [({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic' is not implemented"),
                       ({"rope_type": "longrope", "short_factor": [1.0]}, "rope_type='longrope' is not implemented"),
                       ({"rope_type": "llama3", "factor": 8.0}, "'llama3': missing low_freq_factor, high_freq_factor"),
                       ({"rope_type": "linear", "factor": 2.0, "foo": 1}, "'linear': unknown foo"),
                       ({"rope_type": "linear", "factor": -2.0}, "factor=-2.0 must be a positive number")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_hf({**qwen25, "rope_scaling": bad})


def test_context_extension_overrides():
    """train.py's rope_* keys over a checkpoint's RoPE: ModelConfig.with_rope."""
    qwen = ModelConfig(max_position_embeddings=32768)
    c = qwen.with_rope(scaling_type="yarn", factor=4, original_max_position=32768)
    assert c.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert c.max_position_embeddings == 131072 and c.rope_theta == qwen.rope_theta
    assert c.to_hf()["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                            "original_max_position_embeddings": 32768}
    assert c.with_rope(scaling_type="yarn", factor=4, original_max_position=32768) == c  # idempotent (resume)
    assert qwen.with_rope(theta=5e6) == ModelConfig(max_position_embeddings=32768, rope_theta=5e6)
    llama = c.with_rope(scaling_type="llama3", factor=8)  # a new type starts from its own keys
    assert llama.rope_scaling == {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "factor": 8.0,
                                  "original_max_position_embeddings": 131072}
    assert c.with_rope(factor=2).rope_scaling["factor"] == 2.0  # same type: only the factor changes
    assert c.with_rope(scaling_type="default").rope_scaling is None
    for kw, match in [(dict(scaling_type="dynamic", factor=2), "rope_type='dynamic' is not implemented"),
                      (dict(factor=2), "need rope_scaling_type"),
                      (dict(scaling_type="linear"), "'linear': missing factor"),
                      (dict(scaling_type="yarn"), "'yarn': missing factor"),
                      (dict(theta=0.5), "rope_theta=0.5")]:
        with pytest.raises(ValueError, match=match):
            qwen.with_rope(**kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_from_the_config(family):
    """The cost model's parameter count and FLOPs and the memory model read head_dim, biases, q/k norms and
    tied embeddings from the ModelConfig."""
    from memory import static_bytes
    from scheduler import CostModel
    for tie in (False, True):
        config = ModelConfig.from_hf(hf_config(family, "default", tie=tie).to_dict())
        with torch.device("meta"):
            n = Transformer(config).num_params()
        cost = CostModel(config)
        assert cost.n_params == n == static_bytes(config)["n_params"]
        h, h_q, h_kv = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        assert cost.h_kv == h_kv and cost.attn_flops == 3 * config.n_layer * 2 * h_q
        assert cost.lin_flops == 3 * (config.n_layer * (4 * h * h_q + 4 * h * h_kv + 6 * h * config.intermediate_size)
                                      + 2 * h * config.vocab_size)


@pytest.mark.slow
def test_train_from_qwen3_and_llama3_at_cp1_and_cp2(tmp_path, dataset):
    """20 CPU steps from a tiny random Qwen3 and Llama 3 directory at cp=1 and cp=2 (the same losses), then
    the export loads in transformers with our logits."""
    from conftest import train_all
    runs = []
    for family in ("qwen3", "llama"):
        base = write_tiny_hf(tmp_path / f"{family}-base", family)
        for cp in (1, 2):
            runs.append((tmp_path / f"{family}-cp{cp}", dataset,
                         dict(nproc=cp, cp=cp, init_from=str(base), max_iters=20, batch_size=4, bucket_size=1024 // cp,
                              warmup_iters=2, lr_decay_iters=20, learning_rate=1e-3, export=True,
                              checkpoint_interval=20)))
    # a context extension of the Llama directory: its llama3 scaling replaced by YaRN x4 over 256, a new base
    extended = (tmp_path / "llama-yarn", dataset, dict(runs[2][2], max_iters=2, rope_theta=1e6, rope_scaling_type="yarn",
                                                       rope_scaling_factor=4, rope_original_max_position=256))
    *records, _ = train_all(*runs, extended)
    for (out_dir, _, _), recs in zip(runs, records):
        assert len(recs) == 20 and recs[-1]["loss"] < recs[0]["loss"], (out_dir, [r["loss"] for r in recs])
    _, rope, diff, scale = check_export(str(extended[0]))
    assert rope == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 256}
    assert diff < 1e-5 * scale
    with open(extended[0] / "hf" / "config.json") as f:
        assert json.load(f)["max_position_embeddings"] == 2048  # the base's already exceeds 4 x 256
    for a, b in ((0, 1), (2, 3)):  # cp=1 and cp=2 train the same run
        torch.testing.assert_close(torch.tensor([r["loss"] for r in records[a]]),
                                   torch.tensor([r["loss"] for r in records[b]]), rtol=1e-4, atol=1e-5)
    for (out_dir, _, _), cls in zip(runs, ["Qwen3ForCausalLM"] * 2 + ["LlamaForCausalLM"] * 2):
        got, rope, diff, scale = check_export(str(out_dir))  # 600 positions: past the original 128
        assert got == cls and rope["rope_type"] in ("yarn", "llama3") and diff < 1e-5 * scale, (out_dir, diff, scale)


def write_8b_configs(path):
    """config.json of Llama-3.1-8B and Qwen3-8B, written by transformers' config classes from their published
    values (no download): what docs/finetuning.md's dry run command writes."""
    llama = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192))
    qwen3 = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
    llama.save_pretrained(path / "llama-3.1-8b")
    qwen3.save_pretrained(path / "qwen3-8b")
    return path / "llama-3.1-8b", path / "qwen3-8b"


@pytest.mark.slow
def test_dry_run_from_a_config_json_alone(tmp_path, dataset):
    """An 8B dry run at 32 ranks from a config.json without weights: as init_from (Qwen3-8B, YaRN x2 over its
    32K), or as model_preset (Llama-3.1-8B's file itself)."""
    import subprocess
    import sys

    from conftest import ROOT, env
    llama, qwen3 = write_8b_configs(tmp_path)
    args = ["config/long_sft_8b_64k.py", f"--dataset={dataset}", "--dry_run=True", "--dry_run_world=32"]
    runs = [subprocess.Popen([sys.executable, "train.py", *args, *extra], cwd=ROOT, env=env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for extra in ([f"--init_from={qwen3}", "--rope_scaling_type=yarn", "--rope_scaling_factor=2",
                           "--rope_original_max_position=32768"], [f"--model_preset={llama / 'config.json'}"])]
    (out_q, err_q), (out_l, err_l) = (p.communicate(timeout=300) for p in runs)
    assert runs[0].returncode == 0 and runs[1].returncode == 0, err_q[-2000:] + err_l[-2000:]
    assert ("(8.19B params, qwen3, RoPE theta 1e+06 yarn factor=2 original_max_position_embeddings=32768)" in out_q
            and "world 32 = dp 4 x cp 8" in out_q and out_q.count(" yes") == 32), out_q
    assert "(8.03B params, llama, RoPE theta 500000 llama3 factor=8 " in out_l and "original_max_position_embeddings=8192)" in out_l, out_l
