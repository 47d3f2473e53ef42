"""Hand a checkpoint to the Hugging Face world, or take one back (README has more).

    python export.py --hf_dir=hf-tinystories                    # out-tinystories/ckpt.pt -> HF folder
    python export.py --hf_dir=hf-tinystories --mtp=False        # without the MTP module
    python export.py --from_hf=hf-tinystories --out_dir=out-hf  # HF folder -> out-hf/ckpt.pt

The folder is a DeepseekV3ForCausalLM in the on-disk names of DeepSeek's released weights (MTP module k as
layer n_layer + k) with GPT-2 tokenizer files built from tiktoken. What transformers can't express is refused
(unsupported()); every failure is one 'error: ...' line and exit 1, and leaves nothing half-written.
"""
import functools
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict

from configurator import configure, fail

# torch (and model.py) load in seconds: imported where used, so a wrong flag or path is answered at once

EOT_ID, EOT = 50256, "<|endoftext|>"  # GPT-2's end of text: bos, eos and the padding id for generate()
GPT2_VOCAB = 50257                     # tokens of tiktoken's "gpt2" encoding
LATENT_NORM_EPS = 1e-6                 # the fixed eps of transformers' q_a_layernorm / kv_a_layernorm

# DeepseekV3Config's defaults (transformers 5.x): what transformers uses for a key config.json lacks
HF_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=None, n_shared_experts=1,
    n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
    num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, hidden_act="silu",
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
    attention_bias=False)
# config.json keys that hold one of our ModelArgs fields as it is (both directions)
CONFIG_NAMES = dict(
    vocab_size="vocab_size", hidden_size="n_embd", num_hidden_layers="n_layer", num_attention_heads="n_head",
    kv_lora_rank="kv_lora_rank", qk_nope_head_dim="qk_nope_head_dim", qk_rope_head_dim="qk_rope_head_dim",
    v_head_dim="v_head_dim", intermediate_size="inter_dim", moe_intermediate_size="moe_inter_dim",
    num_experts_per_tok="n_activated_experts", routed_scaling_factor="route_scale", rms_norm_eps="norm_eps",
    max_position_embeddings="block_size", tie_word_embeddings="tie_embeddings")

# tensor names, ours -> transformers' (and DeepSeek's on-disk checkpoints'), used in both directions
TOP_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
ATTN_NAMES = dict(wq="q_proj", wq_a="q_a_proj", q_norm="q_a_layernorm", wq_b="q_b_proj",
                  wkv_a="kv_a_proj_with_mqa", kv_norm="kv_a_layernorm", wkv_b="kv_b_proj", wo="o_proj")
MLP_NAMES = dict(w1="gate_proj", w3="up_proj", w2="down_proj")
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{a}.weight": f"self_attn.{b}.weight" for a, b in ATTN_NAMES.items()},
    **{f"ffn.{a}.weight": f"mlp.{b}.weight" for a, b in MLP_NAMES.items()},  # a dense layer's MLP
    # MoE: router, balancing bias, shared experts (one MLP of n_shared_experts * moe_inter_dim)
    "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    **{f"ffn.shared.{a}.weight": f"mlp.shared_experts.{b}.weight" for a, b in MLP_NAMES.items()},
}
EXPERT_NAMES = {f"ffn.{a}": b for a, b in MLP_NAMES.items()}  # routed experts: our 3-D tensors, a slice each
MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
             "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}


class ExportError(Exception):
    """Bad input or a model transformers can't express: main() prints it as one line, exits 1."""


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ---- the name map, used in both directions -------------------------------------------------------

def name_map(args, state_keys):
    """-> {hf name: (our state_dict key, expert index or None)} for every tensor of our state dict
    (the tied head excepted). MTP module k becomes layer n_layer + k."""
    out = {}
    for key in state_keys:
        if key in TOP_NAMES:
            if not (key == "head.weight" and args.tie_embeddings):
                out[TOP_NAMES[key]] = (key, None)
            continue
        kind, i, in_block, rest = re.fullmatch(r"(blocks|mtp)\.(\d+)\.(block\.)?(.+)", key).groups()
        prefix = f"model.layers.{int(i) + (args.n_layer if kind == 'mtp' else 0)}."
        if kind == "mtp" and not in_block:
            out[prefix + MTP_NAMES[rest]] = (key, None)
        elif rest in EXPERT_NAMES:
            for j in range(args.n_routed_experts):
                out[f"{prefix}mlp.experts.{j}.{EXPERT_NAMES[rest]}.weight"] = (key, j)
        else:
            out[prefix + BLOCK_NAMES[rest]] = (key, None)
    return out


def mtp_copies(args, depth):
    """The shared embedding and head each MTP layer carries a copy of, as in DeepSeek's weights."""
    return {f"model.layers.{args.n_layer + k}.{name}.weight": key for k in range(depth)
            for name, key in (("embed_tokens", "tok_emb.weight"), ("shared_head.head", "head.weight"))}


# ---- configs -------------------------------------------------------------------------------------

def unsupported(args):
    """Why the export would compute something else than model.py, or None."""
    ds = "transformers' DeepseekV3"
    reasons = {
        "score_func": (args.score_func != "sigmoid", f"{ds} router always uses sigmoid affinities"),
        "norm_eps": (args.norm_eps != LATENT_NORM_EPS, f"{ds} gives q_a_layernorm and kv_a_layernorm a fixed "
                     f"eps of {LATENT_NORM_EPS} (it ignores rms_norm_eps there)"),
        "n_routed_experts": (args.n_routed_experts == 1, f"{ds} router ranks expert groups by their two best "
                             "scores, so it needs at least 2 routed experts"),
        "vocab_size": (args.vocab_size < GPT2_VOCAB, f"it is smaller than the GPT-2 tokenizer's {GPT2_VOCAB} "
                       "tokens: this model was not trained on GPT-2 tokens"),
    }
    return next((f"{k}={getattr(args, k)!r} can't be exported: {why}" for k, (bad, why) in reasons.items()
                 if bad), None)


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
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        **{hf: getattr(args, ours) for hf, ours in CONFIG_NAMES.items()},
        "num_key_value_heads": args.n_head, "q_lora_rank": args.q_lora_rank or None,
        # a dense model ("dense twin") is all dense layers
        "first_k_dense_replace": args.n_dense_layers if args.n_routed_experts else args.n_layer,
        "n_routed_experts": args.n_routed_experts, "n_shared_experts": args.n_shared_experts,
        "n_group": args.n_expert_groups, "topk_group": args.n_limited_groups,
        "norm_topk_prob": True,  # ours normalises sigmoid weights over the chosen experts
        # read by DeepSeek's own code and by vLLM/SGLang, not by transformers
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_nextn_predict_layers": mtp_depth,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "rope_parameters": rope, "rope_theta": float(args.rope_theta), "rope_scaling": scaling,
        "rope_interleave": True,  # our rotary dims are DeepSeek's adjacent pairs
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
        "pad_token_id": None,  # (a pad id would make the embedding row a padding_idx)
        "initializer_range": 0.02, "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
    }


def refuse(where, what):
    raise ExportError(f"{where}: model.py can't compute {what}")


def rope_from_hf(cfg, where):
    """ModelArgs' RoPE fields for a config.json. transformers 5 writes rope_parameters; DeepSeek's own files
    have rope_theta + rope_scaling, which wins where both are present (as in transformers 4 and 5)."""
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(where, f"partial_rotary_factor={rope['partial_rotary_factor']}")
    if rope_type not in ("default", "yarn"):
        refuse(where, f"rope_type={rope_type!r} (model.py has plain RoPE and YaRN)")
    if rope_type == "default":
        return {"rope_theta": float(rope["rope_theta"])}
    factor = rope.get("factor")
    if factor is None or "original_max_position_embeddings" not in rope:
        refuse(where, "YaRN without factor/original_max_position_embeddings")
    if factor < 1:
        refuse(where, f"YaRN factor={factor} < 1")
    if not rope.get("truncate", True):
        refuse(where, "YaRN truncate=false")
    m, m_all = rope.get("mscale") or 0.0, rope.get("mscale_all_dim") or 0.0

    def yarn(scale):
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0
    att = rope.get("attention_factor")
    if att is None:
        att = yarn(m) / yarn(m_all) if (m and m_all) else yarn(1.0)
    if abs(att - 1.0) > 1e-12:
        refuse(where, f"YaRN attention_factor {att:.6g} != 1 (mscale={m}, mscale_all_dim={m_all})")
    betas = [rope.get("beta_fast") or 32, rope.get("beta_slow") or 1]
    if any(b != int(b) for b in betas):
        refuse(where, f"YaRN beta_fast/beta_slow={betas} (model.py takes integers)")
    return dict(rope_theta=float(rope["rope_theta"]), rope_factor=float(factor), mscale=float(m_all),
                original_seq_len=int(rope["original_max_position_embeddings"]),
                beta_fast=int(betas[0]), beta_slow=int(betas[1]))


def args_from_hf_config(cfg, mtp_depth, where):
    """ModelArgs for a DeepseekV3 config.json (the training-only knobs get ModelArgs' defaults), or
    ExportError if model.py would compute something else."""
    from model import ModelArgs
    c = {**HF_DEFAULTS, **cfg}
    E, heads = c["n_routed_experts"] or 0, c["num_attention_heads"]
    for wrong, what in [
        (c.get("num_key_value_heads") not in (None, heads),
         f"num_key_value_heads={c['num_key_value_heads']} != num_attention_heads={heads}"),
        (c["hidden_act"] != "silu", f"hidden_act={c['hidden_act']!r} (model.py uses SwiGLU with silu)"),
        (c["attention_bias"], "attention_bias=true"),
        (not c["rope_interleave"], "rope_interleave=false (model.py rotates DeepSeek's adjacent pairs)"),
        (c.get("scoring_func", "sigmoid") != "sigmoid",
         f"scoring_func={c.get('scoring_func')!r} (transformers and model.py export only sigmoid)"),
        (E > 0 and not c["norm_topk_prob"],
         "norm_topk_prob=false (model.py always normalises the chosen sigmoid weights)"),
        (c["rms_norm_eps"] != LATENT_NORM_EPS, f"rms_norm_eps={c['rms_norm_eps']} (transformers then mixes "
         f"it with {LATENT_NORM_EPS} in the latent norms; model.py has one eps)"),
        (E > 0 and (c["n_group"] is None or c["topk_group"] is None), "n_group/topk_group unset")]:
        if wrong:
            refuse(where, what)
    n_layer = c["num_hidden_layers"]
    return ModelArgs(
        **{ours: c[hf] for hf, ours in CONFIG_NAMES.items()}, **rope_from_hf(cfg, where), mtp_depth=mtp_depth,
        q_lora_rank=c["q_lora_rank"] or 0, n_routed_experts=E, n_shared_experts=c["n_shared_experts"] or 0,
        n_dense_layers=min(c["first_k_dense_replace"], n_layer) if E else n_layer, score_func="sigmoid",
        n_expert_groups=c["n_group"] or 1, n_limited_groups=c["topk_group"] or 1)


# ---- the GPT-2 tokenizer, from tiktoken ----------------------------------------------------------

@functools.cache
def gpt2_vocab_and_merges():
    """tiktoken's gpt2 ranks as GPT-2's vocab.json (token text -> id) and merges (in rank order).
    Each multi-byte token's merge is found by running BPE on its bytes with only the merges ranked
    below it: what is left is the pair that merges into it."""
    from prepare import PrepareError, load_encoding
    try:
        enc = load_encoding()
    except PrepareError as e:
        raise ExportError(str(e)) from None
    if enc.n_vocab != GPT2_VOCAB or enc.eot_token != EOT_ID:
        raise ExportError(f"tiktoken's gpt2 encoding has {enc.n_vocab} tokens, eot {enc.eot_token}: "
                          f"expected {GPT2_VOCAB}, {EOT_ID}")
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_ID)}
    # GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for
    # themselves, the others get the code points from 256 on, in byte order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    b2u = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    text = {tok: "".join(b2u[b] for b in tok) for tok in ranks}
    vocab = {**{text[tok]: i for tok, i in ranks.items()}, EOT: EOT_ID}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            best, at = min((ranks.get(a + b, r), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if best >= r:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        assert len(parts) == 2 and parts[0] + parts[1] == tok, tok
        merges.append((text[parts[0]], text[parts[1]]))
    return vocab, merges


def write_json(folder, name, obj, indent=2):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)


def write_tokenizer(folder, block_size):
    vocab, merges = gpt2_vocab_and_merges()
    write_json(folder, "vocab.json", vocab, indent=None)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    write_json(folder, "special_tokens_map.json", specials)
    eot = dict(content=EOT, single_word=False, lstrip=False, rstrip=False, normalized=True, special=True)
    write_json(folder, "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, **specials,
        "add_prefix_space": False, "add_bos_token": False, "errors": "replace",
        "clean_up_tokenization_spaces": False, "added_tokens_decoder": {str(EOT_ID): eot}})
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


# ---- writing without leaving anything half-done --------------------------------------------------

def missing_top(target, what):
    """-> the topmost missing folder above target (None if none): what a failed write removes. Refuses
    at once, before any slow work, a target under a file or in a read-only folder."""
    top, up = None, os.path.dirname(os.path.abspath(target))
    while not os.path.lexists(up):
        top, up = up, os.path.dirname(up)
    if not os.path.isdir(up) or not os.access(up, os.W_OK | os.X_OK):
        why = "not writable" if os.path.isdir(up) else "not a folder"
        raise ExportError(f"can't write {what}: {up} is {why}")
    return top


@contextmanager
def replacing(target, top):
    """Yields a temporary path beside target to write, then renames it to target (a folder it replaces
    goes after). On failure what was made goes (top: see missing_top); an OSError is one line."""
    tmp = f"{os.path.abspath(target)}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(target):  # (rename() won't put a folder over a full one)
            os.rename(target, tmp + ".old")
        os.replace(tmp, target)
        shutil.rmtree(tmp + ".old", ignore_errors=True)
    except BaseException as e:
        if top or os.path.isdir(tmp):
            shutil.rmtree(top or tmp, ignore_errors=True)  # (top holds tmp)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise ExportError(f"can't write {target}: {e.strerror or e}") from None
        raise


# ---- checkpoint -> transformers ------------------------------------------------------------------

def to_hf_state_dict(model, depth):
    """-> {DeepSeek's on-disk name: tensor}, with the first depth MTP modules."""
    import torch
    args, sd = model.args, model.state_dict()
    keys = [k for k in sd if depth or not k.startswith("mtp.")]
    # (clone: safetensors stores no views, and expert slices, tied and copied tensors share memory)
    out = {hf_name: (sd[key] if j is None else sd[key][j]).contiguous().clone()
           for hf_name, (key, j) in name_map(args, keys).items()}
    out.update({hf_name: sd[key].clone() for hf_name, key in mtp_copies(args, depth).items()})
    if args.n_routed_experts and not args.n_shared_experts:
        # transformers always builds shared_experts (n_shared_experts * moe_inter_dim wide): with none, a
        # zero-width MLP that adds exactly 0. Its empty weights go out too, so nothing loads as 'missing'
        for layer in range(args.n_dense_layers, args.n_layer + depth):
            p, d = f"model.layers.{layer}.mlp.shared_experts.", args.n_embd
            out.update({p + "gate_proj.weight": torch.zeros(0, d), p + "up_proj.weight": torch.zeros(0, d),
                        p + "down_proj.weight": torch.zeros(d, 0)})
    return out


def export_hf(ckpt_path, hf_dir, mtp=True, force=False):
    """Write the checkpoint at ckpt_path as a transformers folder hf_dir. Returns a summary line."""
    if not os.path.isfile(ckpt_path):
        raise ExportError(f"no checkpoint at {ckpt_path} (train one with train.py, or point out_dir at one)")
    if os.path.lexists(hf_dir) and not os.path.isdir(hf_dir):
        raise ExportError(f"target {hf_dir} exists and is not a folder")
    old = os.listdir(hf_dir) if os.path.isdir(hf_dir) else []
    if old and not force:
        raise ExportError(f"target {hf_dir} is not empty (pass --force=True to replace it)")
    precious = [n for n in old if n.endswith(".pt")]
    if precious:
        raise ExportError(f"target {hf_dir} holds {precious[0]}: not replacing a folder with checkpoints in "
                          "it, even with --force=True; remove it yourself or pick another folder")
    top = missing_top(hf_dir, f"target {hf_dir}")
    from model import CheckpointError, load_checkpoint
    try:
        model, ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    args, depth = model.args, model.args.mtp_depth if mtp else 0
    if why := unsupported(args):
        raise ExportError(why)
    tensors = to_hf_state_dict(model, depth)
    gpt2_vocab_and_merges()  # fails (tiktoken offline) before anything is on disk
    from safetensors.torch import save_file
    with replacing(hf_dir, top) as tmp:
        os.mkdir(tmp)  # (the umask's modes, where tempfile.mkdtemp would make it 0700)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp, "config.json", hf_config(args, depth, model.tok_emb.weight.dtype))
        # safetensors makes its file 0600: give it the mode open() gave config.json (the user's umask)
        shutil.copymode(os.path.join(tmp, "config.json"), os.path.join(tmp, "model.safetensors"))
        write_json(tmp, "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
                                                   "pad_token_id": EOT_ID})
        write_tokenizer(tmp, args.block_size)
    n = sum(t.numel() for t in tensors.values())
    mtp_note = (f", MTP from layer {args.n_layer} on (transformers' from_pretrained reports it as unexpected "
                "and leaves it out; --mtp=False omits it)") if depth else ", no MTP"
    return (f"exported {ckpt_path} (iter {ckpt.get('iter_num', '?')}) to {hf_dir}: {len(tensors)} tensors, "
            f"{n / 1e6:.2f}M values{mtp_note}")


# ---- transformers -> checkpoint ------------------------------------------------------------------

def read_hf_config(folder):
    """-> config dict of a transformers DeepseekV3 folder, or ExportError."""
    if not os.path.isdir(folder):
        raise ExportError(f"--from_hf: no folder {folder}")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{folder} has no config.json: not a transformers model folder")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable: {first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{path} is not a transformers config (not a JSON object)")
    if cfg.get("model_type") != "deepseek_v3":
        archs = ", ".join(map(str, cfg.get("architectures") or ["?"]))
        raise ExportError(f"{folder} holds a {cfg.get('model_type')!r} model ({archs}), not DeepseekV3")
    return cfg


def read_hf_weights(folder):
    """-> {name: tensor} from the folder's model.safetensors (or its shards), or ExportError."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
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
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
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
        halves = zip(("gate_proj", "up_proj"), t.chunk(2, dim=1)) if m[2] == "gate_up_proj" else None
        for name, w in halves or [("down_proj", t)]:
            out.update({f"{m[1]}.{j}.{name}.weight": w[j] for j in range(len(w))})
    return out


def from_hf_state_dict(cfg, tensors, mtp, where):
    """-> DeepSeekV3 holding the folder's weights (ExportError on anything that doesn't fit)."""
    import torch
    from model import DeepSeekV3
    quantized = [f"{k}: {t.dtype}" for k, t in tensors.items() if k.endswith("weight_scale_inv")
                 or t.dtype not in (torch.float32, torch.bfloat16, torch.float16)]
    if quantized or cfg.get("quantization_config"):
        raise ExportError(f"{where} holds quantized weights ({(quantized or ['quantization_config'])[0]}): "
                          "dequantize them first")
    tensors = unfuse_experts(tensors)
    depth = sum(k.endswith(".eh_proj.weight") for k in tensors) if mtp else 0
    try:
        args = args_from_hf_config(cfg, depth, where)
    except (TypeError, KeyError, AttributeError, ValueError) as e:  # ModelArgs' checks, values of wrong types
        raise ExportError(f"{where}: config.json describes no model model.py can build ({type(e).__name__}: "
                          f"{first_line(e)})") from None
    model = DeepSeekV3(args)
    sd = model.state_dict()

    def is_mtp(k):  # a layer after the main model's: where DeepSeek keeps the MTP modules
        m = re.match(r"model\.layers\.(\d+)\.", k)
        return bool(m) and int(m[1]) >= args.n_layer
    hint = " (an incomplete MTP layer? --mtp=False leaves them out)"
    names, copies, new = name_map(args, sd), mtp_copies(args, depth), {}
    for hf_name, (key, j) in names.items():
        t, shape = tensors.get(hf_name), sd[key].shape[0 if j is None else 1:]
        if t is None:
            raise ExportError(f"{where} lacks weight {hf_name}: not a complete DeepseekV3 checkpoint"
                              + (hint if is_mtp(hf_name) else ""))
        if t.shape != shape:
            raise ExportError(f"{where}: {hf_name} has shape {tuple(t.shape)}, config.json implies "
                              f"{tuple(shape)}")
        new.setdefault(key, []).append(t)  # (a routed expert's slices come in order)
    new = {k: v[0] if v[0].shape == sd[k].shape else torch.stack(v) for k, v in new.items()}
    if args.tie_embeddings:
        new["head.weight"] = new["tok_emb.weight"]
    # the copies each MTP layer carries must be the shared tensors, or model.py can't hold them
    for hf_name, key in copies.items():
        if hf_name in tensors and not torch.equal(tensors[hf_name].to(new[key].dtype), new[key]):
            raise ExportError(f"{where}: {hf_name} differs from the main model's {key.split('.')[0]}: "
                              "model.py shares it; import without MTP with --mtp=False")
    known = {*names, *copies, *(["lm_head.weight"] if args.tie_embeddings else [])}  # (transformers ties it)
    extra = sorted(k for k, t in tensors.items() if k not in known and not k.endswith("rotary_emb.inv_freq")
                   and not (t.numel() == 0 and ".mlp.shared_experts." in k)  # transformers' zero-width one
                   and (mtp or not is_mtp(k)))  # (MTP layers left out on request)
    if extra:
        beyond = [k for k in extra if is_mtp(k)]
        raise ExportError(f"{where} has {len(extra)} weight{'s' if len(extra) > 1 else ''} this converter "
                          f"doesn't know, e.g. {(beyond or extra)[0]}" + (hint if beyond else ""))
    model.load_state_dict(new)
    return model


def import_hf(hf_dir, out_dir, mtp=True, force=False):
    """Read the transformers folder hf_dir into out_dir/ckpt.pt. Returns a summary line."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    top = missing_top(ckpt_path, f"out_dir {out_dir}")
    if os.path.lexists(ckpt_path) and not force:
        raise ExportError(f"{ckpt_path} exists (pass --force=True to overwrite it)")
    model = from_hf_state_dict(read_hf_config(hf_dir), read_hf_weights(hf_dir), mtp, hf_dir)
    import torch
    with replacing(ckpt_path, top) as tmp:  # (torch.save gives the umask's mode, tempfile.mkstemp 0600)
        torch.save({"model": model.state_dict(), "model_args": asdict(model.args), "iter_num": 0,
                    "best_val_loss": 1e9, "config": {}}, tmp)
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
        if bool(s["from_hf"]) == bool(s["hf_dir"]):
            raise ExportError("say what to do: --hf_dir=DIR exports out_dir/ckpt.pt to DIR, --from_hf=DIR "
                              "imports DIR into out_dir: give one")
        print(import_hf(s["from_hf"], s["out_dir"], s["mtp"], s["force"]) if s["from_hf"] else
              export_hf(os.path.join(s["out_dir"], "ckpt.pt"), s["hf_dir"], s["mtp"], s["force"]))
    except ExportError as e:
        fail(e, 1)


if __name__ == "__main__":
    main()
