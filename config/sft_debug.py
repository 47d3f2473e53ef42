# SFT of the debug model (config/tinystories_debug.py's architecture) on CPU in seconds, for tests and CI:
#   python train.py config/tinystories_debug.py                   # a base in out-debug
#   python prepare.py --instruct --input stories.txt              # data/tinystories_instruct
#   python train.py config/sft_debug.py
# The expert-bias update stays on, as in config/sft_tinystories.py.
exec(open("config/tinystories_debug.py").read())  # its architecture (run from the repository root)
out_dir = "out-sft-debug"
data_dir = "data/tinystories_instruct"
init_from = "out-debug"
max_iters = 20
lr_decay_iters = 20
warmup_iters = 2
eval_interval = 10
learning_rate = 1e-3
min_lr = 1e-4
