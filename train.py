"""Train DeepSeek-V3 on TinyStories: `python train.py config/tinystories_16x4.py --batch_size=16`, or on
2 GPUs `torchrun --standalone --nproc_per_node=2 train.py config/tinystories_16x4.py`. Every knob below
is a global that a config file or --key=value overrides (configurator.py)."""

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import parallel
from model import CheckpointError, DeepSeekV3, ModelArgs, load_checkpoint, pick_device, save_checkpoint

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-tinystories"
eval_interval = 500
log_interval = 10
eval_iters = 50
eval_only = False               # evaluate init_from's weights, print the losses and exit; writes nothing
always_save_checkpoint = False  # save every eval, not only when val loss improves
keep_last = True                # keep the previous checkpoint as ckpt.prev.pt
init_from = "scratch"           # 'scratch', 'resume' (out_dir/ckpt.pt), or a run's out_dir (fine-tune it)
wandb_log = False               # works with WANDB_MODE=offline too
wandb_project = "deepseek-v3-tinystories"
wandb_run_name = "run"
# data
data_dir = "data/tinystories"   # train.bin / val.bin / meta.json from prepare.py
gradient_accumulation_steps = 1  # micro-steps per optimizer step, over all ranks together
batch_size = 64                 # sequences per micro-step (per rank, unless ranks share micro-batches)
seed = 1337
# model: every ModelArgs field is a knob here too; the defaults are the 16x4 flagship (model.py)
globals().update({f.name: f.default for f in fields(ModelArgs)})
# optimizer: AdamW with cosine decay after a linear warm-up
learning_rate = 1e-3
max_iters = 20000               # optimizer steps in all (a resumed run goes on up to this many)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # 0 disables clipping (the norm is still computed and logged)
warmup_iters = 500
lr_decay_iters = 20000          # ~= max_iters per Chinchilla-style schedules
min_lr = 1e-4                   # ~= learning_rate / 10
max_bad_steps = 5               # non-finite loss/grad steps in a row before giving up
# system
device = "auto"                 # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                  # 'auto' (by the GPU: model.pick_device), 'float32', 'bfloat16', 'float16'
compile = None                  # torch.compile the model; None = on CUDA GPUs that Triton runs on
use_checkpointing = False       # activation checkpointing per block: less memory, ~1/3 more compute
use_liger = False               # Liger's fused linear cross-entropy (CUDA + liger-kernel installed)
fsdp = False                    # under torchrun: shard params, grads and optimizer state per block (FSDP2)
ep = 1                          # under torchrun: expert parallelism, ep ranks sharing out the routed experts
# -----------------------------------------------------------------------------
from configurator import configure, fail as die  # noqa: E402  (die: one line on stderr, exit 2)
configure(globals())
config = {k: v for k, v in globals().items() if k[0] != "_" and isinstance(v, (int, float, bool, str))}

# ---- distributed setup -----------------------------------------------------------------------
ddp = "RANK" in os.environ  # under torchrun
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
# the ranks share out the micro-steps; where those do not go round, a group of `share` ranks splits each one
rank_groups = math.gcd(gradient_accumulation_steps, world_size)
share = world_size // rank_groups
if batch_size % share:
    die(f"{gradient_accumulation_steps} micro-step(s) of batch_size={batch_size} cannot be shared out "
        f"evenly over {world_size} ranks: make batch_size divisible by {share}")
gradient_accumulation_steps //= rank_groups
rows = batch_size // share  # sequences per rank per micro-step
rank_group, part = rank // share, rank % share  # which micro-steps this rank runs, which slice of them
master = rank == 0

# ---- device, precision and model ------------------------------------------------------------
try:  # what this device cannot run, or impossible model args (with moe_impl resolved): one line
    device, dtype, compile, moe_impl, device_line = pick_device(device, dtype, compile, moe_impl)
    margs = ModelArgs(**{f.name: globals()[f.name] for f in fields(ModelArgs)})
except ValueError as e:
    die(str(e))
device_type = device.split(":")[0]
if ddp and device_type == "cuda":
    device = f"cuda:{local_rank}"
    torch.cuda.set_device(device)
if why := parallel.config_error(ddp, world_size, fsdp, ep, n_routed_experts, dtype):
    die(why)
torch.manual_seed(seed)  # the same initial weights on every rank (FSDP shards them as they are)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # fp16 grads underflow unscaled

# ---- data ------------------------------------------------------------------------------------
meta_path, masked = os.path.join(data_dir, "meta.json"), False  # masked: only the marked targets count
if os.path.isfile(meta_path):
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        meta_vocab, masked = int(meta["vocab_size"]), meta.get("instruct") is True
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        die(f"{meta_path} is unreadable ({e}): re-run prepare.py")
    if meta_vocab > vocab_size:
        die(f"the data's vocabulary ({meta_vocab} tokens, {meta_path}) does not fit vocab_size={vocab_size}")
for split in ("train", "val"):
    path, mask_path = os.path.join(data_dir, f"{split}.bin"), os.path.join(data_dir, f"{split}.mask.bin")
    if not os.path.isfile(path):
        die(f"{path} not found: run `python prepare.py` first (or --input FILES for local text)")
    if (size := os.path.getsize(path)) % 2:
        die(f"{path} is not a whole number of uint16 tokens (truncated?): re-run prepare.py")
    if size // 2 <= batch_size * block_size:
        die(f"{path} holds {size // 2} tokens, fewer than one batch (batch_size x block_size + 1 = "
            f"{batch_size * block_size + 1}): lower batch_size or block_size, or prepare more data")
    if masked and not (os.path.isfile(mask_path) and os.path.getsize(mask_path) == size // 2):
        die(f"{mask_path} is missing or not one byte per token of {split}.bin, but meta.json says the data "
            "is instruct data (the masks say which tokens carry the loss): re-run prepare.py --instruct")
tokens_per_iter = gradient_accumulation_steps * world_size * rows * block_size
loss_terms = "ce" + (f" + {mtp_lambda:g} mtp" if mtp_depth else "") + (" + aux" if seq_aux_alpha else "")

def get_batch(split, it, micro):
    """This rank's slice of micro-batch (it, micro), seeded by both: the same on resume, at any world size."""
    # re-open the memmap every batch: a long-lived np.memmap leaks memory (nanoGPT's note)
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    key = ((seed * 2 + (split == "val")) * 1_000_003 + it + 1) * 65_537 + micro  # no hash(): it is salted
    g = torch.Generator().manual_seed(key % 2**63)
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=g)[part * rows:(part + 1) * rows]
    xy = np.stack([data[i:i + block_size + 1] for i in ix.tolist()]).astype(np.int64)
    if xy.max() >= vocab_size:
        die(f"{split}.bin holds token id {xy.max()} >= vocab_size={vocab_size}: wrong data or tokenizer")
    x, y = torch.from_numpy(xy[:, :-1]), torch.from_numpy(xy[:, 1:])
    if masked:  # a target the mask leaves out (a prompt's token) is -1, which the cross-entropies ignore
        mask = np.memmap(os.path.join(data_dir, f"{split}.mask.bin"), dtype=np.uint8, mode="r")
        y = y.masked_fill(torch.from_numpy(np.stack([mask[i + 1:i + 1 + block_size] for i in ix]) == 0), -1)
    if device_type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

# ---- model -----------------------------------------------------------------------------------
iter_num, best_val_loss, ckpt = 0, 1e9, {}
ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
if master and not eval_only:  # out_dir, before any work (eval_only writes nothing)
    old = [f for f in ("ckpt.pt", "ckpt.prev.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if init_from != "resume" and old:  # never replace a run's checkpoints, nor mix two runs in one log
        hint = "continue it with --init_from=resume, or " if "ckpt.pt" in old else ""
        die(f"{out_dir} holds an earlier run ({', '.join(old)}): {hint}use another --out_dir, or remove it")
    parent = out_dir  # out_dir is made at the first write: a run that writes nothing leaves no folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "."
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        die(f"cannot write to out_dir={out_dir}: {parent} is not a writable folder (use another --out_dir)")

stop_signal = None
def on_signal(signum, frame):
    """Ctrl-C or SIGTERM: stop after this step (saving it) or abandon the eval; a second one quits at once."""
    global stop_signal
    stop_signal = signum
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if master:
        print(f"{signal.Signals(signum).name}: stopping at the end of this step or eval batch, saving any new"
              " steps (Ctrl-C again quits at once)", file=sys.stderr, flush=True)

signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
model = DeepSeekV3(margs)  # (on resume: with this run's training knobs, and the checkpoint's weights)
if init_from != "scratch":
    src = ckpt_path if init_from == "resume" else os.path.join(init_from, "ckpt.pt")
    try:
        old, ckpt = load_checkpoint(src)
    except CheckpointError as e:
        die(f"init_from='{init_from}': {e}")
    if diff := margs.differences(old.args):  # training-only knobs may change on resume (fine-tuning)
        die(f"{src} is a different architecture than the config asks for: "
            + ", ".join(f"{k}={getattr(old.args, k)!r} (config: {getattr(margs, k)!r})" for k in diff[:4]))
    model.load_state_dict(old.state_dict())
    ckpt = ckpt if init_from == "resume" else {}  # another run's weights: a fresh optimizer and step count
    iter_num, best_val_loss = int(ckpt.get("iter_num", 0)), float(ckpt.get("best_val_loss", 1e9))
    if iter_num >= max_iters and not eval_only:  # a finished run: nothing to train, nothing to write
        print(f"{ckpt_path} has done all max_iters={max_iters} steps: nothing to do (raise max_iters)")
        sys.exit(0)
if wandb_log and master and not eval_only:
    try:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    except Exception as e:  # not installed, no API key, a bad WANDB_MODE, ...: whatever it is, one line
        why = "wandb is not installed: pip install wandb" if isinstance(e, ImportError) else e
        die(f"wandb_log=True: {(str(why).strip().splitlines() or [type(e).__name__])[0]} "
            "(or --wandb_log=False, or log offline: WANDB_MODE=offline)")
if ddp:
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
if master:
    print(device_line)
    print("parameters: {total:,} total, {active:,} active per token, {embedding:,} embedding, {mtp:,} in MTP"
          .format(**model.get_num_params()))
    print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} rank(s) x {gradient_accumulation_steps} "
          f"micro-steps x {rows} x {block_size})")
saved_iter = iter_num  # the checkpoint holds this state (or, from scratch, there is nothing to save)
mfu_per_tok_s = model.estimate_mfu(1, 989e12 * world_size)  # H100s' bf16 peak; before EP shares the experts
mesh = parallel.shard_experts(model, ep, device_type)  # expert parallelism: this rank's share (None: ep=1)
model.to(device)
model.use_checkpointing = use_checkpointing
if use_liger:
    try:
        if device_type != "cuda" or torch.cuda.get_device_capability(device) < (7, 0):
            raise ImportError("its Triton kernels need CUDA and compute capability 7.0+")
        model.use_liger()
    except ImportError as e:
        if master:
            print(f"note: use_liger=True but Liger kernels are unavailable ({e}); using plain PyTorch")
raw_model = model
if fsdp:  # FSDP2: each block (and MTP module) is one unit, gathered for its forward/backward, freed after
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for unit in list(model.blocks) + list(model.mtp):
        if compile:
            unit.compile(dynamic=False)  # per block: FSDP's hooks stay outside the compiled graphs
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
if "optimizer" in ckpt:  # stored unsharded and keyed by parameter name: loads at any world size
    parallel.load_optimizer_state(model, optimizer, ckpt["optimizer"], mesh)  # (FSDP, EP: their shards)
elif master and init_from == "resume":
    print("note: the checkpoint has no optimizer state; starting a fresh optimizer")
if ckpt.get("scaler"):  # (empty when saved without fp16)
    scaler.load_state_dict(ckpt["scaler"])
ckpt = old = None  # free the memory
if compile:  # warm restarts reuse AOTAutograd's cache; it skips autocast regions and autograd.Functions
    import torch._functorch.config, torch._inductor.config  # unless told they are safe (ours: traced whole)
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    torch._inductor.config.unsafe_marked_cacheable_functions = {
        f"torch.amp.autocast_mode.{f}": torch.__version__ for f in ("_enter_autocast", "_exit_autocast")}
if compile and not fsdp:  # one CUDA process replays it as CUDA graphs: one-by-one launches starve the GPU
    # (not with gradient accumulation: a replay overwrites the .grad buffers the micro-step before left)
    graphs = device_type == "cuda" and not ddp and gradient_accumulation_steps == 1
    model = torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None)
if ddp and not fsdp:  # biases: all-reduced, not broadcast; big buckets: each boundary splits a compiled graph
    DDP._set_params_and_buffers_to_ignore_for_model(model, parallel.ddp_ignores(model, mesh))
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False,
                bucket_cap_mb=100, gradient_as_bucket_view=True)

def read_flags(stop=torch.zeros((), device=device)):
    """Reports unread's skipped steps, stops after max_bad_steps in a row; -> did a signal reach any rank?"""
    global bad_steps
    stop.fill_(float(stop_signal is not None))  # fill_, never torch.tensor(..., device): no sync
    if ddp:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    stop_any, *flags = torch.stack([stop, *(f for _, *fs in unread for f in fs)]).tolist()
    for (it, *_), ok, loss_ok in zip(unread, flags[::2], flags[1::2]):
        overflow = scaler.is_enabled() and loss_ok  # fp16: the grad scaler finding its scale, not a bad step
        bad_steps = 0 if ok else bad_steps + (not overflow)
        if not ok and master:
            print(f"iter {it}: fp16 gradients overflowed, step skipped (loss scale lowered)" if overflow else
                  f"iter {it}: non-finite loss or gradient norm, step skipped ({bad_steps}/{max_bad_steps})")
        if bad_steps >= max_bad_steps:
            die(f"{bad_steps} non-finite steps in a row at iter {it}; stopping. The last good "
                f"checkpoint ({ckpt_path}) is untouched: lower learning_rate or check the data")
    unread.clear()
    return bool(stop_any)

@torch.no_grad()
def estimate_loss():
    """Main-model cross-entropy (no MTP) over eval_iters fixed batches per split; None on a signal."""
    out, t_note = {}, time.time()
    model.eval()
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters, device=device)
        for k in range(eval_iters):
            if read_flags():
                return None
            if master and time.time() - t_note > 10:  # a long eval (a CPU) shows that it is alive
                print(f"  eval at iter {iter_num}: {split} batch {k}/{eval_iters}", flush=True)
                t_note = time.time()
            X, Y = get_batch(split, -1, k * rank_groups + rank_group)  # the same eval batches every time
            with ctx:
                losses[k] = raw_model(X, Y)[1]  # eager: compiling eval mode too would delay step 0
        if ddp:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
        out[split] = losses.mean().item()
    model.train()
    return out

def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = min(1.0, (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters))  # min_lr after the decay
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

def save():
    """Every rank calls it (FSDP, EP gather the shards), rank 0 writes it, unsharded; -> the step it holds."""
    ck = dict(parallel.full_state_dicts(raw_model, optimizer, mesh), model_args=asdict(raw_model.args),
              iter_num=iter_num, best_val_loss=best_val_loss, config=config, scaler=scaler.state_dict())
    if master:
        save_checkpoint(ckpt_path, ck, keep_prev=keep_last)
        print(f"saved checkpoint to {ckpt_path} (iter {iter_num})")
    return iter_num

def log(record):
    os.makedirs(out_dir, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if wandb_log:
        wandb.log(record)

# ---- the loop --------------------------------------------------------------------------------
X, Y = get_batch("train", iter_num, rank_group * gradient_accumulation_steps)
t_window, n_window, bad_steps, unread = time.time(), 0, 0, []  # speed: the mean since the last log line
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # every eval_interval (not at 0 from scratch: the loss is ~ln(vocab_size) there) and the final state
    evaluate = iter_num % eval_interval == 0 and (iter_num > 0 or init_from != "scratch")
    if eval_only or evaluate or iter_num >= max_iters:
        losses = estimate_loss()  # every rank takes part (the losses are all-reduced)
        if losses is None:  # a signal: nothing new to save unless a step ran since the last save
            break
        if master:
            print(f"iter {iter_num}: eval ce train {losses['train']:.4f}, val {losses['val']:.4f}")
            if not eval_only:
                log({"iter": iter_num, "ce/train": losses["train"], "ce/val": losses["val"], "lr": lr})
        if (losses["val"] < best_val_loss or always_save_checkpoint) and iter_num != saved_iter:
            best_val_loss = min(best_val_loss, losses["val"])
            saved_iter = save()
        t_window, n_window = time.time(), 0  # the logged speed leaves evals and saving out
    if eval_only or iter_num >= max_iters:
        break

    torch.manual_seed((seed * 1_000_003 + iter_num) * 4096 + rank)  # dropout and routing noise: exact resumes
    loss_sum = torch.zeros((), device=device)
    for micro in range(gradient_accumulation_steps):
        last = micro == gradient_accumulation_steps - 1
        if fsdp:  # sync gradients only on the last micro-step
            model.set_requires_gradient_sync(last)
        elif ddp:
            model.require_backward_grad_sync = last
        with ctx:
            loss = model(X, Y)[1] / gradient_accumulation_steps
        it, m = (iter_num + 1, 0) if last else (iter_num, micro + 1)  # prefetched while the GPU works
        X, Y = get_batch("train", it, rank_group * gradient_accumulation_steps + m)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    norm = parallel.clip_grad_norm_(raw_model, grad_clip if grad_clip > 0 else math.inf, mesh)
    finite, maxvio = raw_model.optimizer_step(optimizer, norm)  # a non-finite step is skipped on the device
    scaler.update()  # (fp16: a lower scale after an overflow)
    optimizer.zero_grad(set_to_none=True)
    unread.append((iter_num, finite, torch.isfinite(loss_sum)))
    # read where the host waits anyway (a log line, an eval), never mid-run on a GPU; on the CPU, every step
    stop = (iter_num % log_interval == 0 or device_type == "cpu") and read_flags()

    n_window += 1
    if iter_num % log_interval == 0:
        dt = (time.time() - t_window) / n_window  # seconds per iteration
        t_window, n_window = time.time(), 0
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if master:
            lossf, tok_s, gn = loss_sum.item(), tokens_per_iter / dt, norm.item()
            mfu = mfu_per_tok_s * tok_s
            mv = maxvio.item() if maxvio is not None and finite.item() else float("nan")
            print(f"iter {iter_num}: loss {lossf:.4f} ({loss_terms}), lr {lr:.2e}, time {dt * 1000:.0f}ms, "
                  f"{tok_s:,.0f} tok/s, mfu {f'{mfu:.1%}' if device_type == 'cuda' else 'n/a'}, "
                  f"grad norm {gn:.3f}, maxvio {mv:.3f}")
            log({"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tok_per_s": tok_s, "mfu": mfu,
                 "grad_norm": gn, "maxvio": mv})
    iter_num += 1
    if stop:
        break

if iter_num != saved_iter:  # the same on every rank (FSDP's gather needs them all)
    save()  # the end of the run, or a stop after a step
if device_type == "cuda":
    print(f"rank {rank}: peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB")
if ddp:
    dist.barrier()  # no rank tears the group down while another still works in it (rank 0 saving)
    dist.destroy_process_group()
