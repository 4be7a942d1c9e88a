# Qwen2.5-7B on ChatQA2-style data, the paper's 7B setup: 32 H100s (4 nodes x 8) as dp 2 x cp 16,
# BatchSize 40 sequences per DP rank. Check that it fits before spending GPU hours (no GPU needed):
#   python train.py config/long_sft_7b.py --dry_run=True --dry_run_world=32
# Launch: the same command on each of the 4 nodes, with torchrun's rendezvous (any free port on node 0):
#   torchrun --nnodes=4 --nproc_per_node=8 --rdzv_id=skrull7b --rdzv_backend=c10d \
#       --rdzv_endpoint=NODE0_HOST:29500 train.py config/long_sft_7b.py
# CP groups are 16 consecutive ranks, i.e. two whole nodes: each ring spans a node pair, so it crosses
# the inter-node network once per lap. Real weights: --init_from=/path/to/Qwen2.5-7B --dataset=data/my_sft
# (tokenized with its tokenizer: see config/long_sft.py).
out_dir = "out-long-sft-7b"
model_preset = "qwen2.5-7b"  # used when init_from='scratch'
synthetic_dist = "chatqa2"
synthetic_n = 4000
synthetic_max_len = 98304  # ChatQA2's longest sample is 99K tokens
cp = 16  # 32 ranks = dp 2 x cp 16
schedule = "skrull"
fsdp = True
# The paper's 7B ran with selective recompute at C = 13K on DeepSpeed ZeRO-2. Here FSDP2 keeps the gathered
# bf16 parameters and their fp32 gradients through the step (parallelize.py), 46 GiB per rank for 7B,
# which leaves selective recompute about 5.8K tokens; full recompute (the ring is still never re-run)
# leaves about 21.7K. docs/memory.md has the table; the dry run prints the numbers for this exact setup.
activation_checkpoint = "full"
bucket_size = 0  # 0 -> the memory model's BucketSize for this model, world, fsdp and checkpoint mode
batch_size = 40  # paper: BatchSize = 40 for 7B on ChatQA2
max_iters = 1000
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 30
weight_decay = 0.0
checkpoint_interval = 100
device = "cuda"
dtype = "bfloat16"
