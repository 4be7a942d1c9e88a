# A tiny Qwen2-style model on the synthetic long-tail SFT set: trains in a few minutes on a 2-core CPU.
#   python train.py config/long_sft_cpu.py
#   torchrun --nproc_per_node=2 train.py config/long_sft_cpu.py --cp=2 --out_dir=out-cpu-cp2   (gloo, context parallel)
out_dir = "out-cpu"
model_preset = "tiny"
synthetic_dist = "wikipedia"  # long-tail (paper Table 1): most samples short, a few long
synthetic_n = 2000
synthetic_max_len = 8192
eval_fraction = 0.1  # 200 samples held out: eval_loss in the log, and `python sample.py --eval_synthetic`
eval_interval = 50
eval_batches = 4
batch_size = 16
bucket_size = 8192
max_iters = 200
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 10
checkpoint_interval = 50
device = "cpu"
dtype = "float32"
