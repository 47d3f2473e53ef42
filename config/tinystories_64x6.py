# A bigger DeepSeek-V3 for several GPUs: 64 routed experts per MoE layer, 6 active per token, 2
# shared, group-limited routing (8 groups, a token uses 4), 12 layers at width 768.
# Parameters (model.py's get_num_params): 748.2M total without MTP, 183.7M active per token
# (embedding included), and the MTP module adds 61.6M.
# Sharded over 2 GPUs with FSDP2:
#   torchrun --standalone --nproc_per_node=2 train.py config/tinystories_64x6.py --fsdp=True
out_dir = "out-tinystories-64x6"
data_dir = "data/tinystories"
wandb_run_name = "64x6"

batch_size = 32
block_size = 512
gradient_accumulation_steps = 2
max_iters = 20000
lr_decay_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 500

vocab_size = 50304
n_layer = 12
n_head = 12
n_embd = 768
q_lora_rank = 384
kv_lora_rank = 256
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
inter_dim = 2048
n_dense_layers = 1
moe_inter_dim = 384
n_routed_experts = 64
n_activated_experts = 6
n_shared_experts = 2
n_expert_groups = 8
n_limited_groups = 4
mtp_depth = 1
