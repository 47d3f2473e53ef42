"""
Hand a checkpoint to the Hugging Face world, or take one back.

    python export.py --hf_dir=hf-tinystories                    # out-tinystories/ckpt.pt -> HF folder
    python export.py --hf_dir=hf-tinystories --mtp=False        # without the MTP module
    python export.py --from_hf=hf-tinystories --out_dir=out-hf  # HF folder -> out-hf/ckpt.pt

The exported folder is a DeepseekV3ForCausalLM (config.json, model.safetensors in the on-disk
naming of DeepSeek's released weights, generation_config.json) plus GPT-2 tokenizer files built
from tiktoken's "gpt2" encoding, so that offline

    AutoModelForCausalLM.from_pretrained("hf-tinystories")
    AutoTokenizer.from_pretrained("hf-tinystories")

give the same logits and the same token ids as model.py and tiktoken. Writing needs only torch,
safetensors and tiktoken (the tokenizer.json fast file also wants the `tokenizers` package).

The MTP modules go out where DeepSeek puts them: as extra layers model.layers.{n_layer + k}, each
with enorm, hnorm, eh_proj, shared_head.norm, copies of the shared embed_tokens and
shared_head.head, and the block's own attention/MLP weights. transformers' DeepseekV3ForCausalLM
has no module for them: from_pretrained lists them as unexpected keys and drops them, and
generate(use_mtp=True) looks for them only at layer 61, DeepSeek-V3's own size.

--from_hf reads such a folder back (with or without MTP layers; per-expert names or the fused
experts.gate_up_proj / experts.down_proj) into a checkpoint that sample.py and train.py's
init_from='resume' accept. It carries no optimizer state: a resume starts a fresh optimizer.
Settings that transformers can't express (see unsupported()) are refused rather than exported
wrong. Every failure is one 'error: ...' line on stderr and exit code 1, and nothing half-written
is left behind: files are written into a temporary folder/file beside the target and renamed.
"""
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict

from configurator import configure

# torch (and model.py, which needs it) is imported where it is used: it takes seconds to load, and
# the mistakes people make most (a wrong flag or path) should be answered at once

EOT_ID = 50256             # GPT-2's <|endoftext|>: bos, eos and the padding id for generate()
EOT = "<|endoftext|>"
GPT2_VOCAB = 50257         # tokens of tiktoken's "gpt2" encoding
LATENT_NORM_EPS = 1e-6            # the eps transformers gives q_a_layernorm / kv_a_layernorm, whatever rms_norm_eps says

# DeepseekV3Config's defaults (transformers 5.x): what transformers uses for a key config.json lacks
HF_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=None, n_shared_experts=1,
    n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
    num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, hidden_act="silu",
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
    attention_bias=False,
)

# per-block names, ours -> transformers' (and DeepSeek's on-disk checkpoints')
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    # dense MLP
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    # MoE: router, balancing bias, shared experts (one MLP of n_shared_experts * moe_inter_dim)
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
}
# routed experts: our 3-D tensors, one slice per expert on disk
EXPERT_NAMES = {"ffn.w1": "gate_proj", "ffn.w3": "up_proj", "ffn.w2": "down_proj"}
MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
             "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}


class ExportError(Exception):
    """Bad input or a model transformers can't express: main() prints it as one line, exits 1."""


def first_line(e):
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else "") or type(e).__name__


# -----------------------------------------------------------------------------
# the name map, used in both directions

def name_map(args, state_keys):
    """-> {hf name: (our state_dict key, expert index or None)} for every tensor of our state dict
    (the tied head excepted). MTP module k becomes layer n_layer + k."""
    out = {}
    for key in state_keys:
        if key == "tok_emb.weight":
            out["model.embed_tokens.weight"] = (key, None)
        elif key == "norm.weight":
            out["model.norm.weight"] = (key, None)
        elif key == "head.weight":
            if not args.tie_embeddings:
                out["lm_head.weight"] = (key, None)
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key) or re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", key)
            if m:
                layer = int(m.group(1)) + (args.n_layer if key.startswith("mtp.") else 0)
                prefix, rest = f"model.layers.{layer}.", m.group(2)
                if rest in EXPERT_NAMES:
                    for j in range(args.n_routed_experts):
                        out[f"{prefix}mlp.experts.{j}.{EXPERT_NAMES[rest]}.weight"] = (key, j)
                elif rest in BLOCK_NAMES:
                    out[prefix + BLOCK_NAMES[rest]] = (key, None)
                else:
                    raise AssertionError(f"no transformers name for {key}")
                continue
            m = re.fullmatch(r"mtp\.(\d+)\.(.+)", key)
            if not m or m.group(2) not in MTP_NAMES:
                raise AssertionError(f"no transformers name for {key}")
            out[f"model.layers.{args.n_layer + int(m.group(1))}.{MTP_NAMES[m.group(2)]}"] = (key, None)
    return out


def mtp_copies(args, depth):
    """The shared embedding and head each MTP layer carries a copy of, as in DeepSeek's weights."""
    out = {}
    for k in range(depth):
        layer = args.n_layer + k
        out[f"model.layers.{layer}.embed_tokens.weight"] = "tok_emb.weight"
        out[f"model.layers.{layer}.shared_head.head.weight"] = "head.weight"
    return out


def empty_shared(args, depth):
    """transformers always builds shared_experts (n_shared_experts * moe_inter_dim wide): with none,
    a zero-width MLP that adds exactly 0. Its empty weights go out too, so nothing loads as 'missing'."""
    import torch
    if args.n_routed_experts == 0 or args.n_shared_experts > 0:
        return {}
    d, out = args.n_embd, {}
    for layer in range(args.n_layer + depth):
        if layer >= args.n_dense_layers:
            p = f"model.layers.{layer}.mlp.shared_experts."
            out[p + "gate_proj.weight"] = torch.zeros(0, d)
            out[p + "up_proj.weight"] = torch.zeros(0, d)
            out[p + "down_proj.weight"] = torch.zeros(d, 0)
    return out


# -----------------------------------------------------------------------------
# configs

def unsupported(args):
    """Why transformers' DeepseekV3 would compute something else than model.py, or None."""
    if args.score_func != "sigmoid":
        return (f"score_func={args.score_func!r} can't be exported: transformers' DeepseekV3 router always "
                "uses sigmoid affinities")
    if args.norm_eps != LATENT_NORM_EPS:
        return (f"norm_eps={args.norm_eps} can't be exported: transformers' DeepseekV3 gives q_a_layernorm and "
                f"kv_a_layernorm a fixed eps of {LATENT_NORM_EPS} (it ignores rms_norm_eps there)")
    if args.n_routed_experts == 1:
        return ("n_routed_experts=1 can't be exported: transformers' DeepseekV3 router ranks expert groups by "
                "their two best scores, so it needs at least 2 routed experts")
    if args.vocab_size < GPT2_VOCAB:
        return (f"vocab_size={args.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB} tokens: "
                "this model was not trained on GPT-2 tokens, and the exported tokenizer would not fit it")
    return None


def hf_config(args, mtp_depth, dtype):
    """config.json of a DeepseekV3ForCausalLM that computes what model.py computes."""
    # transformers 4, vLLM and DeepSeek's code read rope_theta + rope_scaling, transformers 5 rope_parameters
    scaling = None
    if args.rope_factor > 1.0:
        # ours: softmax scale *= (0.1 * mscale * ln(factor) + 1)^2, plain cos/sin. transformers: the former
        # from mscale_all_dim, cos/sin scaled by yarn(mscale) / yarn(mscale_all_dim), 1 when the two are equal
        scaling = {"type": "yarn", "factor": float(args.rope_factor), "beta_fast": args.beta_fast,
                   "beta_slow": args.beta_slow, "original_max_position_embeddings": args.original_seq_len,
                   "mscale": float(args.mscale), "mscale_all_dim": float(args.mscale)}
        if args.mscale == 0:  # transformers reads 0 as 'unset' and would scale cos/sin by yarn(1)
            scaling["attention_factor"] = 1.0
    rope = {"rope_type": "yarn" if scaling else "default", "rope_theta": float(args.rope_theta),
            **{k: v for k, v in (scaling or {}).items() if k != "type"}}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.n_embd,
        "num_hidden_layers": args.n_layer,
        "num_attention_heads": args.n_head,
        "num_key_value_heads": args.n_head,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        # a dense model ("dense twin") is all dense layers
        "first_k_dense_replace": args.n_dense_layers if args.n_routed_experts else args.n_layer,
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "routed_scaling_factor": float(args.route_scale),
        "norm_topk_prob": True,      # ours normalises sigmoid weights over the chosen experts
        "scoring_func": "sigmoid",   # read by DeepSeek's own code and by vLLM/SGLang, not by transformers
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": mtp_depth,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.block_size,
        "rope_parameters": rope,
        "rope_theta": float(args.rope_theta),
        "rope_scaling": scaling,
        "rope_interleave": True,     # our rotary dims are DeepSeek's adjacent pairs
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "pad_token_id": None,        # (a pad id would make the embedding row a padding_idx)
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def args_from_hf_config(cfg, mtp_depth, where):
    """ModelArgs for a DeepseekV3 config.json, or ExportError if model.py computes something else.
    The training-only knobs (ModelArgs.TRAINING_ONLY) get ModelArgs' defaults."""
    from model import ModelArgs
    c = {**HF_DEFAULTS, **cfg}

    def refuse(what):
        raise ExportError(f"{where}: model.py can't compute {what}")

    heads = c["num_attention_heads"]
    if c.get("num_key_value_heads") not in (None, heads):
        refuse(f"num_key_value_heads={c['num_key_value_heads']} != num_attention_heads={heads}")
    if c["hidden_act"] != "silu":
        refuse(f"hidden_act={c['hidden_act']!r} (model.py uses SwiGLU with silu)")
    if c["attention_bias"]:
        refuse("attention_bias=true")
    if not c["rope_interleave"]:
        refuse("rope_interleave=false (model.py rotates DeepSeek's adjacent pairs)")
    if c.get("scoring_func", "sigmoid") != "sigmoid":
        refuse(f"scoring_func={c['scoring_func']!r} (transformers and model.py export only sigmoid)")
    E = c["n_routed_experts"] or 0
    if E > 0 and not c["norm_topk_prob"]:
        refuse("norm_topk_prob=false (model.py always normalises the chosen sigmoid weights)")
    if c["rms_norm_eps"] != LATENT_NORM_EPS:
        refuse(f"rms_norm_eps={c['rms_norm_eps']} (transformers then mixes it with {LATENT_NORM_EPS} in the "
               "latent norms; model.py has one eps)")
    if E > 0 and (c["n_group"] is None or c["topk_group"] is None):
        refuse("n_group/topk_group unset")

    # RoPE: transformers 5 writes rope_parameters; DeepSeek's own files have rope_theta + rope_scaling,
    # which wins where both are present (as in transformers 4 and 5)
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    rope_args = {"rope_theta": float(rope.get("rope_theta", 10000.0))}
    if rope_type == "yarn":
        factor = rope.get("factor")
        if factor is None or "original_max_position_embeddings" not in rope:
            refuse("YaRN without factor/original_max_position_embeddings")
        if factor < 1:
            refuse(f"YaRN factor={factor} < 1")
        if not rope.get("truncate", True):
            refuse("YaRN truncate=false")
        m, m_all = rope.get("mscale") or 0.0, rope.get("mscale_all_dim") or 0.0

        def yarn(scale):
            return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0
        att = rope.get("attention_factor")
        if att is None:
            att = yarn(m) / yarn(m_all) if (m and m_all) else yarn(1.0)
        if abs(att - 1.0) > 1e-12:
            refuse(f"YaRN attention_factor {att:.6g} != 1 (mscale={m}, mscale_all_dim={m_all})")
        betas = [rope.get("beta_fast") or 32, rope.get("beta_slow") or 1]
        if any(b != int(b) for b in betas):
            refuse(f"YaRN beta_fast/beta_slow={betas} (model.py takes integers)")
        rope_args.update(rope_factor=float(factor), original_seq_len=int(rope["original_max_position_embeddings"]),
                         beta_fast=int(betas[0]), beta_slow=int(betas[1]), mscale=float(m_all))
    elif rope_type != "default":
        refuse(f"rope_type={rope_type!r} (model.py has plain RoPE and YaRN)")

    n_layer = c["num_hidden_layers"]
    try:
        return ModelArgs(
            block_size=c["max_position_embeddings"], vocab_size=c["vocab_size"], n_layer=n_layer,
            n_head=heads, n_embd=c["hidden_size"], tie_embeddings=bool(c["tie_word_embeddings"]),
            q_lora_rank=c["q_lora_rank"] or 0, kv_lora_rank=c["kv_lora_rank"],
            qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
            v_head_dim=c["v_head_dim"], inter_dim=c["intermediate_size"],
            n_dense_layers=min(c["first_k_dense_replace"], n_layer) if E > 0 else n_layer,
            moe_inter_dim=c["moe_intermediate_size"], n_routed_experts=E,
            n_shared_experts=c["n_shared_experts"] or 0, n_activated_experts=c["num_experts_per_tok"],
            n_expert_groups=c["n_group"] or 1, n_limited_groups=c["topk_group"] or 1,
            score_func="sigmoid", route_scale=float(c["routed_scaling_factor"]), mtp_depth=mtp_depth,
            norm_eps=float(c["rms_norm_eps"]), **rope_args)
    except (ValueError, TypeError) as e:
        raise ExportError(f"{where}: describes a model that model.py can't build: {e}") from None


# -----------------------------------------------------------------------------
# the GPT-2 tokenizer, from tiktoken

def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters: printable Latin-1
    bytes stand for themselves, the others get the code points from 256 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_TOKENIZER = None


def gpt2_vocab_and_merges():
    """tiktoken's gpt2 ranks as GPT-2's vocab.json (token text -> id) and merges (in rank order).
    Each multi-byte token's merge is found by running BPE on its bytes with only the merges ranked
    below it: what is left is the pair that merges into it."""
    global _TOKENIZER
    if _TOKENIZER is None:
        try:
            import tiktoken
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise ExportError(f"can't load tiktoken's gpt2 encoding ({first_line(e)}); offline, point "
                              "TIKTOKEN_CACHE_DIR at a cache that holds it") from None
        if enc.n_vocab != GPT2_VOCAB or enc.eot_token != EOT_ID:
            raise ExportError(f"tiktoken's gpt2 encoding has {enc.n_vocab} tokens, eot {enc.eot_token}: expected "
                              f"{GPT2_VOCAB}, {EOT_ID}")
        ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_ID)}
        b2u = bytes_to_unicode()
        text = {tok: "".join(b2u[b] for b in tok) for tok in ranks}
        vocab = {text[tok]: i for tok, i in ranks.items()}
        vocab[EOT] = EOT_ID
        merges = []
        for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(tok) == 1:
                continue
            parts = [bytes([b]) for b in tok]
            while len(parts) > 2:
                best, at = r, -1
                for i in range(len(parts) - 1):
                    pr = ranks.get(parts[i] + parts[i + 1], r)
                    if pr < best:
                        best, at = pr, i
                if at < 0:
                    break
                parts[at:at + 2] = [parts[at] + parts[at + 1]]
            assert len(parts) == 2 and parts[0] + parts[1] == tok, tok
            merges.append((text[parts[0]], text[parts[1]]))
        _TOKENIZER = (vocab, merges)
    return _TOKENIZER


def write_tokenizer(folder, block_size):
    vocab, merges = gpt2_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
               "normalized": True, "special": True}
    tok_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "add_prefix_space": False, "add_bos_token": False, "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(EOT_ID): special},
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, f, indent=2)
    try:  # the fast-tokenizer file, when the tokenizers package is there (it comes with transformers)
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        return
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(EOT, special=True, normalized=True)])
    tk.save(os.path.join(folder, "tokenizer.json"))


# -----------------------------------------------------------------------------
# writing without leaving anything half-done

def check_target_dir(path, force, what):
    """A folder we may fill: absent, empty, or (force) holding nothing that looks like ours to keep."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ExportError(f"{what} {path} exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path):
        if not force:
            raise ExportError(f"{what} {path} is not empty (pass --force=True to replace it)")
        precious = [n for n in os.listdir(path) if n.endswith(".pt")]
        if precious:
            raise ExportError(f"{what} {path} holds {precious[0]}: not replacing a folder with checkpoints in "
                              "it, even with --force=True; remove it yourself or pick another folder")


def missing_top(path, what):
    """-> the topmost folder of path that does not exist yet (None if path does): what to remove if
    writing fails. Refuses at once, before any slow work, a path under a file or in a read-only folder."""
    top, up = None, os.path.abspath(path)
    while not os.path.lexists(up):
        top, up = up, os.path.dirname(up)
    if not os.path.isdir(up) or not os.access(up, os.W_OK | os.X_OK):
        raise ExportError(f"can't write {what}: {up} is "
                          + ("not writable" if os.path.isdir(up) else "not a folder"))
    return top


def replace_dir(tmp, path):
    """Move the finished tmp folder to path; a previous path (checked by check_target_dir) goes away."""
    old = None
    if os.path.isdir(path):
        old = tmp + ".old"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# checkpoint -> transformers

def to_hf_state_dict(model, mtp=True):
    args = model.args
    depth = args.mtp_depth if mtp else 0
    sd = model.state_dict()
    keys = [k for k in sd if depth or not k.startswith("mtp.")]
    out = {}
    # (clone: safetensors stores no views, and expert slices, tied and copied tensors share memory)
    for hf_name, (key, j) in name_map(args, keys).items():
        t = sd[key] if j is None else sd[key][j]
        out[hf_name] = t.detach().contiguous().clone()
    for hf_name, key in mtp_copies(args, depth).items():
        out[hf_name] = sd[key].detach().contiguous().clone()
    out.update(empty_shared(args, depth))
    return out


def export_hf(ckpt_path, hf_dir, mtp=True, force=False):
    """Write the checkpoint at ckpt_path as a transformers folder hf_dir. Returns a summary line."""
    if not os.path.isfile(ckpt_path):
        raise ExportError(f"no checkpoint at {ckpt_path} (train one with train.py, or point out_dir at one)")
    check_target_dir(hf_dir, force, "target")
    tmp = f"{os.path.abspath(hf_dir)}.{os.getpid()}.tmp"
    top = missing_top(os.path.dirname(tmp), f"target {hf_dir}")
    from model import CheckpointError, load_checkpoint
    try:
        model, ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    args = model.args
    why = unsupported(args)
    if why:
        raise ExportError(why)
    depth = args.mtp_depth if mtp else 0
    tensors = to_hf_state_dict(model, mtp)
    dtype = model.tok_emb.weight.dtype
    gpt2_vocab_and_merges()  # fails (tiktoken offline) before anything is on disk
    try:
        os.makedirs(tmp)  # (the umask's modes, where tempfile.mkdtemp would make it 0700)
        from safetensors.torch import save_file
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(args, depth, dtype), f, indent=2)
        # safetensors makes its file 0600: give it the mode open() gave config.json (the user's umask)
        shutil.copymode(os.path.join(tmp, "config.json"), os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}, f, indent=2)
        write_tokenizer(tmp, args.block_size)
        replace_dir(tmp, hf_dir)
    except BaseException as e:
        shutil.rmtree(top or tmp, ignore_errors=True)  # (top holds tmp)
        if isinstance(e, OSError):
            raise ExportError(f"can't write {hf_dir}: {e.strerror or e}") from None
        raise
    n = sum(t.numel() for t in tensors.values())
    mtp_note = (f", MTP as layer{'s' if depth > 1 else ''} {args.n_layer}" +
                (f"..{args.n_layer + depth - 1}" if depth > 1 else "") +
                " (transformers' from_pretrained reports those as unexpected and leaves them out; "
                "--mtp=False omits them)") if depth else ", no MTP"
    return (f"exported {ckpt_path} (iter {ckpt.get('iter_num', '?')}) to {hf_dir}: {len(tensors)} tensors, "
            f"{n / 1e6:.2f}M values{mtp_note}")


# -----------------------------------------------------------------------------
# transformers -> checkpoint

def read_hf_config(folder):
    """-> config dict of a transformers DeepseekV3 folder, or ExportError."""
    if not os.path.isdir(folder):
        raise ExportError(f"--from_hf: no folder {folder}")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ExportError(f"{folder} has no config.json: not a transformers model folder")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{cfg_path} is unreadable: {first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{cfg_path} is not a transformers config (not a JSON object)")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "deepseek_v3":
        raise ExportError(f"{folder} holds a {cfg.get('model_type')!r} model"
                          f"{' (' + ', '.join(map(str, archs)) + ')' if archs else ''}, not DeepseekV3")
    quant = cfg.get("quantization_config")
    if quant:
        how = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ExportError(f"{folder} holds quantized weights ({how}): dequantize them first")
    return cfg


def read_hf_weights(folder):
    """-> {name: tensor} from the folder's model.safetensors (or its shards), or ExportError."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ExportError(f"{index} is unreadable: {type(e).__name__}") from None
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        other = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
        raise ExportError(f"{folder} has no model.safetensors" +
                          (f" (only {other[0]}: save it with safe_serialization)" if other else ""))
    from safetensors import safe_open
    tensors = {}
    for name in files:
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except Exception as e:  # missing shard, truncated file, not safetensors at all
            raise ExportError(f"can't read {path}: {first_line(e)}") from None
    return tensors


def unfuse_experts(tensors):
    """transformers' in-memory layout (experts.gate_up_proj (E, 2I, d), experts.down_proj (E, d, I))
    -> the per-expert names, so both load the same way."""
    out = {}
    for k, t in tensors.items():
        m = re.fullmatch(r"(.+\.mlp\.experts)\.(gate_up_proj|down_proj)(\.weight)?", k)
        if not m or t.dim() != 3:
            out[k] = t
            continue
        if m.group(2) == "gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            for j in range(t.shape[0]):
                out[f"{m.group(1)}.{j}.gate_proj.weight"] = gate[j]
                out[f"{m.group(1)}.{j}.up_proj.weight"] = up[j]
        else:
            for j in range(t.shape[0]):
                out[f"{m.group(1)}.{j}.down_proj.weight"] = t[j]
    return out


def from_hf_state_dict(cfg, tensors, mtp, where):
    """-> DeepSeekV3 holding the folder's weights (ExportError on anything that doesn't fit)."""
    import torch
    from model import DeepSeekV3
    bad = [k for k, t in tensors.items() if t.dtype not in (torch.float32, torch.bfloat16, torch.float16)]
    if bad or any(k.endswith("weight_scale_inv") for k in tensors):
        raise ExportError(f"{where} holds quantized weights ({bad[0] if bad else 'weight_scale_inv'}"
                          f"{': ' + str(tensors[bad[0]].dtype) if bad else ''}): dequantize them first")
    tensors = unfuse_experts(tensors)
    n_layer = cfg.get("num_hidden_layers", HF_DEFAULTS["num_hidden_layers"])
    if not isinstance(n_layer, int):
        raise ExportError(f"{where}: config.json has num_hidden_layers={n_layer!r}")
    depth = 0
    while mtp and f"model.layers.{n_layer + depth}.eh_proj.weight" in tensors:
        depth += 1
    try:
        args = args_from_hf_config(cfg, depth, where)
    except (TypeError, KeyError, AttributeError, ValueError) as e:  # values of the wrong type
        raise ExportError(f"{where}: config.json has a value of the wrong kind ({type(e).__name__}: "
                          f"{first_line(e)})") from None
    model = DeepSeekV3(args)
    sd = model.state_dict()
    names = name_map(args, sd.keys())
    used = set()

    def take(hf_name, shape):
        t = tensors.get(hf_name)
        if t is None:
            raise ExportError(f"{where} lacks weight {hf_name}: not a complete DeepseekV3 checkpoint"
                              + (" (or its MTP layer is partial: try --mtp=False)" if depth and
                                 hf_name.startswith(f"model.layers.{n_layer}") else ""))
        if tuple(t.shape) != tuple(shape):
            raise ExportError(f"{where}: {hf_name} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
        used.add(hf_name)
        return t

    new, grouped = {}, {}
    for hf_name, (key, j) in names.items():
        if j is None:
            new[key] = take(hf_name, sd[key].shape)
        else:
            grouped.setdefault(key, {})[j] = take(hf_name, sd[key].shape[1:])
    for key, parts in grouped.items():
        new[key] = torch.stack([parts[j] for j in range(len(parts))])
    if args.tie_embeddings:
        new["head.weight"] = new["tok_emb.weight"]
        used.add("lm_head.weight")  # transformers ties it to the embedding whatever the file holds
    # the copies each MTP layer carries must be the shared tensors, or model.py can't hold them
    for hf_name, key in mtp_copies(args, depth).items():
        if hf_name in tensors:
            if not torch.equal(tensors[hf_name].to(new[key].dtype), new[key]):
                raise ExportError(f"{where}: {hf_name} differs from the main model's {key.split('.')[0]}: "
                                  "model.py shares it; import without MTP with --mtp=False")
            used.add(hf_name)
    for k, t in tensors.items():
        if t.numel() == 0 and ".mlp.shared_experts." in k and args.n_shared_experts == 0:
            used.add(k)  # transformers' zero-width shared expert
        elif k.endswith("rotary_emb.inv_freq"):
            used.add(k)
        elif not mtp and re.match(r"model\.layers\.(\d+)\.", k) and int(k.split(".")[2]) >= n_layer:
            used.add(k)  # the MTP layers, left out on request
    extra = sorted(set(tensors) - used)
    if extra:
        beyond = [k for k in extra if re.match(r"model\.layers\.(\d+)\.", k) and int(k.split(".")[2]) >= n_layer]
        raise ExportError(f"{where} has {len(extra)} weight{'s' if len(extra) > 1 else ''} this converter "
                          f"doesn't know, e.g. {(beyond or extra)[0]}"
                          + (" (an incomplete MTP layer? --mtp=False leaves them out)" if beyond else ""))
    with torch.no_grad():
        for key, t in new.items():
            if args.tie_embeddings and key == "head.weight":
                continue
            sd[key].copy_(t.to(sd[key].dtype))
    return model


def import_hf(hf_dir, out_dir, mtp=True, force=False):
    """Read the transformers folder hf_dir into out_dir/ckpt.pt. Returns a summary line."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    top = missing_top(out_dir, f"out_dir {out_dir}")
    if os.path.lexists(ckpt_path) and not force:
        raise ExportError(f"{ckpt_path} exists (pass --force=True to overwrite it)")
    cfg = read_hf_config(hf_dir)
    model = from_hf_state_dict(cfg, read_hf_weights(hf_dir), mtp, hf_dir)
    import torch
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.args), "iter_num": 0,
            "best_val_loss": 1e9, "config": {}}
    tmp = os.path.join(out_dir, f".ckpt.{os.getpid()}.pt.tmp")
    try:
        os.makedirs(out_dir, exist_ok=True)
        torch.save(ckpt, tmp)  # (the umask's mode, where tempfile.mkstemp would make it 0600)
        os.replace(tmp, ckpt_path)
    except BaseException as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        if top:
            shutil.rmtree(top, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(f"can't write {ckpt_path}: {e.strerror or e}") from None
        raise
    a = model.args
    return (f"imported {hf_dir} into {ckpt_path}: {a.n_layer} layers, d={a.n_embd}, "
            f"{a.n_routed_experts} routed experts, MTP depth {a.mtp_depth} (no optimizer state: "
            "a resume starts a fresh optimizer; training-only settings are ModelArgs' defaults)")


# -----------------------------------------------------------------------------

def main(argv=None):
    s = {
        "out_dir": "out-tinystories",  # the checkpoint folder: read out_dir/ckpt.pt, or (--from_hf) write it
        "hf_dir": "",                  # export: the transformers folder to write
        "from_hf": "",                 # import: the transformers folder to read (then hf_dir stays empty)
        "mtp": True,                   # include the MTP module(s) (export and import)
        "force": False,                # replace a non-empty hf_dir / an existing out_dir/ckpt.pt
    }
    configure(s, argv)
    try:
        if s["from_hf"] and s["hf_dir"]:
            raise ExportError("--from_hf imports into --out_dir, --hf_dir is where an export goes: give one")
        if s["from_hf"]:
            print(import_hf(s["from_hf"], s["out_dir"], mtp=s["mtp"], force=s["force"]))
        elif s["hf_dir"]:
            print(export_hf(os.path.join(s["out_dir"], "ckpt.pt"), s["hf_dir"], mtp=s["mtp"], force=s["force"]))
        else:
            raise ExportError("say what to do: --hf_dir=DIR exports out_dir/ckpt.pt, --from_hf=DIR imports")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
