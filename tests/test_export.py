"""Tests for export.py: checkpoint <-> transformers' DeepseekV3ForCausalLM, and the GPT-2 tokenizer.

Small random models, fp32, CPU. For each config our logits and transformers' agree, greedy generation
gives the same tokens, and export -> import gives back the identical state dict. Needs transformers
(CI installs it) and tiktoken's gpt2 encoding (offline: TIKTOKEN_CACHE_DIR)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, rel, save_ckpt, tokens

transformers = pytest.importorskip(
    "transformers", reason="export tests compare with transformers' DeepseekV3 (pip install transformers)")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM  # noqa: E402

import export  # noqa: E402
from model import DeepSeekV3, ModelArgs, load_checkpoint  # noqa: E402

# transformers builds a zero-width shared-expert MLP when there is none: torch warns it has nothing to init
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

BASE = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, inter_dim=48, n_dense_layers=1,
            moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1,
            n_limited_groups=1, n_shared_experts=1, mtp_depth=1)
CONFIGS = {
    # plain query projection, one expert group, one shared expert, one dense layer, plain RoPE
    "q0-1group-1shared-1dense": dict(q_lora_rank=0),
    # query latent, 4 groups (2 kept), 2 shared experts, no dense layer, YaRN, tied embeddings
    "4groups-2shared-0dense-yarn-tied": dict(n_expert_groups=4, n_limited_groups=2, n_shared_experts=2,
                                            n_dense_layers=0, n_activated_experts=3, route_scale=2.5,
                                            rope_factor=4.0, original_seq_len=16, mscale=0.707,
                                            tie_embeddings=True),
    # 2 groups of 3, no shared expert, 2 dense layers, YaRN with mscale 0, two MTP modules
    "2groups-0shared-2dense-yarn-mtp2": dict(n_layer=3, n_routed_experts=6, n_expert_groups=2,
                                            n_limited_groups=1, n_shared_experts=0, n_dense_layers=2,
                                            qk_rope_head_dim=16, rope_factor=2.0, original_seq_len=32,
                                            mscale=0.0, beta_fast=16, beta_slow=2, mtp_depth=2),
    # no routed experts at all: every layer dense, RoPE with another base
    "dense-q0-tied-theta": dict(n_routed_experts=0, q_lora_rank=0, tie_embeddings=True, rope_theta=50000.0),
}


def randomized(args, seed=0):
    """A model with weights large enough that every part matters, and non-zero expert biases."""
    torch.manual_seed(seed)
    model = DeepSeekV3(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            else:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0.0, 0.1)
    return model.eval()


class Built:
    def __init__(self, name, root):
        self.args = ModelArgs(**{**BASE, **CONFIGS[name]})
        self.model = randomized(self.args)
        self.ckpt = save_ckpt(self.model, str(root / "out" / "ckpt.pt"))
        self.hf = str(root / "hf")
        export.export_hf(self.ckpt, self.hf)
        self.hf_model, self.info = AutoModelForCausalLM.from_pretrained(
            self.hf, attn_implementation="eager", output_loading_info=True)
        self.hf_model.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Built(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


@pytest.fixture
def b(built):
    """The first config's export, for the tests that need just one."""
    return built("q0-1group-1shared-1dense")


def assert_same_state(a, b, skip=None):
    """Same keys (those starting with skip left out), same dtypes, bit-identical values."""
    a = {k: v for k, v in a.items() if not (skip and k.startswith(skip))}
    b = {k: v for k, v in b.items() if not (skip and k.startswith(skip))}
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def read_json(folder, name="config.json"):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def hf_folder(path, cfg, tensors):
    """A transformers folder at path: config.json holding cfg, model.safetensors holding tensors (a dict),
    or raw bytes, or the file of the folder named tensors (linked)."""
    os.makedirs(path)
    (path / "config.json").write_text(json.dumps(cfg))
    if isinstance(tensors, dict):
        save_file(tensors, str(path / "model.safetensors"))
    elif isinstance(tensors, bytes):
        (path / "model.safetensors").write_bytes(tensors)
    else:
        os.link(os.path.join(tensors, "model.safetensors"), path / "model.safetensors")
    return str(path)


def imported(folder, out_dir, **kw):
    """export.import_hf(folder) into out_dir -> (the model, the checkpoint), as load_checkpoint reads them."""
    export.import_hf(str(folder), str(out_dir), **kw)
    return load_checkpoint(str(out_dir / "ckpt.pt"))


# ---- transformers computes what model.py computes --------------------------------------------

@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(built, name, tmp_path):
    """Also from DeepSeek's rope keys alone: transformers 4, DeepSeek's code, vLLM and SGLang read rope_theta
    and rope_scaling, not rope_parameters; without those transformers 5 reads them too."""
    b = built(name)
    cfg = read_json(b.hf)
    del cfg["rope_parameters"]
    hf = hf_folder(tmp_path / "hf", cfg, b.hf)
    deepseek_keys = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    idx = tokens(b.args, T=48)
    with torch.no_grad():
        ours, _ = b.model(idx, torch.zeros_like(idx))
        theirs = b.hf_model(idx).logits
        assert rel(deepseek_keys(idx).logits, ours) < 1e-4
    assert ours.shape == theirs.shape == (2, 48, b.args.vocab_size)
    assert rel(ours, theirs) < 1e-4
    # the routing ran with the balancing biases, which do change the choice of experts
    for i, block in enumerate(b.model.blocks):
        if block.is_moe:
            bias = block.ffn.gate.bias
            assert torch.equal(b.hf_model.model.layers[i].mlp.gate.e_score_correction_bias, bias)
            x = torch.randn(64, b.args.n_embd)
            with_bias = block.ffn.gate(x)[1].sort(-1).values
            with torch.no_grad():
                bias.zero_()
                without = block.ffn.gate(x)[1].sort(-1).values
                bias.copy_(b.hf_model.model.layers[i].mlp.gate.e_score_correction_bias)
            assert not torch.equal(with_bias, without)


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_loads_everything_but_mtp(built, name):
    b = built(name)
    assert not b.info["missing_keys"] and not b.info["mismatched_keys"]
    # the MTP layers are the only keys transformers leaves out
    layers = {int(re.match(r"model\.layers\.(\d+)\.", k).group(1)) for k in b.info["unexpected_keys"]}
    assert layers == set(range(b.args.n_layer, b.args.n_layer + b.args.mtp_depth))


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_matches(built, name):
    b = built(name)
    prompt = tokens(b.args, B=1, T=6, seed=2)
    new = 12
    ids = prompt
    with torch.no_grad():
        for _ in range(new):
            logits, _ = b.model(ids, torch.zeros_like(ids))
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out = b.hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=new)
    ours = ids[0].tolist()
    theirs = out[0].tolist()
    if export.EOT_ID in ours[6:]:  # transformers stops at eos
        ours = ours[:ours.index(export.EOT_ID, 6) + 1]
    assert theirs[:len(ours)] == ours and len(theirs) >= len(ours)


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", CONFIGS)
def test_export_import_roundtrip_is_identical(built, name, tmp_path):
    b = built(name)
    model, ckpt = imported(b.hf, tmp_path)
    assert_same_state(ckpt["model"], b.model.state_dict())  # MTP included
    assert ckpt["iter_num"] == 0 and ckpt["config"] == {} and "optimizer" not in ckpt
    expected = ["n_dense_layers"] if b.args.n_routed_experts == 0 else []  # (all dense: either value says it)
    assert b.args.differences(ModelArgs(**ckpt["model_args"])) == expected


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", CONFIGS)
def test_config_json(built, name):
    b = built(name)
    a, cfg = b.args, read_json(b.hf)
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert cfg["q_lora_rank"] == (a.q_lora_rank or None)
    assert cfg["num_nextn_predict_layers"] == a.mtp_depth
    assert cfg["first_k_dense_replace"] == (a.n_dense_layers if a.n_routed_experts else a.n_layer)
    assert cfg["tie_word_embeddings"] == a.tie_embeddings
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == 50256
    # transformers 5's rope_parameters, and rope_theta + rope_scaling in DeepSeek's keys for transformers 4,
    # DeepSeek's code, vLLM and SGLang: the same values
    rope, scaling = cfg["rope_parameters"], cfg["rope_scaling"]
    assert rope["rope_theta"] == cfg["rope_theta"] == a.rope_theta
    if a.rope_factor > 1:
        deepseek = dict(type="yarn", factor=a.rope_factor, beta_fast=a.beta_fast, beta_slow=a.beta_slow,
                        original_max_position_embeddings=a.original_seq_len)
        deepseek.update(mscale=a.mscale, mscale_all_dim=a.mscale)
        assert {k: scaling[k] for k in deepseek} == deepseek
        assert rope == {"rope_type": "yarn", "rope_theta": a.rope_theta,
                        **{k: v for k, v in scaling.items() if k != "type"}}
    else:
        assert scaling is None and rope == {"rope_type": "default", "rope_theta": a.rope_theta}
    keys, n = set(weights(b.hf)), a.n_layer
    if a.n_routed_experts:
        moe = n - 1
        assert f"model.layers.{moe}.mlp.gate.e_score_correction_bias" in keys
        assert f"model.layers.{moe}.mlp.experts.{a.n_routed_experts - 1}.gate_proj.weight" in keys
    for k in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{n}.{k}.weight" in keys
    assert f"model.layers.{n}.self_attn.kv_a_proj_with_mqa.weight" in keys
    assert ("lm_head.weight" in keys) == (not a.tie_embeddings)
    assert read_json(b.hf, "generation_config.json")["eos_token_id"] == 50256


@pytest.mark.needs_gpt2
def test_tokenizer_matches_tiktoken(b):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    tok = AutoTokenizer.from_pretrained(b.hf)
    texts = ["Once upon a time, there was a little girl named Lily. She loved to play outside!",
             "  leading spaces, it's they're we'll I'd\n\n\ttabs and\r\nnewlines   ",
             "Ünïcödé 日本語 Ελληνικά emoji 🙂👍🏽 numbers 12345 3.14159 $100 #hashtag @user",
             "one story<|endoftext|>The next one.",
             open(os.path.join(ROOT, "model.py"), encoding="utf-8").read()]  # code: runs of spaces, symbols
    for text in texts:
        ids = enc.encode(text, allowed_special="all")
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.bos_token_id == 50256 and len(tok) == 50257


@pytest.mark.needs_gpt2
def test_transformers_mtp_module_drafts_like_ours(b, monkeypatch):
    """transformers >= 5.17 rebuilds MTP layers from the checkpoint for generate(use_mtp=True), but only
    finds them under DeepseekV3's pattern for layer 61; pointed at our layer, it computes what we do."""
    mtp_mod = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(mtp_mod, "MtpModel"):
        pytest.skip("this transformers has no MTP support")
    monkeypatch.setattr(DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected",
                        [rf"model\.layers\.{b.args.n_layer}\..*"])
    hm = AutoModelForCausalLM.from_pretrained(b.hf, attn_implementation="eager").eval()
    mtp = mtp_mod.MtpModel.from_pretrained(hm).eval()
    x = tokens(b.args, B=1, T=20, seed=3)
    T = x.shape[1]
    with torch.no_grad():
        h = hm(x, output_hidden_states=True).hidden_states[-1]  # the final-normed hidden, as ours
        mod = b.model.mtp[0]
        hk = mod(h[:, :-1], b.model.tok_emb(x[:, 1:]), b.model.rope_cos[:T - 1], b.model.rope_sin[:T - 1])[0]
        ours = b.model.head(mod.norm(hk))
        # its draft for the token after the last: from the hidden states up to T-2 and tokens 1..T-1
        _, theirs, _ = mtp(input_ids=x[:, 1:], last_hidden_states=h[:, :-1], mtp_cache=None,
                           position_ids=torch.arange(T - 1)[None], attention_mask=torch.ones_like(x[:, 1:]))
        assert rel(ours[:, -1], theirs[:, 0]) < 1e-4
        plain = hm.generate(x[:, :6], do_sample=False, max_new_tokens=8)
        drafted = hm.generate(x[:, :6], do_sample=False, max_new_tokens=8, use_mtp=True)
    assert torch.equal(plain, drafted)


# ---- variants of export and import ---------------------------------------------------------

@pytest.mark.needs_gpt2
def test_mtp_false_leaves_mtp_out(built, tmp_path):
    b = built("2groups-0shared-2dense-yarn-mtp2")
    hf = str(tmp_path / "hf")
    export.export_hf(b.ckpt, hf, mtp=False)
    assert not any(k.startswith(f"model.layers.{b.args.n_layer}") for k in weights(hf))
    assert read_json(hf)["num_nextn_predict_layers"] == 0
    hm, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    # and --mtp=False on import drops them from a folder that has them
    model, ckpt = imported(b.hf, tmp_path / "back", mtp=False)
    assert model.args.mtp_depth == 0
    assert_same_state(ckpt["model"], b.model.state_dict(), skip=("mtp.",))


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", ["4groups-2shared-0dense-yarn-tied", "2groups-0shared-2dense-yarn-mtp2"])
def test_import_what_transformers_saves(built, name, tmp_path):
    """save_pretrained of the loaded model (no MTP weights left, tied head left out, config still
    saying num_nextn_predict_layers) imports to the same main weights."""
    b = built(name)
    b.hf_model.save_pretrained(str(tmp_path / "saved"))
    model, ckpt = imported(tmp_path / "saved", tmp_path / "back")
    assert model.args.mtp_depth == 0
    assert_same_state(ckpt["model"], b.model.state_dict(), skip=("mtp.",))


@pytest.mark.needs_gpt2
def test_import_fused_expert_names(b, tmp_path):
    sd = b.hf_model.state_dict()  # transformers' own layout: experts.gate_up_proj / experts.down_proj
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    fused = hf_folder(tmp_path / "fused", read_json(b.hf), {k: v.contiguous() for k, v in sd.items()})
    _, ckpt = imported(fused, tmp_path / "back")
    assert_same_state(ckpt["model"], b.model.state_dict(), skip=("mtp.",))


@pytest.mark.needs_gpt2
def test_import_refuses_mtp_copies_that_differ(b, tmp_path):
    sd = weights(b.hf)
    sd[f"model.layers.{b.args.n_layer}.shared_head.head.weight"] += 1.0
    edited = hf_folder(tmp_path / "edited", read_json(b.hf), sd)
    with pytest.raises(export.ExportError, match="mtp=False"):
        export.import_hf(edited, str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()
    export.import_hf(edited, str(tmp_path / "back"), mtp=False)


@pytest.mark.needs_gpt2
def test_force_replaces_an_export(b, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "stale.txt").write_text("old")
    export.export_hf(b.ckpt, str(hf), force=True)
    assert not (hf / "stale.txt").exists() and (hf / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left beside it
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "ckpt.pt").write_bytes(b"old")
    assert imported(hf, tmp_path / "back", force=True)[0].args == b.args
    assert sorted(os.listdir(tmp_path / "back")) == ["ckpt.pt"]


@pytest.mark.needs_gpt2
def test_a_failed_write_leaves_nothing(b, tmp_path, monkeypatch):
    """Disk full halfway: a previous export and an existing out_dir stay as they were, and the folders
    made for the new files go again."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("previous export")

    def disk_full(path):  # writes a little, then the disk is full
        with open(os.path.join(path, "part") if os.path.isdir(path) else path, "wb") as f:
            f.write(b"x")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "write_tokenizer", lambda folder, *a: disk_full(folder))
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: disk_full(path))
    for where in ("hf", "new/er/hf"):
        with pytest.raises(export.ExportError, match=f"can't write .*{where}: No space left"):
            export.export_hf(b.ckpt, str(tmp_path / where), force=True)
    for where in ("hf", "new/back"):
        with pytest.raises(export.ExportError, match=f"can't write .*{where}/ckpt.pt: No space left"):
            export.import_hf(b.hf, str(tmp_path / where))
    assert os.listdir(tmp_path) == ["hf"] and snapshot(tmp_path / "hf") == {"old.txt": b"previous export"}


def modes(root):
    """{path under root: its permission bits}, root itself as '.'."""
    out = {".": os.stat(root).st_mode & 0o777}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out[os.path.relpath(os.path.join(d, n), root)] = os.stat(os.path.join(d, n)).st_mode & 0o777
    return out


@pytest.mark.needs_gpt2
def test_cli_defaults_and_modes(b, tmp_path):
    """`python export.py --hf_dir=X` reads train.py's default out_dir, and what export.py writes gets the
    modes of the user's umask (027: files 0640, folders 0750), not tempfile's private 0600 / 0700."""
    os.makedirs(tmp_path / "out-tinystories")
    os.link(b.ckpt, tmp_path / "out-tinystories" / "ckpt.pt")
    old = os.umask(0o027)
    try:
        for argv in (["--hf_dir=hf"], ["--from_hf=hf", "--out_dir=new/back"]):
            check_success(*run_cli(*argv, cwd=tmp_path))
    finally:
        os.umask(old)
    assert modes(tmp_path / "hf") == {".": 0o750, **{n: 0o640 for n in os.listdir(tmp_path / "hf")}}
    assert modes(tmp_path / "new") == {".": 0o750, "back": 0o750, "back/ckpt.pt": 0o640}


def test_unwritable_folders_are_refused_at_once(tmp_path, capsys, monkeypatch):
    """(The tests run as root, whom chmod doesn't stop: os.access stands in for a read-only folder.)"""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ckpt.pt").write_bytes(b"never read")
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(tmp_path / "ro"))
    ckpt, ro = tmp_path / "ckpt", tmp_path / "ro"
    for argv, match in [([f"--out_dir={ckpt}", f"--hf_dir={ro / 'hf'}"], "target"),
                        ([f"--out_dir={ckpt}", f"--hf_dir={ro / 'a' / 'hf'}"], "target"),
                        ([f"--from_hf={ckpt}", f"--out_dir={ro}"], "out_dir"),
                        ([f"--from_hf={ckpt}", f"--out_dir={ro / 'o'}"], "out_dir")]:
        check_refusal(*run_main(capsys, *argv), f"can't write {match} .*ro is not writable")
    assert os.listdir(tmp_path / "ro") == []


# ---- bad input: one line on stderr, non-zero exit, nothing written ---------------------------

def snapshot(path):
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return open(path, "rb").read()
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def check_refusal(rc, err, match, code=1):
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]


def check_success(rc, err):
    assert rc == 0 and "Traceback" not in err, err


def run_cli(*argv, cwd=ROOT):
    """`python export.py ARGV` -> (exit code, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *argv], cwd=cwd, capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stderr


def run_main(capsys, *argv):
    """export.main(argv) in this process -> (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        export.main(list(argv))
    return e.value.code, capsys.readouterr().err


def cli_cases(tmp_path, ckpt_dir):
    names = ("full", "afile", "empty", "has_ckpt", "llama")
    full, afile, no_config, has_ckpt, llama = (tmp_path / n for n in names)
    for d in (full, no_config, has_ckpt, llama):
        d.mkdir()
    (full / "keep.txt").write_text("mine")
    afile.write_text("x")
    (has_ckpt / "ckpt.pt").write_bytes(b"precious")
    (llama / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    t = str(tmp_path)
    return [  # (argv, what must not change, stderr pattern, exit code)
        ([f"--out_dir={t}/nothing", f"--hf_dir={t}/hf1"], f"{t}/hf1", "no checkpoint at", 1),
        ([f"--out_dir={ckpt_dir}", f"--hf_dir={full}"], str(full), "not empty.*--force=True", 1),
        ([f"--out_dir={ckpt_dir}", f"--hf_dir={afile}"], str(afile), "not a folder", 1),
        ([f"--out_dir={ckpt_dir}", f"--hf_dir={afile}/a/hf"], str(afile), "write target .* not a folder", 1),
        ([f"--from_hf={llama}", f"--out_dir={afile}"], str(afile), "out_dir .*afile is not a folder", 1),
        ([f"--from_hf={llama}", f"--out_dir={afile}/o"], str(afile), "out_dir .*afile is not a folder", 1),
        ([f"--from_hf={t}/missing", f"--out_dir={t}/o1"], f"{t}/o1", "no folder", 1),
        ([f"--from_hf={no_config}", f"--out_dir={t}/o2"], f"{t}/o2", "no config.json", 1),
        ([f"--from_hf={llama}", f"--out_dir={t}/o3"], f"{t}/o3", "'llama' model .*not DeepseekV3", 1),
        ([f"--from_hf={llama}", f"--out_dir={has_ckpt}"], str(has_ckpt), "exists.*--force=True", 1),
        ([f"--from_hf={llama}", f"--hf_dir={t}/hf2"], f"{t}/hf2", "give one", 1),
        ([f"--out_dir={ckpt_dir}"], str(ckpt_dir), "--hf_dir=DIR", 1),
        (["--hf_dri=x"], None, "unknown config key 'hf_dri'.*hf_dir", 2),
        (["--from_hf", "x"], None, "--from_hf=x", 2),
    ]


def test_cli_bad_input(tmp_path):
    """The command-line cases, as a user meets them (each answered before torch is even imported)."""
    ckpt_dir = tmp_path / "ckpt"  # (never read: every case is refused before)
    ckpt_dir.mkdir()
    (ckpt_dir / "ckpt.pt").write_bytes(b"a checkpoint")
    for argv, target, match, code in cli_cases(tmp_path, ckpt_dir):
        before = snapshot(target) if target else None
        check_refusal(*run_cli(*argv), match, code)
        if target:
            assert snapshot(target) == before, argv
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("change,match", [
    (dict(score_func="softmax"), "score_func='softmax'.*sigmoid"),
    (dict(norm_eps=1e-5), "norm_eps=1e-05.*q_a_layernorm"),
    (dict(n_routed_experts=1, n_activated_experts=1), "n_routed_experts=1.*at least 2"),
    (dict(vocab_size=96), "vocab_size=96.*GPT-2"),
])
def test_refuses_what_transformers_cant_express(tmp_path, capsys, change, match):
    out = tmp_path / "out"
    save_ckpt(DeepSeekV3(ModelArgs(**{**BASE, **change})), str(out / "ckpt.pt"))
    check_refusal(*run_main(capsys, f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}"), match)
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.needs_gpt2
def test_bad_files_are_refused(b, tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "afile").write_text("x")
    cfg, data = read_json(b.hf), open(os.path.join(b.hf, "model.safetensors"), "rb").read()
    cases = [  # (argv, stderr pattern)
        ([f"--out_dir={tmp_path / 'junk'}", f"--hf_dir={tmp_path / 'hf'}"], "unreadable"),  # not a checkpoint
        # an export target that can't be made (its parent is a file)
        ([f"--out_dir={os.path.dirname(b.ckpt)}", f"--hf_dir={tmp_path / 'afile' / 'hf'}"], "can't write")]
    # DeepseekV3 folders: a truncated weights file, weights that don't fit the config, settings model.py
    # can't compute
    for name, change, weights_file, match in [
            ("trunc", {}, data[:5000], "can't read"), ("wrong", {"hidden_size": 64}, b.hf, "has shape"),
            ("eps", {"rms_norm_eps": 1e-5}, b.hf, "rms_norm_eps"),
            ("softmax", {"scoring_func": "softmax"}, b.hf, "scoring_func"),
            ("linear", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, b.hf,
             "rope_type='linear'")]:
        folder = hf_folder(tmp_path / name, {**cfg, **change}, weights_file)
        cases.append(([f"--from_hf={folder}", f"--out_dir={tmp_path / 'o'}"], match))
    before = sorted(os.listdir(tmp_path))
    for argv, match in cases:
        check_refusal(*run_main(capsys, *argv), match)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.needs_gpt2
def test_cli_export_and_import(b, tmp_path):
    """The happy path through the command line, both ways at once."""
    ckpt_dir = os.path.dirname(b.ckpt)
    procs = [subprocess.Popen([sys.executable, "export.py", *argv], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in ([f"--out_dir={ckpt_dir}", f"--hf_dir={tmp_path / 'hf'}", "--mtp=False"],
                          [f"--from_hf={b.hf}", f"--out_dir={tmp_path / 'out'}"])]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        check_success(p.returncode, err)
        outs.append(out)
    assert "no MTP" in outs[0] and "MTP depth 1" in outs[1]
    mtp = f"model.layers.{b.args.n_layer}."
    assert set(weights(tmp_path / "hf")) == {k for k in weights(b.hf) if not k.startswith(mtp)}
    _, ckpt = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert_same_state(ckpt["model"], b.model.state_dict())
