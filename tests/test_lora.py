"""lora.py against peft (the reference LoRA): adapters saved by us load with peft onto transformers'
Qwen2ForCausalLM and give the same logits; merging gives the same logits as plain weights; only the
adapters are trainable. The train.py side (LoRA losses equal across schedules and cp) is in test_train.py."""

import pytest
import torch

from export import export_hf, live_reader
from lora import LoRALinear, apply_lora, merge_lora, parse_targets, save_adapter
from model import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = dict(atol=2e-5, rtol=1e-4)


def random_hf(path, tie, seed=0):
    """A random 2-layer Qwen2 saved as a Hugging Face directory (biases and norms away from their init)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   tie_word_embeddings=tie)
    hf = transformers.Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.save_pretrained(path)


def load_hf(path):
    return transformers.Qwen2ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("tie,targets", [(True, "all"), (False, "q_proj,v_proj,down_proj")])
def test_adapter_matches_peft_and_merge(tmp_path, tie, targets):
    base = tmp_path / "base"
    random_hf(base, tie)
    ours = Transformer.from_pretrained(base)
    apply_lora(ours, rank=4, alpha=8, targets=targets)
    n_lora = 2 * len(parse_targets(targets)) * ours.config.n_layer
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == \
        sorted(n for n, _ in ours.named_parameters() if ".lora_" in n) and n_lora > 0
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) * 2 == n_lora
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        before = ours(idx)[0]
        torch.testing.assert_close(before, load_hf(base)(input_ids=idx).logits, **TOL)  # B = 0: the base model
        for n, p in ours.named_parameters():
            if ".lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))  # as if trained: B != 0
        ours_logits = ours(idx)[0]
    assert (ours_logits - before).abs().max() > 1e-2  # the adapters change the output

    save_adapter(ours, tmp_path / "adapter", base_model=str(base))
    ref = peft.PeftModel.from_pretrained(load_hf(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours_logits, ref(input_ids=idx).logits, **TOL)

    # export.py merges each adapter into its weight as it streams them out; merge_lora does it in place
    export_hf(str(tmp_path / "out"), ours.config, live_reader(ours), lora=ours.lora)
    merge_lora(ours)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "out" / "hf")(input_ids=idx).logits, ours_logits, **TOL)
        torch.testing.assert_close(ours(idx)[0], ours_logits, **TOL)
        torch.testing.assert_close(ref.merge_and_unload()(input_ids=idx).logits, ours_logits, **TOL)


def test_frozen_weights_get_no_gradient():
    torch.manual_seed(0)
    from model import PRESETS
    model = apply_lora(Transformer(PRESETS["tiny"]), 2, 4, "all")
    idx = torch.randint(0, 264, (1, 12))
    model(idx, idx)[1].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n
    with pytest.raises(ValueError, match="lora_targets"):
        parse_targets("q_proj,lm_head")
