# SFT (supervised fine-tuning, DeepSeek's first post-training step) of the 16x4 on rl.py's words task:
#   python prepare.py --instruct          # data/tinystories_instruct: prompt + story, loss masks
#   python train.py config/sft_tinystories.py --init_from=out-tinystories
# From a pretrained run's weights (init_from: its out_dir; the architecture must match, here ModelArgs'
# defaults, the 16x4), with a fresh optimizer and step count; the loss is on the story tokens only.
# The expert-bias update stays on at the pretraining speed: SFT is next-token training, and the prompts
# shift the experts' loads, which the bias keeps balanced as it did in pretraining.
out_dir = "out-sft"
data_dir = "data/tinystories_instruct"
init_from = "out-tinystories"
wandb_run_name = "sft-16x4"

batch_size = 32
block_size = 512
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 50
eval_interval = 200
eval_iters = 20
learning_rate = 3e-4       # a tenth of pretraining's: adapt to the format, keep what pretraining learned
min_lr = 3e-5
bias_update_speed = 1e-3
