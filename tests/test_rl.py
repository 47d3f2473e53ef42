"""rl.py: the words task's reward, GRPO's advantage and one step on a toy model, resume, bad inputs."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import rl  # noqa: E402
from model import DeepSeekV3, ModelArgs  # noqa: E402


@pytest.mark.parametrize("story, words, ended, expect", [
    ("The cat sat.", ["cat", "dog"], True, 0.5),
    ("Two Cats and three DOGS.", ["cat", "dog"], True, 1.0),              # case, plural -s
    ("She kissed the boxes, jumped and went walking.", ["kiss", "box", "walk"], True, 1.0),  # -ed -es -ing
    ("He was dancing, she cried, the puppy smiled.", ["dance", "cry", "smile"], True, 1.0),  # e/y stems
    ("A category of scattered catalogs.", ["cat", "scatter"], True, 0.5),  # inside a longer word: no
    ("The cat sat.", ["cat"], False, 0.0),                               # never ended
    ("", ["cat"], True, 0.0),
])
def test_reward_hand_cases(story, words, ended, expect):
    assert rl.reward(story, words, ended) == expect


def test_the_task_for_a_story_and_an_instruct_record():
    story = 'Tom found a shiny red ball in the garden. "Look!" he shouted to his happy sister.'
    prompt, text = rl.to_example(story)
    assert text == story and prompt.startswith("Features: Dialogue\nWords: ") and prompt.endswith("\nStory: ")
    words = rl.words_of(prompt)
    assert len(set(words)) == 3 and rl.reward(story, words) == 1.0 and not set(words) & rl.STOP_WORDS
    assert rl.to_example(story) == (prompt, text)  # seeded by the story: the same words every time
    assert rl.to_example("Tom ran home.") is None  # fewer than 3 content words: no task
    rec = "Summary: a tree.\nFeatures: Twist\nWords: quit, oak, gloomy\nStory: \n\nSara saw an oak.\n"
    assert rl.to_example(rec) == ("Features: Twist\nWords: quit, oak, gloomy\nStory: ", "Sara saw an oak.")


def test_group_advantage_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.4, 0.6, 0.8])
    a = rl.advantages(r, 4)
    for g in range(2):
        x = r[4 * g:4 * g + 4].tolist()
        m = sum(x) / 4
        sd = (sum((v - m) ** 2 for v in x) / 3) ** 0.5
        assert torch.allclose(a[4 * g:4 * g + 4], torch.tensor([(v - m) / (sd + 1e-4) for v in x]), atol=1e-6)


def toy_model():
    torch.manual_seed(0)
    return DeepSeekV3(ModelArgs(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, q_lora_rank=16,
                                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                inter_dim=64, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2,
                                mtp_depth=1)).eval()


@pytest.mark.parametrize("ppo_epochs, kl_coef", [(1, 0.0), (3, 0.1)])
def test_one_grpo_step_raises_the_rewarded_completion(monkeypatch, ppo_epochs, kl_coef):
    monkeypatch.setattr(rl, "prompt_len", 4)
    monkeypatch.setattr(rl, "kl_coef", kl_coef)
    model, ref = toy_model(), toy_model()
    seq = torch.tensor([[1, 2, 3, 4, 10, 11, 12, 13], [1, 2, 3, 4, 20, 21, 22, 23]])
    mask = torch.ones(2, 4)
    adv = rl.advantages(torch.tensor([1.0, 0.0]), 2)  # the first completion earned the reward
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = rl.token_logp(model, seq).sum(1).detach()
    with torch.no_grad():
        ref_logp = rl.token_logp(ref, seq)
    old = before_tok = rl.token_logp(model, seq).detach()
    for _ in range(ppo_epochs):
        loss, kl = rl.grpo_loss(rl.token_logp(model, seq), old if ppo_epochs > 1 else before_tok, ref_logp, adv, mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = rl.token_logp(model, seq).sum(1).detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_grpo_loss_is_the_clipped_surrogate_and_k3(monkeypatch):
    monkeypatch.setattr(rl, "kl_coef", 0.5)
    logp, old, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), torch.tensor([[-1.2, -2.5]])
    adv, mask = torch.tensor([2.0]), torch.tensor([[1.0, 1.0]])
    loss, kl = rl.grpo_loss(logp, old, ref, adv, mask)
    ratio = torch.exp(logp - old)  # e^0.5 = 1.65 is clipped to 1.2, e^-1 = 0.37 is not
    surrogate = torch.minimum(ratio * 2, ratio.clamp(0.8, 1.2) * 2)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    assert torch.allclose(kl, k3.mean()) and torch.allclose(loss, -(surrogate - rl.kl_coef * k3).mean())
    assert torch.allclose(surrogate, torch.tensor([[2.4, 2 * float(np.exp(-1.0))]]))


# ---- rl.py end to end, on a debug model SFT'd for a few steps (tiktoken's GPT-2 vocabulary needed)

@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """prepare --instruct on made-up stories, a tiny base (train.py), a few SFT steps (config/sft_debug.py)."""
    pytest.importorskip("tiktoken")
    from conftest import gpt2_available
    if not gpt2_available():
        pytest.skip("tiktoken's GPT-2 vocabulary is not available offline")
    d = tmp_path_factory.mktemp("rl")
    rng = np.random.default_rng(0)
    nouns = "cat dog ball tree cake boat kite frog bird sun hat box apple garden river".split()
    stories = [f"Tom saw a {rng.choice(nouns)} near the {rng.choice(nouns)}. He liked the {rng.choice(nouns)}."
               for _ in range(400)]
    (d / "s.txt").write_text("\n\n".join(stories[:300]))
    (d / "s_valid.txt").write_text("\n\n".join(stories[300:]))
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO, capture_output=True, text=True, timeout=300)
    tiny = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--q_lora_rank=16", "--kv_lora_rank=16", "--block_size=64",
            "--batch_size=4", "--eval_iters=1", "--log_interval=10"]
    for p in [run("prepare.py", "--instruct", "--input", d / "s.txt", d / "s_valid.txt", "--out_dir", d / "data"),
              run("train.py", "config/tinystories_debug.py", *tiny, f"--data_dir={d / 'data'}",
                  f"--out_dir={d / 'base'}", "--max_iters=2"),
              run("train.py", "config/sft_debug.py", *tiny, f"--data_dir={d / 'data'}", f"--out_dir={d / 'sft'}",
                  f"--init_from={d / 'base'}", "--max_iters=2")]:
        assert p.returncode == 0, p.stderr[-2000:]
    return d


def run_rl(d, *args, reward=None):
    """rl.py config/grpo_debug.py on the sft fixture, in this process (reward: in place of rl.reward);
    -> (exit code, stderr)."""
    argv = ["rl.py", "config/grpo_debug.py", f"--data_dir={d / 'data'}", f"--init_from={d / 'sft'}",
            "--max_new_tokens=12", "--prompt_len=24", "--eval_prompts=4", *map(str, args)]
    saved = dict(vars(rl))
    rl.reward = reward or rl.reward
    code, err = 0, io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rl.configure(vars(rl), argv[1:])
            rl.main()
    except SystemExit as e:
        code = e.code
    finally:
        vars(rl).update(saved)
    return code, err.getvalue()


def some_reward(story, words, ended=True):  # varies from completion to completion: the steps move the weights
    return (len(story) % 5) / 4


@pytest.mark.needs_gpt2
def test_resume_is_exact(sft, monkeypatch):
    monkeypatch.chdir(REPO)
    out, part = sft / "full", sft / "part"
    assert run_rl(sft, f"--out_dir={out}", "--max_iters=4", reward=some_reward) == (0, "")
    assert run_rl(sft, f"--out_dir={part}", "--max_iters=2", reward=some_reward) == (0, "")
    assert run_rl(sft, f"--out_dir={part}", "--max_iters=4", "--init_from=resume", reward=some_reward) == (0, "")
    logs = [[json.loads(l) for l in (o / "log.jsonl").read_text().splitlines()] for o in (out, part)]
    same = [[{k: v for k, v in r.items() if k != "ms" and "per_s" not in k} for r in log] for log in logs]
    assert same[0] == same[1] and len(same[0]) == 3 + 4  # evals at 0, 2, 4 and 4 steps
    assert any(r.get("grad_norm", 0) > 0 for r in logs[0])
    a, b = (torch.load(o / "ckpt.pt", weights_only=True)["model"] for o in (out, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.needs_gpt2
@pytest.mark.parametrize("args, reward, needle", [
    (["--group_size=1"], None, "group_size=1"),
    (["--init_from=NOPE"], None, "no checkpoint at NOPE"),
    (["--data_dir=NOPE"], None, "prepare.py --instruct"),
    ([], lambda s, w, e=True: [0.5, 0.5], "reward() must return one number in [0, 1] per completion, got [0.5"),
    ([], lambda s, w, e=True: 1.5, "got 1.5"),
    ([], lambda s, w, e=True: float("nan"), "got nan"),
])
def test_bad_inputs_one_line(sft, tmp_path, monkeypatch, args, reward, needle):
    monkeypatch.chdir(REPO)
    code, err = run_rl(sft, f"--out_dir={tmp_path / 'o'}", *args, reward=reward)
    assert code != 0 and err.strip().count("\n") == 0 and needle in err, err
    assert not (tmp_path / "o" / "ckpt.pt").exists()
