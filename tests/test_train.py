"""train.py end to end on the CPU: loss falls, exact resume, DDP (gloo, 2 processes) == 1 process,
crash safety (SIGKILL at random moments, SIGTERM), and one clear line for every bad input."""
import contextlib
import io
import json
import os
import random
import runpy
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
from model import load_checkpoint  # noqa: E402

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


def step_losses(out_dir):
    rows = [json.loads(l) for l in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["train/loss_step"] for r in rows if "train/loss_step" in r}


@pytest.fixture
def tmp(tmp_path):
    make_data(tmp_path / "data")
    return tmp_path


def test_loss_falls(tmp):
    p = run_train(tmp, "--max_iters=40", "--eval_interval=20", "--learning_rate=1e-2")
    losses = step_losses(tmp / "out")
    assert np.mean([losses[i] for i in range(3)]) > 5.0
    assert np.mean([losses[i] for i in range(36, 41)]) < 3.0
    assert "val loss" in p.stdout
    model, ckpt = load_checkpoint(str(tmp / "out" / "ckpt.pt"))
    assert ckpt["iter_num"] > 0 and "optimizer" in ckpt and "rng" in ckpt
    # the expert biases moved (the balancing update ran), and training logged MaxVio
    assert any(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())
    assert "maxvio" in p.stdout


def test_resume_gives_exactly_the_same_losses(tmp):
    common = ["--eval_interval=1000", "--max_iters=12", "--lr_decay_iters=12", "--dropout=0.1"]
    run_train(tmp, *common)
    full = step_losses(tmp / "out")
    (tmp / "out").rename(tmp / "full")
    # stop after 7 steps (the end-of-run checkpoint), then resume to 12
    run_train(tmp, *common[:1], "--max_iters=6", "--lr_decay_iters=12", "--dropout=0.1", "--always_save_checkpoint=True")
    assert load_checkpoint(str(tmp / "out" / "ckpt.pt"))[1]["iter_num"] == 7
    run_train(tmp, *common, "--init_from=resume")
    resumed = step_losses(tmp / "out")
    assert set(range(7, 13)) <= set(resumed)
    for i in range(7, 13):
        assert resumed[i] == full[i], (i, resumed[i], full[i])


def torchrun(tmp, out, *args):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe if os.path.exists(exe) else "torchrun", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *TINY, f"--data_dir={tmp / 'data'}", f"--out_dir={out}", *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_ddp_and_fsdp_two_processes_match_one(tmp):
    """Same global batch on 2 gloo processes: DDP and FSDP2 give the 1-process losses and expert
    biases; an FSDP checkpoint resumes in a single process (another world size) on the same track."""
    if not shutil.which("torchrun", path=os.path.dirname(sys.executable)) and not shutil.which("torchrun"):
        pytest.skip("torchrun not found")
    common = ["--eval_interval=1000", "--max_iters=6", "--lr_decay_iters=6", "--gradient_accumulation_steps=2",
              "--always_save_checkpoint=True"]
    run_train(tmp, *common)
    one = step_losses(tmp / "out")
    b1 = [m.gate.bias.clone() for m in load_checkpoint(str(tmp / "out" / "ckpt.pt"))[0].moe_layers()]

    p = torchrun(tmp, tmp / "ddp", *common)
    two = step_losses(tmp / "ddp")
    assert sorted(one) == sorted(two)
    for i in one:
        assert two[i] == pytest.approx(one[i], rel=1e-4, abs=1e-5), (i, one[i], two[i])
    assert "expert biases identical on all 2 ranks: True" in p.stdout
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

    # FSDP2 for the first 4 steps (0..3), then resume in ONE process from its checkpoint
    fs = tmp / "fsdp"
    p = torchrun(tmp, fs, *common[:-3], "--max_iters=3", "--lr_decay_iters=6", "--gradient_accumulation_steps=2",
                 "--always_save_checkpoint=True", "--fsdp=True")
    assert "expert biases identical on all 2 ranks: True" in p.stdout
    first = step_losses(fs)
    assert load_checkpoint(str(fs / "ckpt.pt"))[1]["iter_num"] == 4
    run_train(tmp, *common, "--init_from=resume", f"--out_dir={fs}")
    after = step_losses(fs)
    for i in range(7):
        assert after[i] == pytest.approx(one[i], rel=1e-4, abs=1e-5), (i, one[i], after[i])
    assert all(first[i] == after[i] for i in range(4))


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
    assert load_checkpoint(str(out / "ckpt.pt"))[1]["iter_num"] == 21
    got = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss_step" in r:
            got.setdefault(r["iter"], []).append(r["train/loss_step"])
    for i, vals in got.items():
        for v in vals:  # a step run twice (before a kill and after the resume) gives the same loss
            assert v == full[i], (i, v, full[i])
    assert set(range(21)) <= set(got)


def test_non_finite_steps_change_nothing(tmp):
    """The skip happens on the device (fused AdamW's found_inf, a zero-scaled bias update), without
    the host looking: after a run of non-finite steps, parameters, moments and biases are as the
    last finite step left them, and every skipped step is reported (one step late) by its number."""
    run_train(tmp, "--max_iters=4", "--always_save_checkpoint=True", "--eval_interval=1000")
    p = run_train(tmp, "--init_from=resume", "--max_iters=9", "--learning_rate=1e12", "--min_lr=1e12",
                  "--warmup_iters=0", "--grad_clip=0.0", "--eval_interval=1000", "--max_bad_steps=100",
                  "--always_save_checkpoint=True")
    skipped = [int(line.split(":")[0].split()[1]) for line in p.stdout.splitlines() if "step skipped" in line]
    assert skipped == list(range(skipped[0], 10)) and skipped[0] <= 7, p.stdout  # through the last one
    ck = torch.load(tmp / "out" / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] == 10
    tensors = list(ck["model"].values()) + [t for st in ck["optimizer"]["state"].values()
                                            for t in st.values() if torch.is_tensor(t)]
    assert all(torch.isfinite(t.float()).all() for t in tensors)
    steps = {float(st["step"]) for st in ck["optimizer"]["state"].values()}
    assert steps == {float(skipped[0])}, steps  # iterations 0..skipped[0]-1 stepped; a skipped one does not count


def test_sigterm_saves_and_exits_cleanly(tmp):
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}",
           "--max_iters=100000", "--eval_interval=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp / "out" / "log.jsonl"
    t0 = time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() - t0 < 60:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "saving a checkpoint and exiting" in out
    ck = load_checkpoint(str(tmp / "out" / "ckpt.pt"))[1]
    assert ck["iter_num"] >= 3


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
    (["--device=cuda"], ["CUDA"]) if not torch.cuda.is_available() else (["--device=cuda", "--dtype=float16"], ["dtype"]),
    (["--dtype=bfloat16", "--device=cpu"], ["bfloat16"]),
    (["--init_from=resume"], ["no checkpoint"]),
    (["--init_from=pretrained"], ["init_from"]),
    (["--compile=maybe"], ["compile"]),
    (["--reduce_dtype=float16"], ["reduce_dtype"]),
])
def test_bad_config(tmp, args, needles, monkeypatch):
    one_line_error(run_train_here(tmp, monkeypatch, *args), *needles)


def run_train_here(tmp, monkeypatch, *args):
    """train.py run in this process up to its exit. Every bad-config case ends during set-up, so a
    fresh interpreter (4 s of importing torch each) buys nothing; an uncaught exception is printed
    as its traceback, which one_line_error then rejects, as it would from a subprocess."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}", *args])
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO / "train.py"), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
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


def test_batch_that_cannot_be_shared_over_ranks(tmp):
    """3 micro-steps on 2 ranks: each rank takes half of every micro-batch, so an odd batch_size is
    refused (before the process group starts, which would wait forever for the missing rank)."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    one_line_error(run_train(tmp, "--gradient_accumulation_steps=3", "--batch_size=3", check=False, env=env, timeout=60),
                   "batch_size=3", "divisible by 2")


def test_bf16_gradient_reduce_needs_nccl(tmp):
    """DDP's bf16 all-reduce hook is NCCL's: under gloo (CPU) it is refused before anything starts."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    one_line_error(run_train(tmp, "--gradient_accumulation_steps=2", "--reduce_dtype=bfloat16", check=False, env=env),
                   "reduce_dtype", "CUDA")


def test_wandb_offline(tmp):
    pytest.importorskip("wandb")
    p = run_train(tmp, "--max_iters=2", "--eval_interval=1000", "--wandb_log=True",
                  env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true"})
    assert p.returncode == 0
    runs = list((tmp / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())
