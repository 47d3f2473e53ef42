# A tiny DeepSeek-V3 (every part present: MLA, dense + MoE layers with groups, MTP) that trains on
# a CPU in seconds, for tests, CI and trying things out:
#   python train.py config/tinystories_debug.py
out_dir = "out-debug"
data_dir = "data/tinystories"
device = "cpu"
compile = False
batch_size = 8
block_size = 64
gradient_accumulation_steps = 1
max_iters = 60
lr_decay_iters = 60
warmup_iters = 5
eval_interval = 20
eval_iters = 4
log_interval = 5
learning_rate = 3e-3
min_lr = 3e-4

vocab_size = 50304
n_layer = 2
n_head = 4
n_embd = 64
q_lora_rank = 32
kv_lora_rank = 32
qk_nope_head_dim = 16
qk_rope_head_dim = 8
v_head_dim = 16
inter_dim = 192
n_dense_layers = 1
moe_inter_dim = 32
n_routed_experts = 8
n_activated_experts = 2
n_shared_experts = 1
n_expert_groups = 2
n_limited_groups = 1
mtp_depth = 1
