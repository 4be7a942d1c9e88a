# An 8B model (Llama-3.1-8B, Qwen3-8B) on sequences up to 64K tokens, 32 H100s (4 nodes x 8) as dp 4 x cp 8.
# Check that it fits before spending GPU hours (no GPU and no weights needed: a config.json is enough):
#   python train.py config/long_sft_8b_64k.py --init_from=/path/to/Qwen3-8B --dry_run=True --dry_run_world=32
# Context extension: Qwen3-8B was trained at 32K; YaRN x2 takes it to 64K (its model card's recipe, factor 2):
#   --rope_scaling_type=yarn --rope_scaling_factor=2 --rope_original_max_position=32768
# Llama-3.1-8B already reaches 128K (llama3 scaling, in its config.json): no rope_* key needed.
# docs/finetuning.md, "Context extension", writes both config.json files with transformers' config classes.
out_dir = "out-long-sft-8b-64k"
synthetic_dist = "chatqa2"  # bimodal: many short samples, a long tail to the maximum
synthetic_n = 4000
synthetic_max_len = 65536
cp = 8  # 32 ranks = dp 4 x cp 8: the longest sample puts 8K tokens on each rank of its ring
schedule = "skrull"
fsdp = True
activation_checkpoint = "full"  # FSDP2's gathered bf16 parameters and fp32 gradients take ~46 GiB at 8B
bucket_size = 0  # 0 -> the memory model's BucketSize for this model, world, fsdp and checkpoint mode
batch_size = 16
max_iters = 1000
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 30
weight_decay = 0.0
checkpoint_interval = 100
device = "cuda"
dtype = "bfloat16"
