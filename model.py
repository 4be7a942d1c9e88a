"""
A Qwen2 / Qwen2.5 decoder in one file, written to be read top to bottom.

The pieces, in the order they appear:
    ModelConfig       hyperparameters; from_hf() reads a Hugging Face config.json
    RMSNorm           x / rms(x) * weight, normalised in fp32
    RoPE              rotary positions, Hugging Face "rotate-half" layout, base rope_theta
    varlen_attention  THE attention seam: causal attention over packed variable-length sequences,
                      through the kernels of context_parallel.py (the same that compute ring blocks)
    KVCache           an attn_fn for generation: caches each layer's keys and values (sample.py)
    Attention         grouped-query attention (GQA); q/k/v projections have a bias, o_proj has none
    MLP               SwiGLU: down(silu(gate(x)) * up(x))
    Block             pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); optional
                      activation checkpointing that never re-runs the attention
    Transformer       embeddings -> blocks -> final norm -> lm_head (tied or untied) -> loss

Everything inside the model works on *packed* tokens: a batch is one long row of N tokens holding
several sequences back to back, with `cu_seqlens` (int32, n+1 offsets) marking where each starts.
Attention never crosses a sequence boundary, and RoPE positions come in explicitly, because under
context parallelism a rank holds zigzag shards whose positions are not arange(N). The model never
knows about parallelism: train.py swaps the attention function through `attn_fn`.

Parameter names equal Hugging Face's without the leading "model." (lm_head.weight stays as is), so
loading a checkpoint is a rename, not a permutation. Shapes in comments: N tokens, C = n_embd,
H query heads, Hkv key/value heads, D = head_dim, V = vocab_size.
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from context_parallel import AttnPlan, attention
from scheduler import SHAPES


@dataclass
class ModelConfig:
    vocab_size: int = 151936
    n_layer: int = 24
    n_head: int = 14
    n_kv_head: int = 2           # GQA: each K/V head serves n_head // n_kv_head query heads
    n_embd: int = 896
    intermediate_size: int = 4864
    rope_theta: float = 1000000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix (Qwen2.5 <= 3B)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf):
        """Build from a Hugging Face Qwen2 config.json dict; refuse what this file does not implement."""
        if hf.get("model_type") != "qwen2":
            raise ValueError(f"unsupported architecture: model_type={hf.get('model_type')!r}, "
                             f"architectures={hf.get('architectures')}; model.py implements Qwen2/Qwen2.5 ('qwen2')")
        # transformers < 5 writes rope_theta at the top level, >= 5 inside rope_parameters
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported RoPE scaling {rope}; only plain RoPE is implemented")
        if hf.get("use_sliding_window"):
            raise ValueError("unsupported: use_sliding_window=true (Qwen2.5 checkpoints ship it off)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; Qwen2 uses 'silu'")
        cfg = cls(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                  n_head=hf["num_attention_heads"],
                  n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                  n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                  rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
                  norm_eps=hf.get("rms_norm_eps", 1e-6),
                  tie_embeddings=hf.get("tie_word_embeddings", False))
        if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
            raise ValueError(f"unsupported: head_dim={hf['head_dim']} != hidden_size/num_attention_heads")
        return cfg

    def to_hf(self):
        """The config.json dict transformers needs to load what save_pretrained writes."""
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                "vocab_size": self.vocab_size, "num_hidden_layers": self.n_layer,
                "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv_head,
                "hidden_size": self.n_embd, "intermediate_size": self.intermediate_size,
                "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps,
                "tie_word_embeddings": self.tie_embeddings, "use_sliding_window": False,
                "max_position_embeddings": 131072}


PRESETS = {
    # the paper's two models, Qwen2.5-0.5B and Qwen2.5-7B: their config.json shapes are written once, in
    # scheduler.SHAPES, where the cost model reads them without importing torch
    **{name: ModelConfig(**shape) for name, shape in SHAPES.items()},
    # ~0.8M parameters for a 2-core CPU: byte-level vocab (256 bytes + 8 specials), head_dim 32, same
    # GQA ratio as Qwen2.5-0.5B's spirit (2 query heads per KV head); classic RoPE base for short contexts
    "tiny": ModelConfig(vocab_size=264, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                        intermediate_size=352, rope_theta=10000.0),
}

# -----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 sums of squares lose precision), cast back, then scale: Qwen2's order
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RoPE(nn.Module):
    """Rotary embedding, rotate-half layout: dims (i, i + D/2) form a pair rotated by pos * theta^(-2i/D).
    Hugging Face's layout, so Qwen2 q/k weights load without permuting rows. No buffers: the
    frequencies are recomputed in fp32 each call (D/2 numbers), so .to(bf16) and meta-device
    construction can never degrade them."""

    def __init__(self, head_dim, theta):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids):  # (N,) -> cos, sin each (N, 1, D) in fp32
        D = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, D, 2, device=position_ids.device, dtype=torch.float32) / D))
        freqs = position_ids.float()[:, None] * inv_freq  # (N, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # (N, 1, D), broadcasts over heads
        return emb.cos(), emb.sin()

    @staticmethod
    def rotate(x, cos, sin):  # x (N, heads, D)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        # cos/sin cast to x's dtype like transformers does, so bf16 runs match the reference
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def varlen_attention(q, k, v, cu_seqlens):
    """Causal attention within each packed sequence, never across.
    q (N, H, D), k/v (N, Hkv, D), cu_seqlens int32 (n+1,) offsets into N -> out (N, H, D).
    The kernels are context_parallel's, the same that compute every ring block: on CUDA one flash
    varlen call for all sequences (bf16/fp16), on CPU torch's flash op per sequence (exact), so the
    cost is sum(L_i^2), never the (N x N) block-diagonal mask. Reads cu_seqlens on the host: a model
    forward builds its AttnPlan once and shares it with every layer (Transformer.forward)."""
    return attention(q, k, v, AttnPlan(None, cu_seqlens, q.device))


class KVCache:
    """Keys and values of one sequence for generation, every layer, preallocated for max_tokens.
    It is an attn_fn (the model's one attention seam): the model calls it once per layer, in order, with
    the new tokens' q, k, v; it appends k, v to that layer's cache and attends the new queries to every
    cached key, causally. The layer is found by counting calls, so a forward pass must go through all
    layers (Transformer.forward always does). Pass the new tokens' position_ids explicitly."""

    def __init__(self, n_layer, max_tokens):
        self.n_layer, self.max_tokens = n_layer, max_tokens
        self.k, self.v = [None] * n_layer, [None] * n_layer  # each (max_tokens, Hkv, D), made on first use
        self.length, self._layer = 0, 0  # tokens cached in every layer; the layer the next call is for

    def __call__(self, q, k, v):  # q (n, H, D), k/v (n, Hkv, D) for n new tokens -> (n, H, D)
        i, n, S = self._layer, q.shape[0], self.length + q.shape[0]
        if S > self.max_tokens:
            raise ValueError(f"KV cache holds {self.max_tokens} tokens, {S} requested")
        if self.k[i] is None:
            self.k[i] = k.new_empty(self.max_tokens, *k.shape[1:])
            self.v[i] = v.new_empty(self.max_tokens, *v.shape[1:])
        self.k[i][S - n:S], self.v[i][S - n:S] = k, v
        self._layer = (i + 1) % self.n_layer
        if self._layer == 0:
            self.length = S
        # new token t sits at S - n + t and sees keys 0 .. S - n + t (causal, bottom-right aligned)
        mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - n, S, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], self.k[i][:S].transpose(0, 1)[None],
                                             self.v[i][:S].transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1)


def positions_from_cu_seqlens(cu_seqlens, n_tokens):
    """Default position_ids: 0, 1, 2, ... restarting at every sequence start. (N,) int64."""
    cu = cu_seqlens.long()
    if cu[0] != 0 or cu[-1] != n_tokens:
        raise ValueError(f"cu_seqlens must run from 0 to the number of tokens ({n_tokens}), got {cu.tolist()}")
    starts = torch.repeat_interleave(cu[:-1], cu.diff())  # each token's sequence start
    return torch.arange(n_tokens, device=cu.device) - starts

# -----------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, D = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, D
        assert config.n_head % config.n_kv_head == 0, "GQA needs n_head divisible by n_kv_head"
        # Qwen2 quirk: q/k/v carry a bias, the output projection does not
        self.q_proj = nn.Linear(C, config.n_head * D, bias=True)
        self.k_proj = nn.Linear(C, config.n_kv_head * D, bias=True)
        self.v_proj = nn.Linear(C, config.n_kv_head * D, bias=True)
        self.o_proj = nn.Linear(config.n_head * D, C, bias=False)

    # No forward(): Block calls qkv(), then the attention seam, then o_proj, so that activation
    # checkpointing can cut the block at the seam (see Block).

    def qkv(self, x, cos, sin):  # x (N, C) -> q (N, H, D), k and v (N, Hkv, D), RoPE applied
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.n_head, self.head_dim)
        k = self.k_proj(x).view(N, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(N, self.n_kv_head, self.head_dim)
        return RoPE.rotate(q, cos, sin), RoPE.rotate(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, I = config.n_embd, config.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)

    def forward(self, x):  # (N, C) -> (N, I) -> (N, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective recompute policy: keep what the matrix multiplies produce, recompute everything else
    (RMSNorm, SiLU, products, residual adds: cheap elementwise work that holds most of the bytes)."""
    save = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


class Block(nn.Module):
    # Activation checkpointing, set from outside (train.py): "none" | "full" | "selective".
    # The block is cut at the attention call, and only the two halves around it are ever recomputed:
    # under context parallelism the attention is the ring, and re-running it in the backward would
    # silently repeat its P2P exchange. The attention keeps what a flash kernel keeps (q, k, v, out, lse).
    #   full:      both halves are recomputed from their inputs (x, and x with the attention output)
    #   selective: the MLP half keeps its matmul outputs (o_proj, gate, up, down) and recomputes the
    #              elementwise ops; the attention-input half (norm, q/k/v projections, RoPE; about a
    #              tenth of the block's FLOPs) is recomputed whole, as its matmul outputs are not needed
    recompute = "none"
    selective_policy = staticmethod(_keep_matmuls)

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_fn):  # (N, C) -> (N, C)
        if self.recompute == "none" or not torch.is_grad_enabled():
            return self._after_attention(x, attn_fn(*self._before_attention(x, cos, sin)))
        if self.recompute not in ("full", "selective"):
            raise ValueError(f"recompute must be 'none', 'full' or 'selective', got {self.recompute!r}")
        qkv = checkpoint(self._before_attention, x, cos, sin, use_reentrant=False)
        y = attn_fn(*qkv)  # outside any checkpoint: runs once, its saved tensors are kept
        context = (lambda: create_selective_checkpoint_contexts(self.selective_policy)) if self.recompute == "selective" else noop_context_fn
        return checkpoint(self._after_attention, x, y, use_reentrant=False, context_fn=context)

    def _before_attention(self, x, cos, sin):  # (N, C) -> q, k, v
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def _after_attention(self, x, y):  # block input (N, C), attention output (N, H, D) -> (N, C)
        x = x + self.self_attn.o_proj(y.flatten(1))  # (N, H*D)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    # targets are pushed through lm_head this many tokens at a time, and each chunk's logits are
    # recomputed in backward instead of stored: 2048 x 152K fp32 is 1.2 GB, the whole 26K-token
    # bucket of the paper would be 16 GB of logits plus as much again for their gradient
    loss_chunk = 2048

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.rope = RoPE(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one Parameter, so parameters() yields it once

    @staticmethod
    def _init_weights(module):  # transformers' Qwen2 init: N(0, 0.02), zero biases, unit norms
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied embedding counts once

    def forward(self, idx, targets=None, *, cu_seqlens=None, position_ids=None, attn_fn=None,
                reduction="mean", return_logits=None):
        """idx (B, T) token ids -> (logits, loss).

        Unpacked: each of the B rows is one sequence. Packed: B == 1 and cu_seqlens (int32, n+1)
        gives the sequence offsets inside the row. position_ids, (B, T) or (T,), default to
        0, 1, ... restarting at every sequence start. attn_fn(q, k, v) replaces
        varlen_attention(q, k, v, cu_seqlens) in every layer (context parallelism plugs in here:
        train.py passes context_parallel.attention with the micro-batch's prebuilt plan).
        targets (B, T) are already shifted (target[t] is token t+1), -100 = no loss at t.
        reduction "mean" averages over targets != -100 (0 if there are none), "sum" adds them up.
        The loss is computed in fp32. return_logits defaults to `targets is None`: with targets,
        logits are None unless asked for, and the loss only pushes target positions through lm_head,
        a chunk at a time, so the (N, V) logits are never held in memory at once.
        logits, when returned, are (B, T, V) in the model's dtype.
        """
        B, T = idx.shape
        if cu_seqlens is None:
            cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=idx.device) * T  # T may be 0
        elif B != 1:
            raise ValueError(f"packed input (cu_seqlens given) must have batch size 1, got idx of shape {tuple(idx.shape)}")
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, B * T)
        if attn_fn is None:  # one plan for all layers: the offsets are read on the host once per forward
            plan = AttnPlan(None, cu_seqlens, idx.device)
            attn_fn = lambda q, k, v: attention(q, k, v, plan)  # noqa: E731
        if return_logits is None:
            return_logits = targets is None

        x = self.embed_tokens(idx.reshape(-1))       # (N, C), N = B*T packed tokens
        cos, sin = self.rope(position_ids.reshape(-1))  # (N, 1, D) each
        for block in self.layers:
            x = block(x, cos, sin, attn_fn)
        x = self.norm(x)                             # (N, C)

        logits = self.lm_head(x) if return_logits else None  # (N, V)
        loss = None
        if targets is not None:
            targets = targets.reshape(-1)
            if logits is not None:
                loss = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
                n_targets = (targets != -100).sum()
            else:
                loss, n_targets = self._chunked_loss(x, targets)
            if reduction == "mean":
                loss = loss / n_targets.clamp(min=1)
            elif reduction != "sum":
                raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return (logits.view(B, T, -1) if logits is not None else None), loss

    def _chunked_loss(self, x, targets):  # x (N, C), targets (N,) -> summed fp32 loss, count
        keep = targets != -100
        x, targets = x[keep], targets[keep]  # SFT: prompt tokens never reach lm_head
        # at least one (possibly empty) chunk, so lm_head is in the graph even when nothing is
        # trained on: DDP expects every parameter to get a gradient
        loss = sum(checkpoint(self._loss_sum, x[i:i + self.loss_chunk], targets[i:i + self.loss_chunk],
                              use_reentrant=False)
                   for i in range(0, max(len(targets), 1), self.loss_chunk))
        return loss, keep.sum()

    def _loss_sum(self, x, targets):  # x (n, C) -> sum of fp32 cross-entropy over n tokens
        return F.cross_entropy(self.lm_head(x).float(), targets, reduction="sum")

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints: our parameter name = HF name without the "model." prefix

    @staticmethod
    def hf_name(name):
        """Our parameter name -> its name in a Hugging Face checkpoint (export.py streams by it)."""
        return name if name == "lm_head.weight" else "model." + name

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """Load a local Hugging Face Qwen2/Qwen2.5 directory: config.json plus model.safetensors or a
        sharded model.safetensors.index.json. No network, safetensors only. dtype: the parameter
        dtype; None keeps torch's default (fp32: what training with bf16 autocast wants)."""
        from safetensors.torch import load_file
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a directory (expected a local Hugging Face Qwen2 checkpoint)")
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{path}: no config.json")
        with open(config_file) as f:
            try:
                config = ModelConfig.from_hf(json.load(f))
            except ValueError as e:
                raise ValueError(f"{config_file}: {e}") from None
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            shards = ["model.safetensors"]
        elif os.path.isfile(index_file):
            with open(index_file) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                    "(only safetensors checkpoints are supported)")
        hf = {}
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{path}: shard {shard} listed in the index is missing")
            hf.update(load_file(os.path.join(path, shard)))

        with torch.device("meta"):  # no random init of billions of weights we are about to overwrite
            model = cls(config)
        expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
        if config.tie_embeddings:
            expected.pop("lm_head.weight")  # tied checkpoints usually omit it; if present it is a copy
        state, missing = {}, []
        for name, shape in expected.items():
            hf_name = cls.hf_name(name)
            if hf_name not in hf:
                missing.append(hf_name)
                continue
            tensor = hf.pop(hf_name)  # pop: free each source tensor once converted
            if tensor.shape != shape:
                raise ValueError(f"{path}: tensor {hf_name} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(shape)}")
            state[name] = tensor.to(dtype or torch.get_default_dtype())
        if missing:
            raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensors: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared Parameter
        return model

    def save_pretrained(self, path):
        """Write config.json + model.safetensors that transformers (and from_pretrained) can load."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_hf(), f, indent=2)
        state = {self.hf_name(n): t.detach().contiguous().cpu() for n, t in self.state_dict().items()
                 if not (n == "lm_head.weight" and self.config.tie_embeddings)}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
