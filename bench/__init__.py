"""Benchmarks, one module per job, each run from the repository root:

    python -m bench.ring      # ring attention over gloo processes vs single-process attention
    python -m bench.e2e       # every policy end to end (train.py), measured vs CostModel's prediction
    python -m bench.lora      # LoRA vs full fine-tuning: trainable params, optimizer-state bytes, tokens/s
    python -m bench.memory    # FSDP2 vs all-reduce on CPU; on a GPU, measured peak memory vs memory.py's model
    python -m bench.gpu       # the one GPU check: CUDA paths vs fp64, both train.py paths, 0.5B tokens/s, MFU, memory
    python -m bench.plan      # planning time per rank and the step's wait, 32 to 4,096 GPUs, before and after
    python -m bench.parity    # our model vs transformers' Qwen2/Qwen3/Llama for every RoPE scaling
    python -m bench.prepare_speed  # data/prepare.py tokens/s and peak memory at 1 process and every core
    python -m bench.ckpt      # sharded checkpoints at 107M params, 4 ranks: kill -9, resharding, host memory, async, export
    python -m bench.calibration  # what the online cost-model fit (costfit.py) costs per step and per fit
    python -m bench.balance   # what evening out two ranks' work gains on this CPU, against the cost model's independent ranks

bench/common.py holds what they share; bench/ckpt_probe.py is bench.ckpt's per-rank probe. The cost constants train.py reads come from calibrate.py,
which is part of running the method, not a benchmark.
"""
