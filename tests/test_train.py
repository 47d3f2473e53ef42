"""train.py end to end on the CPU: loss falls, exact resume, DDP/FSDP/EP (gloo, 2 processes) == 1 process,
crash safety (SIGKILL at random moments, SIGTERM, Ctrl-C in an eval, a second Ctrl-C), out_dir
safety (no run replaced, nothing written by eval_only), and one clear line for every bad input."""
import contextlib
import functools
import io
import json
import os
import random
import runpy
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from conftest import fake_device  # noqa: E402
from model import DeepSeekV3, ModelArgs, load_checkpoint  # noqa: E402

# a small model that still has every part: MLA, a dense layer, MoE layers with groups, MTP
TINY = ["config/tinystories_debug.py", "--vocab_size=256", "--n_embd=32", "--n_head=2", "--block_size=32",
        "--batch_size=4", "--q_lora_rank=16", "--kv_lora_rank=16", "--qk_nope_head_dim=8",
        "--qk_rope_head_dim=8", "--v_head_dim=8", "--inter_dim=64", "--moe_inter_dim=16",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2"]


def make_data(d, n_train=40_000, n_val=4_000, vocab=200, seed=0):
    """A learnable token stream: a few fixed 'sentences' of random tokens, in random order."""
    rng = np.random.default_rng(seed)
    sentences = [rng.integers(0, vocab, size=rng.integers(5, 12)) for _ in range(12)]

    def stream(n):
        out = []
        while sum(map(len, out)) < n:
            out.append(sentences[rng.integers(len(sentences))])
        return np.concatenate(out)[:n].astype(np.uint16)
    d.mkdir(parents=True, exist_ok=True)
    stream(n_train).tofile(d / "train.bin")
    stream(n_val).tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"tokenizer": "test", "vocab_size": vocab, "eot_token": 0}))
    return d


def run_train(tmp, *args, check=True, env=None, timeout=240):
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}", *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def step_logs(out_dir):
    rows = [json.loads(l) for l in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r for r in rows if "loss" in r}


def step_losses(out_dir):
    return {i: r["loss"] for i, r in step_logs(out_dir).items()}


def snapshot(d):
    """Every file under d with its bytes and modification time (to show that nothing was written)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


@pytest.fixture
def tmp(tmp_path):
    make_data(tmp_path / "data")
    return tmp_path


def test_loss_falls(tmp):
    p = run_train(tmp, "--max_iters=40", "--eval_interval=20", "--learning_rate=1e-2")
    losses = step_losses(tmp / "out")
    assert sorted(losses) == list(range(40))  # max_iters optimizer steps, no more
    assert np.mean([losses[i] for i in range(3)]) > 5.0
    assert np.mean([losses[i] for i in range(35, 40)]) < 3.0
    # both losses are labelled: the eval's main cross-entropy, and the step's training objective
    assert "iter 40: eval ce train " in p.stdout and "(ce + 0.3 mtp + aux), lr" in p.stdout
    rows = [json.loads(l) for l in (tmp / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "ce/val" in r and "ce/train" in r] == [20, 40]  # (none at 0 from scratch)
    model, ckpt = load_checkpoint(str(tmp / "out" / "ckpt.pt"))
    assert ckpt["iter_num"] == 40 and "optimizer" in ckpt
    # the expert biases moved (the balancing update ran), and training logged MaxVio
    assert any(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())
    assert "maxvio" in p.stdout


def test_output_into_a_pipe_closed_early(tmp):
    """`python train.py ... | head -2`: the run ends when its reader leaves, quietly (no BrokenPipeError)."""
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == -signal.SIGPIPE and "Error" not in err, err


def test_resume_gives_exactly_the_same_losses(tmp):
    common = ["--eval_interval=1000", "--max_iters=12", "--lr_decay_iters=12", "--dropout=0.1"]
    run_train(tmp, *common)
    full = step_losses(tmp / "out")
    (tmp / "out").rename(tmp / "full")
    # stop after 6 steps (the end-of-run checkpoint), then resume to 12
    run_train(tmp, *common[:1], "--max_iters=6", "--lr_decay_iters=12", "--dropout=0.1")
    assert load_checkpoint(str(tmp / "out" / "ckpt.pt"))[1]["iter_num"] == 6
    run_train(tmp, *common, "--init_from=resume")
    resumed = step_losses(tmp / "out")
    assert sorted(resumed) == list(range(12))
    for i in range(6, 12):
        assert resumed[i] == full[i], (i, resumed[i], full[i])


def run_fp16_here(tmp, monkeypatch, init_scale, *args, growth_interval=2000):
    """train.py's fp16 path (autocast and GradScaler) on the CPU, which pick_device refuses for the user (fp16
    is for CUDA GPUs): the step and its skips, the scaler's checkpointed state. -> (exit code, stdout)."""
    import model
    monkeypatch.setattr(model, "pick_device", lambda *a: ("cpu", "float16", False, "padded", "cpu: float16"))
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(
        torch.amp.GradScaler, init_scale=init_scale, growth_interval=growth_interval))
    p = run_train_here(tmp, monkeypatch, "--eval_interval=1000", *args)
    return p.returncode, p.stdout


def test_fp16_overflows_skip_the_step_and_the_bias_update(tmp, monkeypatch):
    """Loss scaled by 2^40: every step's fp16 gradients overflow. Each is skipped on the device (weights, moments
    and expert biases untouched), the scale halves, and the run goes on: a scaler finding its scale is not a
    bad step (max_bad_steps=1 would stop a run at its first non-finite loss)."""
    code, out = run_fp16_here(tmp, monkeypatch, 2.0 ** 40, "--max_iters=3", "--max_bad_steps=1")
    assert code == 0 and out.count("fp16 gradients overflowed, step skipped") == 3, out
    ck = torch.load(tmp / "out" / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] == 3 and ck["scaler"]["scale"] == 2.0 ** 37
    torch.manual_seed(1337)  # train.py's seed: its initial weights
    init = DeepSeekV3(ModelArgs(**ck["model_args"])).state_dict()
    assert [k for k, v in ck["model"].items() if not torch.equal(v, init[k])] == []  # (biases too: zeros)
    assert all(float(st["step"]) == 0 for st in ck["optimizer"]["state"].values())


def test_fp16_resume_is_exact(tmp, monkeypatch):
    """With the scale growing every step, overflows (skipped steps) come every few steps; a resumed run must
    restore the scaler's scale and growth tracker to skip and step exactly as the uninterrupted run did."""
    common = ["--max_iters=10", "--lr_decay_iters=10"]
    assert run_fp16_here(tmp, monkeypatch, 2.0 ** 24, *common, growth_interval=1)[0] == 0
    full = step_losses(tmp / "out")
    (tmp / "out").rename(tmp / "full")
    assert run_fp16_here(tmp, monkeypatch, 2.0 ** 24, "--max_iters=5", "--lr_decay_iters=10",
                         growth_interval=1)[0] == 0
    code, out = run_fp16_here(tmp, monkeypatch, 2.0 ** 24, *common, "--init_from=resume", growth_interval=1)
    assert code == 0 and "fp16 gradients overflowed" in out, out  # (the test needs skipped steps after the resume)
    resumed = step_losses(tmp / "out")
    assert [resumed[i] for i in range(5, 10)] == [full[i] for i in range(5, 10)]
    ours, theirs = (torch.load(d / "ckpt.pt", weights_only=False) for d in (tmp / "out", tmp / "full"))
    assert ours["scaler"] == theirs["scaler"]
    assert [k for k in ours["model"] if not torch.equal(ours["model"][k], theirs["model"][k])] == []


def test_max_iters_steps_then_the_final_state_is_saved_and_resume_does_nothing(tmp, monkeypatch):
    """max_iters is the number of optimizer steps; the final state is evaluated and saved even where an
    earlier checkpoint has a better val loss, so resuming the finished run has nothing to do."""
    p = run_train(tmp, "--max_iters=5", "--eval_interval=2")
    assert sorted(step_losses(tmp / "out")) == [0, 1, 2, 3, 4]
    assert "iter 5: eval ce train" in p.stdout
    assert load_checkpoint(str(tmp / "out" / "ckpt.pt"))[1]["iter_num"] == 5
    # on to 7 steps at a learning rate that makes the val loss worse
    args = ["--init_from=resume", "--max_iters=7", "--learning_rate=1.0", "--min_lr=1.0", "--warmup_iters=0"]
    run_train(tmp, *args)
    rows = [json.loads(l) for l in (tmp / "out" / "log.jsonl").read_text().splitlines()]
    val = {r["iter"]: r["ce/val"] for r in rows if "ce/val" in r}
    assert sorted(val) == [2, 4, 5, 7] and val[7] > min(val.values())  # (from scratch: no eval at 0)
    assert load_checkpoint(str(tmp / "out" / "ckpt.pt"))[1]["iter_num"] == 7
    before = snapshot(tmp / "out")
    p = run_train_here(tmp, monkeypatch, *args)
    assert p.returncode == 0 and p.stderr == ""
    assert "nothing to do" in p.stdout and "parameters" not in p.stdout
    assert snapshot(tmp / "out") == before


def test_eval_only_evaluates_and_writes_nothing(tmp, monkeypatch):
    """The newcomer's `train.py config/tinystories_debug.py --eval_only=True --init_from=resume` trained
    on and replaced both checkpoints; now it prints the losses of the checkpoint and exits."""
    run_train(tmp, "--max_iters=4", "--eval_interval=1000")
    before = snapshot(tmp / "out")
    p = run_train_here(tmp, monkeypatch, "--eval_only=True", "--init_from=resume", "--eval_interval=20")
    assert p.returncode == 0 and "iter 4: eval ce train" in p.stdout, p.stderr
    assert "(ce + " not in p.stdout and "saved" not in p.stdout  # no step, no checkpoint
    assert snapshot(tmp / "out") == before
    # from scratch into a new out_dir: not even the folder is made
    p = run_train_here(tmp, monkeypatch, "--eval_only=True", f"--out_dir={tmp / 'new'}")
    assert "iter 0: eval ce train" in p.stdout and not (tmp / "new").exists(), p.stderr


# train.py under torchrun, then each rank saves the expert biases it ended with (to check that they agree)
BIASES = f"""import os, runpy, sys, torch
sys.path.insert(0, {str(REPO)!r})
g = runpy.run_path({str(REPO / "train.py")!r}, run_name="__main__")
biases = [m.gate.bias for m in g["raw_model"].moe_layers() if m.gate.bias is not None]  # (softmax: none)
torch.save(biases, os.path.join(g["out_dir"], f"biases{{g['rank']}}.pt"))
"""


def torchrun(tmp, out, *args, nproc=2):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    (tmp / "biases.py").write_text(BIASES)
    cmd = [exe if os.path.exists(exe) else "torchrun", "--standalone", f"--nproc_per_node={nproc}",
           str(tmp / "biases.py"), *TINY, f"--data_dir={tmp / 'data'}", f"--out_dir={out}", *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    b0, *bs = (torch.load(out / f"biases{r}.pt") for r in range(nproc))
    assert all(torch.equal(x, y) for b in bs for x, y in zip(b0, b)), "the ranks' expert biases differ"
    return p


def test_ddp_fsdp_and_ep_match_one_process(tmp):
    """Same global batch on 2 gloo processes: DDP and FSDP2 give the 1-process losses and expert
    biases; an FSDP checkpoint resumes in a single process (another world size) on the same track;
    expert parallelism (4 and 2 ranks) and its checkpoints, to and from one process, the same."""
    if not shutil.which("torchrun", path=os.path.dirname(sys.executable)) and not shutil.which("torchrun"):
        pytest.skip("torchrun not found")
    common = ["--eval_interval=1000", "--max_iters=6", "--lr_decay_iters=6", "--gradient_accumulation_steps=2",
              "--always_save_checkpoint=True"]
    run_train(tmp, *common)
    one = step_losses(tmp / "out")
    b1 = [m.gate.bias.clone() for m in load_checkpoint(str(tmp / "out" / "ckpt.pt"))[0].moe_layers()]

    torchrun(tmp, tmp / "ddp", *common)
    two = step_losses(tmp / "ddp")
    assert sorted(one) == sorted(two)
    for i in one:
        assert two[i] == pytest.approx(one[i], rel=1e-4, abs=1e-5), (i, one[i], two[i])
    b2 = [m.gate.bias for m in load_checkpoint(str(tmp / "ddp" / "ckpt.pt"))[0].moe_layers()]
    for x, y in zip(b1, b2):
        assert torch.allclose(x, y, atol=1e-6)

    # 1 micro-step of 4 sequences on 2 ranks: each rank takes 2 of the same 4 (README's torchrun line)
    one_step = [*common[:3], "--gradient_accumulation_steps=1", f"--out_dir={tmp / 'one1'}"]
    run_train(tmp, *one_step)
    p = torchrun(tmp, tmp / "ddp1", *one_step[:-1])
    assert "(2 rank(s) x 1 micro-steps x 2 x 32)" in p.stdout
    a, b = step_losses(tmp / "one1"), step_losses(tmp / "ddp1")
    assert sorted(a) == sorted(b) and all(b[i] == pytest.approx(a[i], rel=1e-4, abs=1e-5) for i in a), (a, b)

    # FSDP2 for the first 3 steps (0..2), then resume in ONE process from its checkpoint
    fs = tmp / "fsdp"
    torchrun(tmp, fs, *common[:-3], "--max_iters=3", "--lr_decay_iters=6", "--gradient_accumulation_steps=2",
             "--always_save_checkpoint=True", "--fsdp=True")
    first = step_losses(fs)
    assert load_checkpoint(str(fs / "ckpt.pt"))[1]["iter_num"] == 3
    run_train(tmp, *common, "--init_from=resume", f"--out_dir={fs}")
    after = step_losses(fs)
    for i in range(6):
        assert after[i] == pytest.approx(one[i], rel=1e-4, abs=1e-5), (i, one[i], after[i])
    assert all(first[i] == after[i] for i in range(3))

    # expert parallelism: 2 steps on 4 ranks (dp=2 x ep=2), 2 in one process from its checkpoint, the
    # last 2 on 2 ranks (ep=2) from that one's: the 1-process losses, grad norms and expert biases
    ep = tmp / "ep"
    torchrun(tmp, ep, *common[:-4], "--max_iters=2", *common[-3:], "--ep=2", nproc=4)
    run_train(tmp, *common[:-4], "--max_iters=4", *common[-3:], "--init_from=resume", f"--out_dir={ep}")
    torchrun(tmp, ep, *common, "--init_from=resume", "--ep=2")
    got, want = step_logs(ep), step_logs(tmp / "out")
    assert sorted(got) == sorted(want)
    for i in want:  # (AdamW hides a wrong gradient scale from the losses; the grad norm and moments show it)
        for k, tol in (("loss", 1e-5), ("grad_norm", 1e-6)):
            assert got[i][k] == pytest.approx(want[i][k], rel=tol), (i, k, want[i][k], got[i][k])
    a, b = (torch.load(d / "ckpt.pt") for d in (tmp / "out", ep))  # weights, biases and AdamW's moments
    torch.testing.assert_close(b["model"], a["model"])
    torch.testing.assert_close(b["optimizer"]["state"], a["optimizer"]["state"])


# ---- crash safety ---------------------------------------------------------------------------

def test_sigkill_at_random_moments_then_resume(tmp):
    """Kill a run with SIGKILL several times (once while a checkpoint is being written), resume each
    time; the final checkpoint loads and every resumed stretch reproduces the uninterrupted losses."""
    # a wider vocabulary makes the checkpoint big enough (~20 MB) to catch it being written
    common = ["--vocab_size=20000", "--n_embd=64", "--eval_interval=3", "--always_save_checkpoint=True",
              "--max_iters=20", "--lr_decay_iters=20", "--keep_last=True"]
    run_train(tmp, *common)
    full = step_losses(tmp / "out")
    (tmp / "out").rename(tmp / "full")
    rng = random.Random(0)
    out = tmp / "out"
    kills, killed_in_write = 0, False
    for attempt in range(8):
        args = common + (["--init_from=resume"] if (out / "ckpt.pt").exists() else [])
        cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"--data_dir={tmp / 'data'}", f"--out_dir={out}", *args]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        log = out / "log.jsonl"
        lines0 = len(log.read_text().splitlines()) if log.exists() else 0
        target = lines0 + rng.randint(2, 7)  # kill after a random number of logged steps
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if not killed_in_write and (out / "ckpt.pt.tmp").exists() and (out / "ckpt.pt").exists():
                proc.send_signal(signal.SIGKILL)  # mid-write: the old checkpoint must survive
                killed_in_write = True
                kills += 1
                break
            if killed_in_write and log.exists() and len(log.read_text().splitlines()) >= target:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        proc.wait()
        if (out / "ckpt.pt").exists():
            load_checkpoint(str(out / "ckpt.pt"))  # always loadable
        if kills >= 2 and killed_in_write:
            break
    assert killed_in_write and kills >= 2
    # finish the run and compare every logged step with the uninterrupted run
    run_train(tmp, *common, "--init_from=resume")
    assert load_checkpoint(str(out / "ckpt.pt"))[1]["iter_num"] == 20
    got = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            got.setdefault(r["iter"], []).append(r["loss"])
    for i, vals in got.items():
        for v in vals:  # a step run twice (before a kill and after the resume) gives the same loss
            assert v == full[i], (i, v, full[i])
    assert set(got) == set(range(20))


def test_non_finite_steps_change_nothing(tmp):
    """The skip happens on the device (fused AdamW's found_inf, a zero-scaled bias update), without
    the host looking: after a run of non-finite steps, parameters, moments and biases are as the
    last finite step left them, and every skipped step is reported by its number."""
    run_train(tmp, "--max_iters=4", "--always_save_checkpoint=True", "--eval_interval=1000")
    p = run_train(tmp, "--init_from=resume", "--max_iters=9", "--learning_rate=1e12", "--min_lr=1e12",
                  "--warmup_iters=0", "--grad_clip=0.0", "--eval_interval=1000", "--max_bad_steps=100",
                  "--always_save_checkpoint=True")
    skipped = [int(line.split(":")[0].split()[1]) for line in p.stdout.splitlines() if "step skipped" in line]
    assert skipped == list(range(skipped[0], 9)) and skipped[0] <= 7, p.stdout  # through the last one
    ck = torch.load(tmp / "out" / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] == 9
    tensors = list(ck["model"].values()) + [t for st in ck["optimizer"]["state"].values()
                                            for t in st.values() if torch.is_tensor(t)]
    assert all(torch.isfinite(t.float()).all() for t in tensors)
    steps = {float(st["step"]) for st in ck["optimizer"]["state"].values()}
    assert steps == {float(skipped[0])}, steps  # iterations 0..skipped[0]-1 stepped; a skipped one does not count


@pytest.fixture
def popen_train(tmp):
    """Starts train.py in the background (killed at the end of the test, whatever happens)."""
    procs = []

    def start(*args):
        cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"--data_dir={tmp / 'data'}", *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(proc, needle, timeout=60):
    """Reads proc's stdout until needle shows up (never blocking for long: the process may print nothing)."""
    seen, fd, t0 = "", proc.stdout.fileno(), time.time()
    while needle not in seen and time.time() - t0 < timeout:
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 1 << 16).decode()
            if not chunk:
                break
            seen += chunk
    assert needle in seen, seen[-3000:]


def test_sigterm_saves_and_exits_cleanly(tmp, popen_train):
    proc = popen_train(f"--out_dir={tmp / 'out'}", "--max_iters=100000", "--eval_interval=100000")
    wait_for(proc, "iter 3: loss")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err.startswith("SIGTERM: stopping") and err.count("\n") == 1, err
    ck = load_checkpoint(str(tmp / "out" / "ckpt.pt"))[1]
    assert ck["iter_num"] >= 3 and f"(iter {ck['iter_num']})" in out.splitlines()[-1]  # saved at the stop


def test_ctrl_c_abandons_an_eval_at_once(tmp, popen_train):
    """Ctrl-C in the middle of a long eval (the CPU quick-start's first eval takes ~20 minutes) takes
    effect at the next eval batch. Nothing trained since the last checkpoint: nothing is written (not
    even out_dir); a step trained since: it is saved, exactly as a run that stopped there saves it."""
    # a run saved at iters 1, 2 and 3 (from scratch, no eval at 0: its loss is ~ln(vocab_size))
    p = run_train(tmp, "--max_iters=3", "--eval_interval=1", "--always_save_checkpoint=True", f"--out_dir={tmp / 'ref'}")
    assert "iter 0: eval" not in p.stdout and "iter 1: eval" in p.stdout
    slow_eval = ["--eval_iters=10000000", "--eval_interval=3"]
    proc = popen_train(f"--out_dir={tmp / 'fresh'}", f"--init_from={tmp / 'ref'}", *slow_eval)  # (fine-tuning:
    wait_for(proc, "tokens per iteration")  # the eval at iter 0 is next)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err.startswith("SIGINT: stopping") and err.count("\n") == 1, err
    assert not (tmp / "fresh").exists()

    # ref's iter-2 checkpoint (ckpt.prev.pt) is resumed and stopped at 3
    (tmp / "out").mkdir()
    shutil.copy(tmp / "ref" / "ckpt.prev.pt", tmp / "out" / "ckpt.pt")
    proc = popen_train(f"--out_dir={tmp / 'out'}", "--init_from=resume", "--max_iters=6", *slow_eval)
    wait_for(proc, "eval at iter 3: train batch")  # a long eval shows its progress
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "saved checkpoint" in out, err
    got, ref = (torch.load(tmp / d / "ckpt.pt", weights_only=False) for d in ("out", "ref"))
    assert got["iter_num"] == ref["iter_num"] == 3

    def resume_state(ck):  # what a resume starts from: the weights and the optimizer's moments
        return [*ck["model"].values(), *(t for st in ck["optimizer"]["state"].values() for t in st.values())]
    assert all(torch.equal(x, y) for x, y in zip(resume_state(got), resume_state(ref), strict=True))


def test_ctrl_c_in_a_long_step_saves_it_and_a_second_one_quits_at_once(tmp, popen_train):
    """Ctrl-C in a long step (the flagship's takes ~51 s on a CPU) stops the run at the end of that step,
    saved (not one step later); a second Ctrl-C ends the process at once, without a traceback."""
    # (no log line after step 1: on the CPU the host looks at every step's flags, not only at a log line's)
    proc = popen_train(f"--out_dir={tmp / 'one'}", "--gradient_accumulation_steps=30", "--log_interval=1000")
    wait_for(proc, "iter 0: loss")  # inside step 1 now
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and load_checkpoint(str(tmp / "one" / "ckpt.pt"))[1]["iter_num"] == 2, out + err

    proc = popen_train(f"--out_dir={tmp / 'two'}", "--gradient_accumulation_steps=5000")
    wait_for(proc, "tokens per iteration")  # (from scratch: step 1 next, no eval at 0)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 3 and proc.returncode == -signal.SIGINT, (proc.returncode, out[-2000:], err)
    assert err.startswith("SIGINT: stopping") and "Ctrl-C again quits at once" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp / "two" / "ckpt.pt").exists()


def test_non_finite_steps_are_skipped_then_training_stops(tmp):
    run_train(tmp, "--max_iters=4", "--always_save_checkpoint=True", "--eval_interval=1000")
    before = (tmp / "out" / "ckpt.pt").read_bytes()
    p = run_train(tmp, "--init_from=resume", "--max_iters=40", "--learning_rate=1e12", "--min_lr=1e12",
                  "--warmup_iters=0", "--grad_clip=0.0", "--eval_interval=1000", "--max_bad_steps=3", check=False)
    assert p.returncode != 0
    assert "non-finite" in p.stdout and "step skipped" in p.stdout
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "non-finite steps in a row" in p.stderr
    assert (tmp / "out" / "ckpt.pt").read_bytes() == before  # the last good checkpoint is untouched


# ---- bad input: one line, non-zero exit, nothing overwritten ----------------------------------

def one_line_error(p, *needles):
    assert p.returncode != 0, p.stdout[-2000:]
    err = p.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("args,needles", [
    (["--batchsize=3"], ["batch_size"]),
    (["--batch_size=2.5"], ["batch_size"]),
    (["config/nope.py"], ["nope.py"]),
    (["--n_activated_experts=99"], ["n_activated_experts"]),
    (["--qk_rope_head_dim=7"], ["qk_rope_head_dim"]),
    (["--block_size=50000"], ["block_size"]),
    (["--batch_size=200"], ["fewer than one batch"]),
    (["--device=cuda"], ["device='cuda'"]) if not torch.cuda.is_available() else (["--device=cuda:99"], ["cuda:99"]),
    (["--device=tpu"], ["device='tpu'"]),
    (["--dtype=float16", "--device=cpu"], ["dtype='float16' needs a CUDA GPU"]),
    (["--dtype=int8"], ["dtype='int8'"]),
    (["--dtype=bfloat16", "--device=cpu"], ["bfloat16"]),
    (["--init_from=resume"], ["no checkpoint"]),
    (["--init_from=pretrained"], ["init_from"]),
    (["--compile=maybe"], ["compile"]),
    (["--moe_impl=loop"], ["moe_impl"]),
    (["--moe_impl=grouped", "--compile=True"], ["moe_impl='grouped'"]),
    (["--ep=3"], ["ep=3 must divide n_routed_experts=8"]),
    (["--ep=0"], ["ep=0 must divide n_routed_experts=8"]),
    (["--ep=2", "--n_routed_experts=0"], ["ep=2 must divide n_routed_experts=0"]),  # (a dense model)
    (["--ep=2"], ["ep=2 must divide the number of torchrun processes (1)"]),
    (["--fsdp=True"], ["fsdp=True shards the model over processes: launch with torchrun"]),
])
def test_bad_config(tmp, args, needles, monkeypatch):
    one_line_error(run_train_here(tmp, monkeypatch, *args), *needles)


def test_a_dense_model_runs_at_the_default_ep(tmp, monkeypatch):
    """A dense model (n_routed_experts=0, the dense twin) has no experts to share out: ep=1 is no error."""
    p = run_train_here(tmp, monkeypatch, "--n_routed_experts=0", "--eval_only=True")
    assert p.returncode == 0 and "iter 0: eval ce train" in p.stdout, p.stderr


@pytest.mark.parametrize("args,needle", [
    (["--ep=4"], "ep=4 must divide the number of torchrun processes (2)"),
    (["--ep=2", "--fsdp=True"], "ep=2 with fsdp=True is not supported")])
def test_bad_ep_under_torchrun(tmp, monkeypatch, args, needle):
    """Refused before the process group starts (which would wait for the other rank): one line."""
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    one_line_error(run_train_here(tmp, monkeypatch, *args), needle)
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("cc,args,needle", [
    ((6, 0), ["--compile=True"], "compile=True: Triton needs a GPU of compute capability 7+: GPU60 (sm60)"),
    ((7, 5), ["--dtype=bfloat16"], "dtype='bfloat16' needs a GPU of compute capability 8+: GPU75 (sm75)"),
    ((7, 5), ["--moe_impl=grouped"], "moe_impl='grouped'"),  # (fp16 here)
    ((8, 6), ["--dtype=float16", "--fsdp=True"], "fsdp=True with dtype='float16'"),
    ((8, 6), ["--dtype=float16", "--ep=2"], "ep=2 with dtype='float16' is not supported: use bfloat16"),
])
def test_what_the_gpu_cannot_run_is_one_line(tmp, monkeypatch, cc, args, needle):
    """On a (faked) GPU, refused before anything touches it: one line, nothing written."""
    fake_device(monkeypatch, cc)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():  # (fsdp needs torchrun's)
        monkeypatch.setenv(k, v)
    one_line_error(run_train_here(tmp, monkeypatch, "--device=cuda", *args), needle)
    assert not (tmp / "out").exists()


def run_train_here(tmp, monkeypatch, *args):
    """train.py run in this process up to its exit. Every bad-config case ends during set-up, so a
    fresh interpreter (4 s of importing torch each) buys nothing; an uncaught exception is printed
    as its traceback, which one_line_error then rejects, as it would from a subprocess."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}", *args])
    out, err, code = io.StringIO(), io.StringIO(), 0
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # train.py sets them
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO / "train.py"), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def test_bad_data(tmp):
    d = tmp / "data"
    (d / "val.bin").unlink()
    one_line_error(run_train(tmp, check=False), "val.bin", "prepare.py")
    make_data(d)
    with open(d / "train.bin", "ab") as f:
        f.write(b"\x01")  # half a token
    one_line_error(run_train(tmp, check=False), "train.bin", "uint16")
    make_data(d)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 50257}))
    one_line_error(run_train(tmp, check=False), "vocab")
    make_data(d)
    np.full(5000, 300, dtype=np.uint16).tofile(d / "train.bin")  # ids >= vocab_size=256
    (d / "meta.json").unlink()
    one_line_error(run_train(tmp, "--max_iters=2", check=False), "token id", "vocab_size")
    assert not (tmp / "out").exists()  # a failed run leaves no empty out_dir behind


def test_bad_checkpoints(tmp):
    run_train(tmp, "--max_iters=2", "--eval_interval=1000")
    ck = tmp / "out" / "ckpt.pt"
    good = ck.read_bytes()
    # a different architecture than the config asks for
    one_line_error(run_train(tmp, "--init_from=resume", "--n_layer=3", check=False), "different architecture", "n_layer")
    assert ck.read_bytes() == good
    # truncated
    ck.write_bytes(good[: len(good) // 2])
    one_line_error(run_train(tmp, "--init_from=resume", check=False), "unreadable")
    # not a checkpoint of ours
    torch.save({"weights": torch.zeros(2)}, ck)
    one_line_error(run_train(tmp, "--init_from=resume", check=False), "not a checkpoint")


def test_a_fresh_run_never_replaces_an_earlier_one(tmp, monkeypatch):
    """The newcomer's `train.py config/tinystories_debug.py` (init_from='scratch', the default) into an
    out_dir holding a run replaced its checkpoints and appended to its log; now it refuses in one line."""
    run_train(tmp, "--max_iters=2", "--eval_interval=1000")
    before = snapshot(tmp / "out")
    p = run_train_here(tmp, monkeypatch)
    one_line_error(p, "holds an earlier run", "--init_from=resume", "--out_dir")
    assert snapshot(tmp / "out") == before
    # the log of a run killed before its first checkpoint: a new run would mix two runs in one log
    (tmp / "out" / "ckpt.pt").unlink()
    p = run_train_here(tmp, monkeypatch)
    one_line_error(p, "holds an earlier run (log.jsonl)", "--out_dir")
    assert "--init_from=resume" not in p.stderr


def lock(path, on):
    """Makes path unwritable even for root (chattr +i), or undoes it; False where that is impossible."""
    if os.geteuid() != 0:
        path.chmod(0o555 if on else 0o755)
        return True
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp, monkeypatch):
    """out_dir a file, under a file, or not writable (a resumed run's own folder, or the folder it would
    be made in): one line before the model is even built, not a traceback 20 minutes into the run."""
    (tmp / "file").write_text("not a folder")
    for out in (tmp / "file", tmp / "file" / "run"):
        p = run_train_here(tmp, monkeypatch, f"--out_dir={out}")
        one_line_error(p, f"cannot write to out_dir={out}", "not a writable folder")
        assert "parameters" not in p.stdout
    run_train(tmp, "--max_iters=2", "--eval_interval=1000")
    (tmp / "locked").mkdir()
    if not (lock(tmp / "out", True) and lock(tmp / "locked", True)):
        lock(tmp / "out", False)
        pytest.skip("cannot make a folder unwritable here (chattr +i failed)")
    try:
        p = run_train_here(tmp, monkeypatch, "--init_from=resume", "--max_iters=4")
        one_line_error(p, f"cannot write to out_dir={tmp / 'out'}")
        assert "parameters" not in p.stdout
        one_line_error(run_train_here(tmp, monkeypatch, f"--out_dir={tmp / 'locked' / 'run'}"),
                       f"{tmp / 'locked'} is not a writable folder")
    finally:
        lock(tmp / "out", False)
        lock(tmp / "locked", False)


def test_wandb_not_logged_in_or_not_installed(tmp, monkeypatch):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp), NETRC=str(tmp / "no-netrc"), WANDB_DIR=str(tmp))  # no API key anywhere
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"--data_dir={tmp / 'data'}",
           f"--out_dir={tmp / 'out'}", "--wandb_log=True"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    one_line_error(p, "wandb login", "WANDB_MODE=offline")
    assert not (tmp / "out").exists()
    bogus = {**env, "WANDB_MODE": "bogus"}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=bogus)
    one_line_error(p, "wandb_log=True: ", "WANDB_MODE=offline")  # wandb's pydantic error, not its traceback
    assert not (tmp / "out").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: its import fails
    one_line_error(run_train_here(tmp, monkeypatch, "--wandb_log=True"), "pip install wandb")


def test_batch_that_cannot_be_shared_over_ranks(tmp):
    """3 micro-steps on 2 ranks: each rank takes half of every micro-batch, so an odd batch_size is
    refused (before the process group starts, which would wait forever for the missing rank)."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    one_line_error(run_train(tmp, "--gradient_accumulation_steps=3", "--batch_size=3", check=False, env=env, timeout=60),
                   "batch_size=3", "divisible by 2")


def test_wandb_offline(tmp):
    pytest.importorskip("wandb")
    p = run_train(tmp, "--max_iters=2", "--eval_interval=1000", "--wandb_log=True",
                  env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true"})
    assert p.returncode == 0
    runs = list((tmp / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())


def test_instruct_data_trains_on_the_masked_targets_only(tmp, monkeypatch):
    """prepare.py --instruct data: only targets whose mask byte is 1 carry the loss; without the masks, one line;
    init_from=<a run's out_dir> fine-tunes its weights from step 0; a missing one is one line."""
    d = tmp / "data"
    meta = json.loads((d / "meta.json").read_text())
    run_train(tmp, "--max_iters=2", "--eval_interval=1000")  # a base, on plain data
    (d / "meta.json").write_text(json.dumps({**meta, "instruct": True}))
    one_line_error(run_train_here(tmp, monkeypatch, "--eval_only=True"), "train.mask.bin", "prepare.py --instruct")
    losses = []
    for keep in (lambda n: np.ones(n), lambda n: np.arange(n) % 3 == 0):  # all targets; every third
        for split in ("train", "val"):
            keep(os.path.getsize(d / f"{split}.bin") // 2).astype(np.uint8).tofile(d / f"{split}.mask.bin")
        out = run_train_here(tmp, monkeypatch, "--eval_only=True", f"--init_from={tmp / 'out'}").stdout
        losses.append(out[out.index("eval ce"):])
    assert losses[0] != losses[1]
    one_line_error(run_train_here(tmp, monkeypatch, f"--init_from={tmp / 'nope'}", f"--out_dir={tmp / 'sft'}"),
                   "init_from=", "no checkpoint at")
    run_train(tmp, f"--init_from={tmp / 'out'}", f"--out_dir={tmp / 'sft'}", "--max_iters=2", "--eval_interval=1000")
    assert load_checkpoint(str(tmp / "sft" / "ckpt.pt"))[1]["iter_num"] == 2
