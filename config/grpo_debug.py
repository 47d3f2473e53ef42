# GRPO from config/sft_debug.py's run on CPU in seconds, for tests and CI (the expert biases frozen, as in
# config/grpo_tinystories.py):
#   python rl.py config/grpo_debug.py
out_dir = "out-grpo-debug"
init_from = "out-sft-debug"
data_dir = "data/tinystories_instruct"
device = "cpu"
max_iters = 4
eval_interval = 2
eval_prompts = 8
prompts_per_step = 2
group_size = 4
prompt_len = 24
max_new_tokens = 24
ppo_epochs = 2
kl_coef = 0.05
learning_rate = 1e-4
