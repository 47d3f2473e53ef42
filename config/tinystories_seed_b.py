# Seed B's setup (trained on an RTX 3090, 24 GB): DeepSeek-V2-style routing on the 16x4 architecture.
#   python train.py config/tinystories_seed_b.py
# V2's router: softmax affinities, no balancing bias (bias_update_speed does nothing), a balance loss
# instead (here V3's sequence-wise one, at V2's expert-level weight), and no multi-token prediction.
# Batch 8 with 4 accumulation steps: 16,384 tokens per optimizer step in a 24 GB card.
out_dir = "out-seed-b"
wandb_run_name = "seed-b"

batch_size = 8
gradient_accumulation_steps = 4
block_size = 512

score_func = "softmax"
seq_aux_alpha = 3e-3
mtp_depth = 0
