# Seed A's setup (trained on a Kaggle P100, 16 GB): a wider, top-1 DeepSeek-V3 with 31 routed experts.
#   python train.py config/tinystories_seed_a.py
# Seed A's own table: block 1024, d 768, 8 heads, 8 layers, 31 routed + 1 shared expert, top-1, bias
# update 0.001, dropout 0.1, batch 16, lr 6e-4, betas 0.9/0.95, clip 1.0, weight decay 0.1, Liger.
# Where the table is silent (MLA ranks, expert width, MTP) the values follow the 16x4's proportions.
# The vocabulary stays GPT-2's (50257, padded): prepare.py tokenizes with tiktoken's GPT-2 BPE.
# On a P100 train.py picks float16 with a gradient scaler and no torch.compile (Triton needs sm70+).
out_dir = "out-seed-a"
wandb_run_name = "seed-a"

batch_size = 16
block_size = 1024
original_seq_len = 1024
gradient_accumulation_steps = 1
learning_rate = 6e-4
min_lr = 6e-5
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
weight_decay = 0.1
use_liger = True           # where liger-kernel is installed (and CUDA): the fused linear cross-entropy

n_layer = 8
n_head = 8
n_embd = 768
dropout = 0.1
q_lora_rank = 288
kv_lora_rank = 192
inter_dim = 3072
n_dense_layers = 0         # every layer MoE: 31 routed experts + 1 shared
moe_inter_dim = 384        # d/2 (the table does not say): 314M parameters, 101M active
n_routed_experts = 31
n_shared_experts = 1
n_activated_experts = 1
bias_update_speed = 1e-3
