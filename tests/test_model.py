"""model.py against transformers' Qwen2ForCausalLM, packed vs one-by-one, the attn_fn seam, loading errors."""
import json
import os

import pytest
import torch

from model import PRESETS, ModelConfig, Transformer, varlen_attention

transformers = pytest.importorskip("transformers")  # the oracle; listed in requirements.txt

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32; eager softmax vs torch's CPU flash kernel differ in the last bits


def hf_model(tmp_path, tie, shard=False, seed=0):
    """A random 2-layer Qwen2ForCausalLM saved to tmp_path; weights far from init so every term matters."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   rms_norm_eps=1e-6, tie_word_embeddings=tie, attn_implementation="eager")
    hf = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # HF inits biases to 0 and norms to 1: randomise so they are tested
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "1GB")
    return hf


def shifted(labels):  # HF shifts labels inside its loss; our targets come already shifted
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


@pytest.mark.parametrize("tie,shard", [(True, False), (False, False), (True, True), (False, True)])
def test_matches_transformers(tmp_path, tie, shard):
    hf = hf_model(tmp_path, tie, shard)
    assert os.path.exists(tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors"))
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.tie_embeddings == tie and ours.config.rope_theta == 1e6
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tie
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())

    idx = torch.randint(0, 300, (3, 24))
    labels = idx.clone()
    labels[0, :7] = -100  # a prompt that is not trained on
    labels[2, 10:12] = -100
    out = hf(input_ids=idx, labels=labels)
    logits, loss = ours(idx, shifted(labels), return_logits=True)
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)
    _, chunked = ours(idx, shifted(labels))  # default: no logits, chunked loss
    torch.testing.assert_close(chunked, out.loss, **TOL)

    out.loss.backward()
    chunked.backward()
    names = dict(ours.named_parameters())
    assert len(names) == len(dict(hf.named_parameters()))
    for name, p in names.items():
        ref = hf.get_parameter(name if name == "lm_head.weight" else "model." + name)
        torch.testing.assert_close(p.grad, ref.grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_save_pretrained_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176)
    ours = Transformer(cfg).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    assert hf.config.rope_parameters["rope_theta"] == 1e6
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(input_ids=idx).logits, **TOL)
        torch.testing.assert_close(ours(idx)[0], Transformer.from_pretrained(tmp_path)(idx)[0], atol=0, rtol=0)
    bf16 = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters()) and bf16.lm_head.weight is bf16.embed_tokens.weight


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, **kw)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-zero biases, non-unit norms
    return model


def packed_batch(lengths, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (L,), generator=g) for L in lengths]
    targets = [torch.cat([s[1:], torch.tensor([-100])]) for s in seqs]  # no target across a boundary
    targets[0][:2] = -100
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return seqs, targets, cu


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
def test_packed_equals_one_by_one(tie):
    lengths = [5, 17, 1, 9, 17]
    seqs, targets, cu = packed_batch(lengths)
    model = tiny_model(tie_embeddings=tie)
    model.loss_chunk = 7  # chunks straddle sequence boundaries

    logits, loss = model(torch.cat(seqs)[None], torch.cat(targets)[None], cu_seqlens=cu, reduction="sum",
                         return_logits=True)
    _, chunked = model(torch.cat(seqs)[None], torch.cat(targets)[None], cu_seqlens=cu, reduction="sum")
    torch.testing.assert_close(chunked, loss, **TOL)
    model.zero_grad()
    chunked.backward()
    packed_grads = grads(model)

    model.zero_grad()
    total = 0.0
    for i, (s, t) in enumerate(zip(seqs, targets)):
        one_logits, one_loss = model(s[None], t[None], reduction="sum", return_logits=True)
        torch.testing.assert_close(logits[0, cu[i]:cu[i + 1]], one_logits[0], **TOL)
        one_loss.backward()
        total = total + one_loss.detach()
    torch.testing.assert_close(loss, total, **TOL)
    for name, g in grads(model).items():
        torch.testing.assert_close(packed_grads[name], g, **TOL, msg=lambda m: f"{name}: {m}")

    # explicit restarting positions, as (T,) or (1, T), are what the default computes
    pos = torch.cat([torch.arange(L) for L in lengths])
    for p in (pos, pos[None]):
        _, loss_p = model(torch.cat(seqs)[None], torch.cat(targets)[None], cu_seqlens=cu, position_ids=p,
                          reduction="sum")
        torch.testing.assert_close(loss_p, chunked, atol=0, rtol=0)
    # "mean" divides by the count of targets != -100
    _, mean = model(torch.cat(seqs)[None], torch.cat(targets)[None], cu_seqlens=cu)
    n = sum(int((t != -100).sum()) for t in targets)
    torch.testing.assert_close(mean, chunked / n, **TOL)


def test_attn_fn_seam():
    lengths = [6, 11, 3]
    seqs, targets, cu = packed_batch(lengths)
    model = tiny_model()
    idx, tgt = torch.cat(seqs)[None], torch.cat(targets)[None]
    ref_logits, ref_loss = model(idx, tgt, cu_seqlens=cu, return_logits=True)
    calls = []

    def attn_fn(q, k, v):
        calls.append((q.shape, k.shape))
        return varlen_attention(q, k, v, cu)

    logits, loss = model(idx, tgt, cu_seqlens=cu, attn_fn=attn_fn, return_logits=True)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    assert calls == [(torch.Size([20, 4, 8]), torch.Size([20, 2, 8]))] * 2  # every layer, packed (N, H, D)
    # a CP shard's positions are not arange: with attn_fn and explicit positions, cu_seqlens is not needed
    pos = torch.cat([torch.arange(L) for L in lengths])
    _, loss2 = model(idx, tgt, position_ids=pos, attn_fn=attn_fn)
    torch.testing.assert_close(loss2, ref_loss, **TOL)


def test_varlen_attention_is_block_causal():
    # future tokens and other sequences must not leak in: perturb them, output must not move
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 4, 13, 16], dtype=torch.int32)  # includes an empty sequence
    q, k, v = torch.randn(16, 4, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    out = varlen_attention(q, k, v, cu)
    k2, v2 = k.clone(), v.clone()
    k2[8:], v2[8:] = torch.randn(8, 2, 8), torch.randn(8, 2, 8)  # the future of row 7, and seq 3
    torch.testing.assert_close(varlen_attention(q, k2, v2, cu)[:8], out[:8], atol=0, rtol=0)
    # one call over equal-length sequences agrees with one call per sequence
    cu_eq = torch.tensor([0, 8, 16], dtype=torch.int32)
    looped = torch.cat([varlen_attention(q[s:e], k[s:e], v[s:e], torch.tensor([0, e - s], dtype=torch.int32))
                        for s, e in [(0, 8), (8, 16)]])
    torch.testing.assert_close(varlen_attention(q, k, v, cu_eq), looped, **TOL)


def test_no_targets_and_bad_arguments():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 10))
    logits, loss = model(idx)
    assert logits.shape == (2, 10, 97) and loss is None
    # nothing to train on: loss 0, and backward still reaches every parameter (DDP needs that)
    _, loss = model(idx, torch.full((2, 10), -100))
    loss.backward()
    assert loss.item() == 0 and all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="batch size 1"):
        model(idx, cu_seqlens=torch.tensor([0, 10, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must run from 0"):
        model(idx[:1], cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="reduction"):
        model(idx, idx, reduction="none")


def test_presets_have_the_real_shapes():
    with torch.device("meta"):
        assert Transformer(PRESETS["qwen2.5-0.5b"]).num_params() == 494_032_768
        assert Transformer(PRESETS["qwen2.5-7b"]).num_params() == 7_615_616_512
    # the config.json files Qwen ships (transformers 4.x layout: rope_theta at the top level)
    common = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "rope_scaling": None, "use_sliding_window": False, "torch_dtype": "bfloat16"}
    assert ModelConfig.from_hf({**common, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                                "num_hidden_layers": 24, "num_key_value_heads": 2, "sliding_window": 32768,
                                "tie_word_embeddings": True, "vocab_size": 151936}) == PRESETS["qwen2.5-0.5b"]
    assert ModelConfig.from_hf({**common, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                                "num_hidden_layers": 28, "num_key_value_heads": 4, "sliding_window": 131072,
                                "tie_word_embeddings": False, "vocab_size": 152064}) == PRESETS["qwen2.5-7b"]
    tiny = PRESETS["tiny"]
    assert tiny.vocab_size == 264 and tiny.n_head % tiny.n_kv_head == 0


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Transformer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)

    good = tmp_path / "good"
    hf_model(good, tie=False)
    cfg = json.loads((good / "config.json").read_text())

    def variant(name, config=None, drop=None, weights=True):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config or cfg))
        if weights:
            from safetensors.torch import load_file, save_file
            state = load_file(good / "model.safetensors")
            state.pop(drop, None)
            save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        return d

    with pytest.raises(ValueError, match="unsupported architecture.*mistral"):
        Transformer.from_pretrained(variant("mistral", {**cfg, "model_type": "mistral"}))
    # Qwen2 weights under a Llama config.json: the q/k/v biases are not silently dropped
    with pytest.raises(ValueError, match=r"6 tensors that config.json does not describe \(model_type='llama'\)"):
        Transformer.from_pretrained(variant("llama", {**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="rope_type='dynamic' is not implemented"):
        Transformer.from_pretrained(variant("dynamic", {**cfg, "rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(variant("noweights", weights=False))
    with pytest.raises(ValueError, match=r"missing 1 tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        Transformer.from_pretrained(variant("missing", drop="model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensors: lm_head\.weight"):  # untied needs lm_head
        Transformer.from_pretrained(variant("nohead", drop="lm_head.weight"))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has shape"):
        Transformer.from_pretrained(variant("shape", {**cfg, "vocab_size": 301}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU path is the reference here)")
def test_cuda_kernel_path_matches_cpu_fp64():
    """The CUDA flash varlen path in bf16 against the CPU path in fp64, forward and backward."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 100, 101, 357, 512], dtype=torch.int32)
    q, k, v = (torch.randn(512, h, 64, dtype=torch.float64, requires_grad=True) for h in (8, 2, 2))
    x = [t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out, ref = varlen_attention(*x, cu.cuda()), varlen_attention(q, k, v, cu)
    dout = torch.randn_like(ref)
    out.backward(dout.to("cuda", torch.bfloat16))
    ref.backward(dout)
    for a, b in [(out, ref), *((t.grad, r.grad) for t, r in zip(x, (q, k, v)))]:
        assert ((a.double().cpu() - b).norm() / b.norm()).item() < 1e-2  # bf16 operands: 1e-3..1e-2
