"""
LoRA (Hu et al., arXiv 2106.09685): train a low-rank update B @ A next to each chosen frozen weight W,

    y = x W^T + b + (alpha / r) * x A^T B^T          A (r, in), B (out, r)

B starts at zero, so training starts from the frozen model exactly. Only A and B get gradients, weight
decay and optimizer state; everything else has requires_grad=False. Skrull (paper section 5) changes
only which rank computes which tokens, so it composes with LoRA unchanged: the adapters are ordinary
parameters as far as the micro-batch loop and the gradient all-reduce are concerned.

    apply_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"))  # in place; freezes the rest
    save_adapter(model, "out/adapter")   # PEFT layout: adapter_config.json + adapter_model.safetensors
    merge_lora(model)                    # W += (alpha / r) B @ A, back to plain nn.Linear, for export

The layout and the initialisation are PEFT's, and module names are Hugging Face's (our parameter names
are theirs without "model.", the same in Qwen2, Qwen3 and Llama), so `peft.PeftModel.from_pretrained(
Qwen2ForCausalLM, dir)` loads what save_adapter writes and gives the same logits (tests/test_lora.py checks it).
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """nn.Linear plus lora_A / lora_B. Subclassing keeps the frozen weight's name (q_proj.weight), so
    checkpoints and Hugging Face names do not change; the adapters appear as q_proj.lora_A.weight."""

    def __init__(self, base, rank, alpha):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the very same Parameters, no copy
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling

    def delta(self):  # (out, in): what merging adds to the frozen weight
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def parse_targets(targets):
    """"q_proj,v_proj" or ("q_proj", "v_proj") or "all" -> a tuple of projection names; errors name the bad one."""
    names = TARGETS if targets == "all" else tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets))
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise ValueError(f"lora_targets={targets!r}: expected 'all' or a comma-separated subset of {', '.join(TARGETS)}")
    return names


def apply_lora(model, rank, alpha, targets):
    """Wrap every Linear named in `targets` with a LoRALinear and freeze all other parameters. In place."""
    targets = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
    model.lora = dict(rank=rank, alpha=alpha, targets=list(targets))
    return model


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_state(model):
    """The adapters only, under PEFT's saved names: base_model.model.<HF module name>.lora_A.weight."""
    return {f"base_model.model.model.{n}.{ab}.weight": getattr(m, ab).weight.detach().cpu().contiguous()
            for n, m in lora_modules(model) for ab in ("lora_A", "lora_B")}


def save_adapter(model, path, base_model=None):
    """adapter_config.json + adapter_model.safetensors, loadable by peft onto the base model's transformers class."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "r": model.lora["rank"], "lora_alpha": model.lora["alpha"], "target_modules": model.lora["targets"],
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "init_lora_weights": True, "inference_mode": True}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(adapter_state(model), os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight and put the plain nn.Linear back: the model is then an
    ordinary model that save_pretrained writes for transformers or vLLM. In place."""
    for name, m in lora_modules(model):
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        plain.weight.add_(m.delta().to(plain.weight.dtype))
        setattr(parent, name.rpartition(".")[2], plain)
    model.lora = None
    return model
