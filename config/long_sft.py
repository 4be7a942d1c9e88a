# Qwen2.5-0.5B long-context SFT on one 8-GPU node, the paper's setup scaled to one node:
#   torchrun --nproc_per_node=8 train.py config/long_sft.py
# To fine-tune real weights, download Qwen2.5-0.5B (config.json + model.safetensors + tokenizer.json),
# tokenize your JSONL with its tokenizer, and point the run at both:
#   python data/prepare.py --input sft.jsonl --out_dir data/my_sft --tokenizer /path/to/Qwen2.5-0.5B
#   torchrun --nproc_per_node=8 train.py config/long_sft.py --init_from=/path/to/Qwen2.5-0.5B --dataset=data/my_sft
out_dir = "out-long-sft"
model_preset = "qwen2.5-0.5b"  # used when init_from='scratch'
synthetic_dist = "chatqa2"  # bimodal, the paper's hardest case for plain CP
synthetic_n = 4000
synthetic_max_len = 98304  # ChatQA2's longest sample is 99K tokens
cp = 8  # 8 ranks = dp 1 x cp 8
schedule = "skrull"
bucket_size = 26000  # paper: C = 26K tokens for Qwen2.5-0.5B on H100 80GB (ZeRO-2, selective recompute)
batch_size = 64  # paper: BatchSize = 64 sequences per DP rank
max_iters = 1000
learning_rate = 2e-5
min_lr = 2e-6
warmup_iters = 30
weight_decay = 0.0
checkpoint_interval = 100
device = "cuda"
dtype = "bfloat16"
