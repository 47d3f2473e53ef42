# The flagship: DeepSeek-V3's architecture at a size one GPU trains on TinyStories.
# "16x4" = 16 routed experts per MoE layer, 4 of them active per token (plus 1 always-on shared
# expert). 8 layers (the first dense, 7 MoE), MLA with q/kv latents of 192/128, MTP depth 1.
# Parameters (model.py's get_num_params, checked in tests/test_model.py):
#   123.85M total without MTP (25.76M of it the token embedding, 25.76M the output head);
#   78.43M active per token (52.68M without the embedding); the MTP module adds 10.45M.
# Train:  python train.py config/tinystories_16x4.py --batch_size=16
out_dir = "out-tinystories"
data_dir = "data/tinystories"
wandb_project = "deepseek-v3-tinystories"
wandb_run_name = "16x4"

# the 64 x 512 = 32,768-token batch of the benchmarks; smaller GPUs: --batch_size=16
# --gradient_accumulation_steps=4 keeps the same optimizer step
batch_size = 64
block_size = 512
gradient_accumulation_steps = 1
max_iters = 20000          # ~655M tokens, about 1.4 epochs of TinyStories
lr_decay_iters = 20000
eval_interval = 500
eval_iters = 50
learning_rate = 1e-3       # small models take a high LR; warm-up keeps the MoE router calm
min_lr = 1e-4
warmup_iters = 500
weight_decay = 0.1

# the architecture (these are also ModelArgs' defaults; spelled out so the file says it all)
vocab_size = 50304         # GPT-2's 50257 padded to a multiple of 64
n_layer = 8
n_head = 8
n_embd = 512
q_lora_rank = 192
kv_lora_rank = 128
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
inter_dim = 1408           # the one dense layer's SwiGLU width
n_dense_layers = 1
moe_inter_dim = 352        # each expert's width
n_routed_experts = 16
n_activated_experts = 4
n_shared_experts = 1
n_expert_groups = 1        # group-limited routing pays off across devices, not on one GPU
n_limited_groups = 1
score_func = "sigmoid"
route_scale = 1.0
bias_update_speed = 1e-3
seq_aux_alpha = 1e-4
mtp_depth = 1
mtp_lambda = 0.3
dropout = 0.0
