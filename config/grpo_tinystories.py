# GRPO on the words task from the SFT run of config/sft_tinystories.py (the 16x4 flagship), sized for one
# H200: 16 prompts x 8 completions per step, rollouts on sample.py's cached decoder with CUDA graphs.
#   python rl.py config/grpo_tinystories.py
#   python rl.py config/grpo_tinystories.py --eval_only=True --init_from=out-sft   # the held-out mean reward
# The expert biases are frozen during RL: the policy runs in eval mode (no expert loads counted, no balance
# loss, no MTP loss, so the MTP module stays as SFT left it: speculative decoding stays exact, drafts worse).
out_dir = "out-grpo"
init_from = "out-sft"
data_dir = "data/tinystories_instruct"
wandb_run_name = "grpo-16x4"

max_iters = 75
eval_interval = 25
eval_prompts = 128
prompts_per_step = 16
group_size = 8
prompt_len = 64
max_new_tokens = 320
temperature = 1.0
ppo_epochs = 2
clip_eps = 0.2
kl_coef = 0.02
learning_rate = 3e-5
