"""
GRPO (Group Relative Policy Optimization, DeepSeekMath's and R1's RL) on the words task, from an SFT run:

    python rl.py config/grpo_tinystories.py                                        # train into out-grpo
    python rl.py config/grpo_tinystories.py --eval_only=True --init_from=out-sft   # its mean reward

The task, TinyStoriesInstruct's "write a story that uses these words", and its reward live here too
(prepare.py --instruct builds the SFT data with them): the prompt is "Features: Dialogue\\nWords: quit, oak,
gloomy\\nStory: " (the Features line for stories with dialogue), the completion a story and <|endoftext|>.
"""
import json
import os
import random
import re
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from configurator import configure, fail
from model import CheckpointError, load_checkpoint, pick_device, save_checkpoint
from prepare import PrepareError, load_encoding
from sample import generate

# function words and the commonest story words: never one of the 3 chosen words
STOP_WORDS = frozenset("""the and was were she he they them their her his him you your our we its it's that
this these those there then than with for from into onto upon out off over under but not all any some one
two had has have did does are too very can could would should will just what when where who why how said
says say see saw got get went go goes came come like liked time day once upon little big never about after
before again because every always also much many more most only even""".split())


def prompt_of(words, features=()):
    return (f"Features: {', '.join(features)}\n" if features else "") + f"Words: {', '.join(words)}\nStory: "


def choose_words(story, k=3):
    """k distinct content words of the story (lowercase in it: no names), chosen with a seed taken from the
    story's text, so the same story gets the same words on any machine; None if it has fewer."""
    words = sorted({w for w in re.findall(r"\b[a-z]{3,}\b", story) if w not in STOP_WORDS})
    return random.Random(zlib.crc32(story.encode())).sample(words, k) if len(words) >= k else None


def to_example(text):
    """One record -> (prompt, story), or None where there is no task. A TinyStoriesInstruct record (lines
    'Features: ...', 'Words: ...', 'Summary: ...', then 'Story: ...') keeps its words and features; a plain
    story gets 3 of its words, and 'Features: Dialogue' when someone in it speaks."""
    head, *story = re.split(r"(?m)^Story:", text, maxsplit=1)
    if story:
        words, features, story = words_of(head), words_of(head, "Features"), story[0].strip()
        return (prompt_of(words, features), story) if words and story else None
    words = choose_words(text)
    return words and (prompt_of(words, ["Dialogue"] if re.search("[\"\u201c]", text) else []), text)


def words_of(prompt, key="Words"):
    """The words (key="Features": the features) that a prompt or a record asks for."""
    return [s.strip() for s in (re.findall(rf"(?m)^{key}:(.*)$", prompt) or [""])[-1].split(",") if s.strip()]


def uses(story, word):
    """Whether the story has the word, whole, in any case, or a simple inflection of it: -s, -es, -d, -ed,
    -ing, and for a final e or y: dance -> dancing, cry -> cries, cried."""
    w = word.lower()
    stem = re.escape(w[:-1]) if w[-1:] in ("e", "y") and len(w) > 2 else None
    forms = rf"{re.escape(w)}(?:s|es|d|ed|ing)?" + (rf"|{stem}(?:ing|ies|ied)" if stem else "")
    return re.search(rf"\b(?:{forms})\b", story.lower()) is not None


def reward(story: str, words: list, ended: bool = True) -> float:
    """The fraction of the words that the story uses (uses()), in [0, 1]; 0 for a story that never ended
    (no end-of-text within max_new_tokens). A plain function: a learned reward model can replace it."""
    return sum(uses(story, w) for w in words) / len(words) if ended and words else 0.0


# ---- GRPO. Every knob below is a global that a config file or --key=value can override (configurator.py).
out_dir = "out-grpo"
init_from = "out-sft"           # a run's out_dir (its ckpt.pt: the start, the KL reference), or 'resume'
data_dir = "data/tinystories_instruct"  # prompts from its val split (held out from SFT)
eval_only = False               # print the mean reward on the fixed held-out prompts and exit; writes nothing
eval_prompts = 64               # that fixed set: the val split's first prompts (never trained on)
eval_interval = 20              # evaluate and save every this many steps
eval_temperature = 0.8          # sampling temperature of the evaluation (the same seed every time)
wandb_log = False               # works with WANDB_MODE=offline too
wandb_project = "deepseek-v3-tinystories"
wandb_run_name = "grpo"
# GRPO: a group of group_size completions per prompt, each completion's advantage its reward's z-score in it
max_iters = 100                 # steps: rollouts of prompts_per_step x group_size completions, then updates
prompts_per_step = 16
group_size = 8                  # G >= 2: the advantage compares a prompt's completions with each other
prompt_len = 48                 # context tokens per row: the prompt, and the end of the story before
max_new_tokens = 256            # a completion without <|endoftext|> by then gets reward 0
temperature = 1.0               # rollout sampling temperature
ppo_epochs = 1                  # updates per batch of rollouts; > 1 reuses them with PPO's clipped ratio
clip_eps = 0.2                  # the ratio pi / pi_rollout is clipped to [1 - clip_eps, 1 + clip_eps]
kl_coef = 0.0                   # weight of the k3 KL to the frozen init_from model; 0: none held
learning_rate = 1e-5
weight_decay = 0.0
grad_clip = 1.0
seed = 1337
device = "auto"                 # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                  # 'auto' (by the GPU: model.pick_device), 'float32', 'bfloat16'
cuda_graph = True               # rollouts replay each decoding step as a CUDA graph (CUDA only)


def load_prompts(enc):
    """Rows (N, prompt_len) of the val split's tokens that end where a story starts (so they hold its prompt,
    and before it the end of the story before, as in training), and each row's words."""
    paths = [os.path.join(data_dir, f"val{ext}.bin") for ext in ("", ".mask")]
    if not all(map(os.path.isfile, paths)):
        fail(f"{paths[0]} and {paths[1]} hold the prompts: run `python prepare.py --instruct` first")
    ids, mask = np.fromfile(paths[0], np.uint16).astype(np.int64), np.fromfile(paths[1], np.uint8)
    if len(ids) != len(mask):
        fail(f"{paths[1]} is not one byte per token of {paths[0]}: re-run prepare.py --instruct")
    rows, words = [], []
    for e in np.flatnonzero((mask[1:] == 1) & (mask[:-1] == 0)) + 1:  # each story's first token
        ctx = ids[max(0, e - prompt_len):e]
        if len(ctx) == prompt_len and (eot := np.flatnonzero(ctx == enc.eot_token)).size:
            rows.append(ctx)
            words.append(words_of(enc.decode(ctx[eot[-1] + 1:].tolist())))
    if len(rows) <= eval_prompts:
        fail(f"{paths[0]} has {len(rows)} prompts that fit prompt_len={prompt_len} tokens, not more than "
             f"eval_prompts={eval_prompts}: prepare more stories, or raise prompt_len")
    return torch.tensor(np.stack(rows)), words


def rollout(model, rows, words, temp, gen, enc, ctx):
    """Samples one completion per row (B, prompt_len) with sample.py's cached decoder and scores it: the
    sequences (B, prompt_len + n), the mask of their completion tokens (up to and with <|endoftext|>),
    rewards (B,), the words-used rates, whether each ended, its length and its text."""
    with ctx:
        seq = generate(model, rows, max_new_tokens, temp, None, 1.0, enc.eot_token, gen,
                       vocab_size=enc.n_vocab, cuda_graph=cuda_graph)[0]
    comp = seq[:, prompt_len:].tolist()
    ended = [enc.eot_token in c for c in comp]
    n = [c.index(enc.eot_token) + 1 if e else len(c) for c, e in zip(comp, ended)]
    texts = [enc.decode(c[:k - e]) for c, k, e in zip(comp, n, ended)]
    r = [reward(t, w, e) for t, w, e in zip(texts, words, ended)]  # (a learned one may err)
    if bad := [x for x in r if not (isinstance(x, (int, float)) and 0 <= x <= 1)]:
        fail(f"reward() must return one number in [0, 1] per completion, got {bad[0]!r}")
    at = torch.arange(seq.shape[1] - prompt_len, device=seq.device)
    return {"seq": seq, "mask": (at[None] < torch.tensor(n, device=seq.device)[:, None]).float(),
            "reward": np.array(r, dtype=float), "ended": np.array(ended),
            "used": np.array([reward(t, w) for t, w in zip(texts, words)]), "n": np.array(n), "texts": texts}


def advantages(r, G, eps=1e-4):
    """GRPO's group-relative advantage (r - mean) / (std + eps) among the G completions of each prompt (a
    prompt's rows are consecutive); the std is the unbiased one."""
    g = r.view(-1, G)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).flatten()


def token_logp(model, seq):
    """log pi(token | the tokens before it) of each completion token of seq (B, prompt_len + n): (B, n)."""
    logits = model(seq[:, :-1], seq[:, 1:])[0][:, prompt_len - 1:].float()  # (targets: logits everywhere)
    return -F.cross_entropy(logits.transpose(1, 2), seq[:, prompt_len:], reduction="none")


def grpo_loss(logp, old_logp, ref_logp, adv, mask):
    """-mean over completion tokens of min(ratio * A, clip(ratio) * A) - kl_coef * KL, with ratio =
    pi / pi_rollout and DeepSeekMath's KL estimate pi_ref / pi - log(pi_ref / pi) - 1. -> (loss, mean KL)."""
    ratio, a = torch.exp(logp - old_logp), adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    d = ref_logp - logp if ref_logp is not None else torch.zeros_like(logp)
    kl = torch.exp(d) - d - 1
    n = mask.sum().clamp_min(1)
    return -((surrogate - kl_coef * kl) * mask).sum() / n, (kl.detach() * mask).sum() / n


def evaluate(model, rows, words, enc, ctx, show=0):
    """Mean reward, words-used rate, ended rate and length on the fixed held-out prompts, sampled with the
    same seed every time (so checkpoints compare); prints the first `show` stories."""
    gen, B, outs = torch.Generator(rows.device).manual_seed(seed), prompts_per_step * group_size, []
    for i in range(0, len(rows), B):
        outs.append(rollout(model, rows[i:i + B], words[i:i + B], eval_temperature, gen, enc, ctx))
    for i in range(show):
        print(f"--- Words: {', '.join(words[i])} (reward {outs[0]['reward'][i]:.2f})\n{outs[0]['texts'][i]}")
    cat = {k: np.concatenate([o[k] for o in outs]) for k in ("reward", "used", "ended", "n")}
    return {f"eval/{k}": float(v.mean()) for k, v in cat.items()}


def setup():
    """Checks the knobs, loads the policy (and the reference), the prompts and the tokenizer."""
    if group_size < 2:
        fail(f"group_size={group_size}: GRPO needs >= 2 completions per prompt (the advantage compares them)")
    if min(prompts_per_step, ppo_epochs, max_new_tokens, eval_interval) < 1 or not 0 < clip_eps < 1:
        fail("prompts_per_step, ppo_epochs, max_new_tokens, eval_interval must be >= 1, clip_eps in (0, 1)")
    try:
        dev, dt, _, experts, _ = pick_device(device, dtype, compile=False)
        enc = load_encoding()
    except (ValueError, PrepareError) as e:
        fail(e)
    if dt == "float16":
        fail("dtype='float16' (auto's pick without bf16) would need a grad scaler: use --dtype=float32")
    ctx = torch.autocast("cuda", torch.bfloat16, cache_enabled=False) if dt == "bfloat16" else nullcontext()
    src = os.path.join(out_dir if init_from == "resume" else init_from, "ckpt.pt")
    old = [f for f in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if old and init_from != "resume" and not eval_only:  # never replace a run, nor mix two in one log
        fail(f"{out_dir} holds an earlier run ({', '.join(old)}): continue it with --init_from=resume, "
             "or use another --out_dir, or remove it")
    try:
        model, ckpt = load_checkpoint(src, moe_impl=experts)
        base = ckpt.get("base", src) if init_from == "resume" else src  # the KL reference: the SFT model
        ref = load_checkpoint(base, moe_impl=experts)[0].to(dev).eval() if kl_coef and not eval_only else None
    except CheckpointError as e:
        fail(f"init_from='{init_from}': {e}")
    if prompt_len + max_new_tokens > model.args.block_size:
        fail(f"prompt_len + max_new_tokens = {prompt_len + max_new_tokens} exceeds the model's block_size="
             f"{model.args.block_size}")
    # eval mode throughout: no dropout, no MTP loss (the MTP module is left as SFT made it), no balance loss,
    # and no expert loads counted, so the expert biases stay frozen during RL
    model.to(dev).eval()
    rows, words = load_prompts(enc)
    return model, ref, ckpt, base, enc, ctx, rows.to(dev), words


def main():
    model, ref, ckpt, base, enc, ctx, rows, words = setup()
    held = (rows[:eval_prompts], words[:eval_prompts], enc, ctx)  # the fixed evaluation set
    if eval_only:
        stats = evaluate(model, *held, show=3)
        print(f"mean reward {stats['eval/reward']:.4f} on {eval_prompts} held-out prompts (words used "
              f"{stats['eval/used']:.4f}, ended {stats['eval/ended']:.4f}, {stats['eval/n']:.1f} tokens)")
        return
    rows, words = rows[eval_prompts:], words[eval_prompts:]
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95))
    if init_from == "resume":  # exact: the weights, the optimizer's state, and each step's seeds
        optimizer.load_state_dict(ckpt["optimizer"])
    it = start = ckpt["iter_num"] if init_from == "resume" else 0
    config = {k: v for k, v in globals().items() if k[0] != "_" and isinstance(v, (int, float, bool, str))}
    if wandb_log:
        try:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)
        except Exception as e:  # not installed, no API key, ...: whatever it raises, one line
            fail(f"wandb_log=True: {' '.join(str(e).split())[:200]} (or log offline: WANDB_MODE=offline)")

    def log(record):
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_log:
            wandb.log(record)
    while True:
        if it >= max_iters or it % eval_interval == 0 and (it > start or it == 0):  # (resumed: done)
            log({"iter": it, **evaluate(model, *held)})
            if it > start:  # (atomic: a kill leaves the old checkpoint or the new one)
                save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args":
                    asdict(model.args), "iter_num": it, "config": config, "base": base})
        if it >= max_iters:
            break
        log({"iter": it, **step(model, ref, optimizer, rows, words, enc, ctx, it)})
        it += 1


def step(model, ref, optimizer, rows, words, enc, ctx, it):
    """One GRPO step: rollouts of prompts_per_step prompts x group_size, drawn with generators seeded by the
    step (a resumed run draws the same), then ppo_epochs updates on them."""
    key = (seed * 1_000_003 + it) % 2**63
    torch.manual_seed(key)
    pick = torch.randint(len(rows), (prompts_per_step,), generator=torch.Generator().manual_seed(key))
    pick = pick.repeat_interleave(group_size)
    t0 = time.time()
    out = rollout(model, rows[pick], [words[i] for i in pick.tolist()], temperature,
                  torch.Generator(rows.device).manual_seed(key), enc, ctx)
    t_roll = time.time() - t0
    seq, mask = out["seq"], out["mask"]
    adv = advantages(torch.tensor(out["reward"], dtype=torch.float, device=seq.device), group_size)
    with torch.no_grad(), ctx:
        ref_logp = token_logp(ref, seq) if ref is not None else None
    old_logp = None
    for _ in range(ppo_epochs):
        with ctx:
            logp = token_logp(model, seq)
            old_logp = logp.detach() if old_logp is None else old_logp  # the rollout policy's log-probs
            loss, kl = grpo_loss(logp, old_logp, ref_logp, adv, mask)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))  # (0: no clip)
        model.optimizer_step(optimizer, norm)  # (a non-finite step is skipped)
        optimizer.zero_grad(set_to_none=True)
    return {"reward": float(out["reward"].mean()), "used": float(out["used"].mean()),
            "ended": float(out["ended"].mean()), "n": float(out["n"].mean()), "kl": kl.item(),
            "loss": loss.item(), "grad_norm": norm.item(), "ms": (time.time() - t0) * 1000,
            "rollout_tok_per_s": float(out["n"].sum() / t_roll)}


if __name__ == "__main__":
    configure(globals())
    try:
        main()
    except KeyboardInterrupt:  # checkpoints are atomic: what was saved stays whole
        sys.exit("error: interrupted")
