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
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM  # noqa: E402

import export  # noqa: E402
from model import DeepSeekV3, ModelArgs, load_checkpoint  # noqa: E402

# transformers builds a zero-width shared-expert MLP when there is none: torch warns it has nothing to init
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

BASE = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, inter_dim=48, n_dense_layers=1,
            moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
            n_shared_experts=1, mtp_depth=1)
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
        self.root = root
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


def assert_same_state(a, b, skip=None):
    """Same keys (those starting with skip left out), same dtypes, bit-identical values."""
    a = {k: v for k, v in a.items() if not (skip and k.startswith(skip))}
    b = {k: v for k, v in b.items() if not (skip and k.startswith(skip))}
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def safetensors_keys(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


# ---- transformers computes what model.py computes --------------------------------------------

@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(built, name):
    b = built(name)
    idx = tokens(b.args, T=48)
    with torch.no_grad():
        ours, _ = b.model(idx, torch.zeros_like(idx))
        theirs = b.hf_model(idx).logits
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
    msg = export.import_hf(b.hf, str(tmp_path / "back"))
    assert "MTP depth" in msg
    model, ckpt = load_checkpoint(str(tmp_path / "back" / "ckpt.pt"))
    assert_same_state(ckpt["model"], b.model.state_dict())  # MTP included
    assert ckpt["iter_num"] == 0 and ckpt["config"] == {} and "optimizer" not in ckpt
    expected = ["n_dense_layers"] if b.args.n_routed_experts == 0 else []  # (all dense: either value says it)
    assert b.args.differences(ModelArgs(**ckpt["model_args"])) == expected


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", CONFIGS)
def test_config_json(built, name):
    b = built(name)
    a = b.args
    with open(os.path.join(b.hf, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert cfg["q_lora_rank"] == (a.q_lora_rank or None)
    assert cfg["num_nextn_predict_layers"] == a.mtp_depth
    assert cfg["first_k_dense_replace"] == (a.n_dense_layers if a.n_routed_experts else a.n_layer)
    assert cfg["tie_word_embeddings"] == a.tie_embeddings and cfg["eos_token_id"] == cfg["bos_token_id"] == 50256
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
    keys = safetensors_keys(b.hf)
    n = a.n_layer
    if a.n_routed_experts:
        moe = n - 1
        assert f"model.layers.{moe}.mlp.gate.e_score_correction_bias" in keys
        assert f"model.layers.{moe}.mlp.experts.{a.n_routed_experts - 1}.gate_proj.weight" in keys
    for k in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{n}.{k}.weight" in keys
    assert f"model.layers.{n}.self_attn.kv_a_proj_with_mqa.weight" in keys
    assert ("lm_head.weight" in keys) == (not a.tie_embeddings)
    with open(os.path.join(b.hf, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 50256


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", CONFIGS)
def test_deepseek_rope_keys_alone_give_the_same_logits(built, name, tmp_path):
    """transformers 4, DeepSeek's code, vLLM and SGLang read rope_theta and rope_scaling, not rope_parameters;
    without rope_parameters transformers 5 reads them too, and must build the same model."""
    b = built(name)
    with open(os.path.join(b.hf, "config.json")) as f:
        cfg = json.load(f)
    del cfg["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.link(os.path.join(b.hf, "model.safetensors"), tmp_path / "model.safetensors")
    hm = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    idx = tokens(b.args, T=48)
    with torch.no_grad():
        assert rel(hm(idx).logits, b.model(idx, torch.zeros_like(idx))[0]) < 1e-4


@pytest.mark.needs_gpt2
def test_tokenizer_matches_tiktoken(built):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    tok = AutoTokenizer.from_pretrained(built("q0-1group-1shared-1dense").hf)
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
def test_transformers_mtp_module_drafts_like_ours(built, monkeypatch):
    """transformers >= 5.17 rebuilds MTP layers from the checkpoint for generate(use_mtp=True), but only
    finds them under DeepseekV3's pattern for layer 61; pointed at our layer, it computes what we do."""
    mtp_mod = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(mtp_mod, "MtpModel"):
        pytest.skip("this transformers has no MTP support")
    b = built("q0-1group-1shared-1dense")
    n = b.args.n_layer
    monkeypatch.setattr(DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected", [rf"model\.layers\.{n}\..*"])
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
        _, theirs, _ = mtp(input_ids=x[:, 1:], last_hidden_states=h[:, :-1], position_ids=torch.arange(T - 1)[None],
                           attention_mask=torch.ones_like(x[:, 1:]), mtp_cache=None)
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
    assert not any(k.startswith(f"model.layers.{b.args.n_layer}") for k in safetensors_keys(hf))
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["num_nextn_predict_layers"] == 0
    hm, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    # and --mtp=False on import drops them from a folder that has them
    export.import_hf(b.hf, str(tmp_path / "back"), mtp=False)
    model, ckpt = load_checkpoint(str(tmp_path / "back" / "ckpt.pt"))
    assert model.args.mtp_depth == 0
    assert_same_state(ckpt["model"], b.model.state_dict(), skip=("mtp.",))


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("name", ["4groups-2shared-0dense-yarn-tied", "2groups-0shared-2dense-yarn-mtp2"])
def test_import_what_transformers_saves(built, name, tmp_path):
    """save_pretrained of the loaded model (no MTP weights left, tied head left out, config still
    saying num_nextn_predict_layers) imports to the same main weights."""
    b = built(name)
    b.hf_model.save_pretrained(str(tmp_path / "saved"))
    export.import_hf(str(tmp_path / "saved"), str(tmp_path / "back"))
    model, ckpt = load_checkpoint(str(tmp_path / "back" / "ckpt.pt"))
    assert model.args.mtp_depth == 0
    assert_same_state(ckpt["model"], b.model.state_dict(), skip=("mtp.",))


@pytest.mark.needs_gpt2
def test_import_fused_expert_names(built, tmp_path):
    b = built("q0-1group-1shared-1dense")
    sd = b.hf_model.state_dict()  # transformers' own layout: experts.gate_up_proj / experts.down_proj
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    folder = tmp_path / "fused"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    with open(os.path.join(b.hf, "config.json")) as f:
        (folder / "config.json").write_text(f.read())
    export.import_hf(str(folder), str(tmp_path / "back"))
    _, ckpt = load_checkpoint(str(tmp_path / "back" / "ckpt.pt"))
    assert_same_state(ckpt["model"], b.model.state_dict(), skip=("mtp.",))


@pytest.mark.needs_gpt2
def test_import_refuses_mtp_copies_that_differ(built, tmp_path):
    b = built("q0-1group-1shared-1dense")
    folder = tmp_path / "edited"
    folder.mkdir()
    with safe_open(os.path.join(b.hf, "model.safetensors"), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd[f"model.layers.{b.args.n_layer}.shared_head.head.weight"] += 1.0
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(open(os.path.join(b.hf, "config.json")).read())
    with pytest.raises(export.ExportError, match="mtp=False"):
        export.import_hf(str(folder), str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()
    export.import_hf(str(folder), str(tmp_path / "back"), mtp=False)


@pytest.mark.needs_gpt2
def test_force_replaces_an_export(built, tmp_path):
    b = built("q0-1group-1shared-1dense")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "stale.txt").write_text("old")
    export.export_hf(b.ckpt, str(hf), force=True)
    assert not (hf / "stale.txt").exists() and (hf / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left beside it
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "ckpt.pt").write_bytes(b"old")
    export.import_hf(str(hf), str(tmp_path / "back"), force=True)
    assert load_checkpoint(str(tmp_path / "back" / "ckpt.pt"))[0].args == b.args
    assert sorted(os.listdir(tmp_path / "back")) == ["ckpt.pt"]


@pytest.mark.needs_gpt2
def test_a_failed_write_leaves_nothing(built, tmp_path, monkeypatch):
    b = built("q0-1group-1shared-1dense")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "old.txt").write_text("previous export")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "write_tokenizer", disk_full)
    with pytest.raises(export.ExportError, match="can't write .*No space left"):
        export.export_hf(b.ckpt, str(hf), force=True)
    assert snapshot(str(hf)) == {"old.txt": b"previous export"} and sorted(os.listdir(tmp_path)) == ["hf"]
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(export.ExportError, match="can't write .*ckpt.pt: No space left"):
        export.import_hf(b.hf, str(tmp_path / "back"))
    assert sorted(os.listdir(tmp_path)) == ["hf"]


@pytest.mark.needs_gpt2
def test_a_failed_write_removes_the_folders_it_made(built, tmp_path, monkeypatch):
    b = built("q0-1group-1shared-1dense")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "write_tokenizer", disk_full)
    with pytest.raises(export.ExportError, match="No space left"):
        export.export_hf(b.ckpt, str(tmp_path / "new" / "er" / "hf"))
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(export.ExportError, match="No space left"):
        export.import_hf(b.hf, str(tmp_path / "new" / "back"))
    assert os.listdir(tmp_path) == []


def modes(root):
    """{path under root: its permission bits}, root itself as '.'."""
    out = {".": os.stat(root).st_mode & 0o777}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out[os.path.relpath(os.path.join(d, n), root)] = os.stat(os.path.join(d, n)).st_mode & 0o777
    return out


@pytest.mark.needs_gpt2
def test_cli_defaults_and_modes(built, tmp_path):
    """`python export.py --hf_dir=X` reads train.py's default out_dir, and what export.py writes gets the
    modes of the user's umask (022: files 0644, folders 0755), not tempfile's private ones."""
    b = built("q0-1group-1shared-1dense")
    os.makedirs(tmp_path / "out-tinystories")
    os.link(b.ckpt, tmp_path / "out-tinystories" / "ckpt.pt")
    cli = [sys.executable, os.path.join(ROOT, "export.py")]
    old = os.umask(0o022)
    try:
        for argv in (["--hf_dir=hf"], ["--from_hf=hf", "--out_dir=new/back"]):
            p = subprocess.run(cli + argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    finally:
        os.umask(old)
    assert modes(tmp_path / "hf") == {".": 0o755, **{n: 0o644 for n in os.listdir(tmp_path / "hf")}}
    assert modes(tmp_path / "new") == {".": 0o755, "back": 0o755, "back/ckpt.pt": 0o644}


@pytest.mark.needs_gpt2
def test_modes_follow_the_umask(built, tmp_path):
    b = built("q0-1group-1shared-1dense")
    old = os.umask(0o027)
    try:
        export.export_hf(b.ckpt, str(tmp_path / "hf"))
        export.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    finally:
        os.umask(old)
    assert set(modes(tmp_path / "hf").values()) == {0o750, 0o640} and modes(tmp_path / "hf")["."] == 0o750
    assert modes(tmp_path / "back") == {".": 0o750, "ckpt.pt": 0o640}


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
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        check_refusal(e.value.code, capsys.readouterr().err, f"can't write {match} .*ro is not writable")
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


def run_cli(*argv):
    p = subprocess.run([sys.executable, "export.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stderr


def llama_folder(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return d


def cli_cases(tmp_path, ckpt_dir):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("x")
    no_config = tmp_path / "empty"
    no_config.mkdir()
    has_ckpt = tmp_path / "has_ckpt"
    has_ckpt.mkdir()
    (has_ckpt / "ckpt.pt").write_bytes(b"precious")
    llama = llama_folder(tmp_path)
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
        rc, err = run_cli(*argv)
        check_refusal(rc, err, match, code)
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
    args = ModelArgs(**{**BASE, **change})
    out = tmp_path / "out"
    save_ckpt(DeepSeekV3(args), str(out / "ckpt.pt"))
    with pytest.raises(SystemExit) as e:
        export.main([f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}"])
    check_refusal(e.value.code, capsys.readouterr().err, match)
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.needs_gpt2
def test_bad_files_are_refused(built, tmp_path, capsys):
    b = built("q0-1group-1shared-1dense")
    cases = []
    # a checkpoint that isn't one
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "ckpt.pt").write_bytes(b"not a checkpoint")
    cases.append(([f"--out_dir={junk}", f"--hf_dir={tmp_path / 'hf'}"], "unreadable"))
    # an export target that can't be made (its parent is a file)
    (tmp_path / "afile").write_text("x")
    cases.append(([f"--out_dir={os.path.dirname(b.ckpt)}", f"--hf_dir={tmp_path / 'afile' / 'hf'}"],
                  "can't write"))
    # a DeepseekV3 folder with a truncated weights file
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text(open(os.path.join(b.hf, "config.json")).read())
    (trunc / "model.safetensors").write_bytes(open(os.path.join(b.hf, "model.safetensors"), "rb").read()[:5000])
    cases.append(([f"--from_hf={trunc}", f"--out_dir={tmp_path / 'o1'}"], "can't read"))
    # a DeepseekV3 folder whose weights don't fit its config
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cfg = json.loads(open(os.path.join(b.hf, "config.json")).read())
    (wrong / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    (wrong / "model.safetensors").write_bytes(open(os.path.join(b.hf, "model.safetensors"), "rb").read())
    cases.append(([f"--from_hf={wrong}", f"--out_dir={tmp_path / 'o2'}"], "has shape"))
    # settings model.py can't compute
    for i, (key, value, match) in enumerate([("rms_norm_eps", 1e-5, "rms_norm_eps"),
                                             ("scoring_func", "softmax", "scoring_func"),
                                             ("rope_parameters", {"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 1e4}, "rope_type='linear'")]):
        d = tmp_path / f"cfg{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        os.link(os.path.join(b.hf, "model.safetensors"), d / "model.safetensors")
        cases.append(([f"--from_hf={d}", f"--out_dir={tmp_path / f'o{i + 3}'}"], match))
    before = sorted(os.listdir(tmp_path))
    for argv, match in cases:
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        check_refusal(e.value.code, capsys.readouterr().err, match)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.needs_gpt2
def test_cli_export_and_import(built, tmp_path):
    """The happy path through the command line, both ways at once."""
    b = built("q0-1group-1shared-1dense")
    procs = [subprocess.Popen([sys.executable, "export.py", f"--out_dir={os.path.dirname(b.ckpt)}",
                               f"--hf_dir={tmp_path / 'hf'}", "--mtp=False"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             subprocess.Popen([sys.executable, "export.py", f"--from_hf={b.hf}", f"--out_dir={tmp_path / 'out'}"],
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in err, err
        outs.append(out)
    assert "no MTP" in outs[0] and "MTP depth 1" in outs[1]
    assert safetensors_keys(str(tmp_path / "hf")) == {k for k in safetensors_keys(b.hf)
                                                      if not k.startswith(f"model.layers.{b.args.n_layer}.")}
    _, ckpt = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert_same_state(ckpt["model"], b.model.state_dict())
