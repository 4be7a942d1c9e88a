"""
Model FLOPs utilisation (MFU): the model's FLOPs in a step over what the step's devices could have done in
its time, the figure GPU users compare first.

The FLOPs are scheduler.CostModel's formula, per sequence at its real length: `lin_flops` per token plus
`attn_flops` per token^2 (causal), forward + backward = 3x forward. Padding, recomputation (activation
checkpointing) and the ring's extra work are not model FLOPs: they lower MFU, as in PaLM's definition
(appendix B). With LoRA the frozen weights get no weight gradient, so the linear layers count 2x forward.
The peak is one device's: the `peak_flops` config key, else PEAK_BF16 by CUDA device name; without either
(CPU, an unknown GPU) there is no MFU.
"""
import torch

# dense bf16 tensor-core peaks, FLOP/s per GPU (NVIDIA datasheets), matched in order against
# torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", ...)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_for_name(name):
    """The table's peak for a CUDA device name, or None."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def device_peak_flops(device, peak_flops=0):
    """One device's peak FLOP/s: `peak_flops` when > 0, else the table's for this CUDA device; None if unknown."""
    if peak_flops:
        return float(peak_flops)
    device = torch.device(device)
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def step_flops(cost, lengths, lora=False):
    """Model FLOPs (forward + backward) of a step over sequences of `lengths`, by CostModel `cost`'s formula."""
    return cost.lin_flops * (2 / 3 if lora else 1) * sum(lengths) + cost.attn_flops * sum(s * s for s in lengths)


def step_mfu(cost, lengths, seconds, devices, peak, lora=False):
    """The step's MFU over `devices` devices of `peak` FLOP/s each, or None without a peak."""
    return step_flops(cost, lengths, lora) / (seconds * devices * peak) if peak else None
