"""Tests for configurator.py: typed --key=value overrides, config files, and one-line errors (exit 2)."""
import json
import math
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configurator import configure  # noqa: E402


def defaults():
    return {"__name__": "__main__", "_private": 1, "math": math, "helper": len, "Thing": dict,
            "batch_size": 12, "learning_rate": 6e-4, "compile": True, "out_dir": "out",
            "init_from": "scratch", "wandb_run_name": None, "betas": (0.9, 0.95), "dropout": 0.0}


def configured(capsys, *argv, g=None, tty=True):
    """Runs configure, stderr a terminal or not; returns g and what it said on stderr (on stdout: nothing)."""
    g = defaults() if g is None else g
    with mock.patch.object(sys.stderr, "isatty", lambda: tty):
        configure(g, list(argv))
    out, err = capsys.readouterr()
    assert out == ""
    return g, err


def error(capsys, *argv, g=None):
    """Runs configure expecting failure; returns the one stderr line."""
    with pytest.raises(SystemExit) as e:
        configure(defaults() if g is None else g, [str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# -----------------------------------------------------------------------------
# overrides

@pytest.mark.parametrize("arg, key, value", [
    ("--batch_size=32", "batch_size", 32),
    ("--learning_rate=1e-3", "learning_rate", 1e-3),
    ("--learning_rate=1", "learning_rate", 1.0),  # int accepted for a float, stored as float
    ("--compile=False", "compile", False),
    ("--out_dir=out-tiny", "out_dir", "out-tiny"),  # not a literal: raw string
    ("--out_dir=123", "out_dir", "123"),  # a literal, but the default is a str
    ("--out_dir='quoted'", "out_dir", "quoted"),
    ("--out_dir=", "out_dir", ""),
    ("--init_from=resume", "init_from", "resume"),
    ("--wandb_run_name=run 1", "wandb_run_name", "run 1"),  # None default takes anything
    ("--wandb_run_name=7", "wandb_run_name", 7),
    ("--betas=(0.9, 0.99)", "betas", (0.9, 0.99)),
])
def test_override_types(capsys, arg, key, value):
    g, err = configured(capsys, arg)
    assert g[key] == value and type(g[key]) is type(value)
    assert err == f"config: {arg} -> {key}={value!r}\n"


def test_float_override_is_converted(capsys):
    g, _ = configured(capsys, "--dropout=0")
    assert g["dropout"] == 0.0 and isinstance(g["dropout"], float)


def test_no_args_say_nothing(capsys):
    g, err = configured(capsys)
    assert g == defaults() and err == ""


def test_later_arguments_win(capsys, tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 64\n")
    g, _ = configured(capsys, "--batch_size=8", str(cfg))
    assert g["batch_size"] == 64
    g, _ = configured(capsys, str(cfg), "--batch_size=8")
    assert g["batch_size"] == 8


# -----------------------------------------------------------------------------
# config files

def test_config_file_reads_earlier_values_and_may_define_helpers(capsys, tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text("import os\n_scale = 4\ndef f(x):\n    return x * _scale\n"
                   "batch_size = f(batch_size)\nout_dir = 'out-' + init_from\nlearning_rate = 1\n")
    g, err = configured(capsys, "--init_from=gpt", str(cfg))
    assert g["batch_size"] == 48 and g["out_dir"] == "out-gpt"
    assert g["learning_rate"] == 1.0 and isinstance(g["learning_rate"], float)
    assert "f" not in g and "_scale" not in g and "os" not in g
    assert err == (f"config: --init_from=gpt, {cfg} -> batch_size=48, learning_rate=1.0, out_dir='out-gpt', "
                   "init_from='gpt'\n")


def test_failed_config_file_changes_nothing(capsys, tmp_path):
    cfg = tmp_path / "half.py"
    cfg.write_text("batch_size = 1\nraise RuntimeError('nope')\n")
    g = defaults()
    error(capsys, cfg, g=g)
    assert g == defaults()


@pytest.mark.parametrize("source, expect", [
    ("batch_size = 3\nbatchsize = 4\n", "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    ("compile = 'yes'\n", "compile must be True or False"),
    ("batch_size = 2.5\n", "batch_size must be int"),
    ("out_dir = 5\n", "out_dir must be str"),
    ("x = 1\ny = (\n", "cfg.py: SyntaxError: '(' was never closed (cfg.py, line 2)"),
    ("a = 1\n\nbatch_size = 1 / 0\n", "cfg.py:3: ZeroDivisionError: division by zero"),
    ("def f():\n    raise ValueError('bad\\nvalue')\nf()\n", "cfg.py:2: ValueError: bad value"),
    ("batch_size = undefined_name\n", "cfg.py:1: NameError"),
])
def test_config_file_errors(capsys, tmp_path, source, expect):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(source)
    assert expect in error(capsys, cfg)


def test_missing_or_unreadable_config_file(capsys, tmp_path):
    assert "cannot read config file 'nope.py' (No such file or directory)" in error(capsys, "nope.py")
    assert "did you mean --batch_size=3?" in error(capsys, "batch_size=3")
    assert "cannot read config file" in error(capsys, tmp_path)  # a directory
    (tmp_path / "bin.py").write_bytes(b"x = '\xff\xfe'\n")
    assert "cannot read config file" in error(capsys, tmp_path / "bin.py")


# -----------------------------------------------------------------------------
# override errors

@pytest.mark.parametrize("argv, expect", [
    (["--batchsize=3"], "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    (["--learning-rate=3"], "did you mean 'learning_rate'?"),
    (["--zzz=1"], "unknown config key 'zzz' (see --help"),
    (["--math=1"], "unknown config key 'math'"),  # modules, functions and _private are not settings
    (["--_private=2"], "unknown config key '_private'"),
    (["--helper=2"], "unknown config key 'helper'"),
    (["--compile=true"], "compile must be True or False, got 'true' (write --compile=True"),
    (["--compile=1"], "compile must be True or False, got 1"),
    (["--batch_size=True"], "batch_size must be int"),
    (["--batch_size=1e4"], "batch_size must be int (default 12), got 10000.0"),
    (["--batch_size=abc"], "batch_size must be int"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--betas=[0.9, 0.9]"], "betas must be tuple"),
    (["--batch_size", "16"], "write --batch_size=16 (with '=')"),
    (["--batch_size"], "--batch_size needs a value"),
    (["--compile"], "write --compile=True or --compile=False"),
    (["-b=3"], "unrecognized argument '-b=3'"),
])
def test_override_errors(capsys, argv, expect):
    assert expect in error(capsys, *argv)


def test_help_lists_keys_with_current_values(capsys):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), ["--batch_size=3", "--help", "--not_reached=1"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "  batch_size = 3\n" in out and "  out_dir = 'out'\n" in out and "  wandb_run_name = None\n" in out
    assert "math" not in out and "helper" not in out and "_private" not in out and "__name__" not in out


def test_constants_are_not_knobs(capsys, tmp_path):
    """Knobs are lowercase: a script's UPPER_CASE constants can't be set, and a config file's are its own."""
    g = {**defaults(), "EOT": 50256}
    assert "unknown config key 'EOT'" in error(capsys, "--EOT=13", g=g)
    (tmp_path / "c.py").write_text("GPUS = 4\nbatch_size = 64 // GPUS\nEOT = 13\n")
    g, err = configured(capsys, str(tmp_path / "c.py"), g=g)
    assert g["EOT"] == 50256 and g["batch_size"] == 16 and "GPUS" not in g
    assert err == f"config: {tmp_path / 'c.py'} -> batch_size=16\n"


def test_none_only_where_the_default_is_none(capsys):
    g, _ = configured(capsys, "--wandb_run_name=x", "--wandb_run_name=None")
    assert g["wandb_run_name"] is None
    err = error(capsys, "--learning_rate=None")
    assert err == "error: learning_rate must be float (default 0.0006), got None\n"


def test_config_line_says_what_changed(capsys, tmp_path, monkeypatch):
    g, err = configured(capsys, "--batch_size=12", "--compile=True")
    assert err == "config: --batch_size=12, --compile=True -> nothing changed\n"
    many = {f"knob_{i}": i for i in range(100)}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.py").write_text("".join(f"knob_{i} = {i + 1000}\n" for i in range(100)))
    _, err = configured(capsys, "c.py", g=many)
    assert len(err) <= 300 and err.endswith(", knob_18=1018, ... (100 changed)\n"), err
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
    g, err = configured(capsys, "--batch_size=7")
    assert g["batch_size"] == 7 and err == ""


def test_no_config_line_where_stderr_is_captured(capsys):
    """Not at a terminal (a test, a pipe, a log file) a script's error stays its one line on stderr."""
    g, err = configured(capsys, "--batch_size=7", tty=False)
    assert g["batch_size"] == 7 and err == ""


# -----------------------------------------------------------------------------
# as scripts use it: configure(globals()) in a real __main__

SCRIPT = '''\
"""Train something small:
    python train_like.py cfg.py --batch_size=8

Not shown by --help.
"""
import json, math
from dataclasses import fields
from argsmod import Args
EOT = 50256  # a constant, not a knob
batch_size = 12  # sequences per step
learning_rate = 6e-4
compile = True   # torch.compile the model,
                 # on CUDA only
# a section comment, not compile's
out_dir = 'out'  # where ckpt.pt goes
globals().update({f.name: f.default for f in fields(Args)})
from configurator import configure
configure(globals())
print(json.dumps({k: globals()[k] for k in ('batch_size', 'learning_rate', 'compile', 'out_dir')}))
'''
ARGSMOD = '''\
from dataclasses import dataclass
@dataclass
class Args:
    # --- a section ---
    n_layer: int = 2      # blocks
    dropout: float = 0.0  # residual dropout,
                          # in training only
    # --- another section ---
    bias: bool = False
'''


def run_script(tmp_path, *argv, tty=False):
    """Runs SCRIPT; with tty, its stderr is a terminal (a pseudo-terminal read back here)."""
    script = tmp_path / "train_like.py"
    script.write_text(SCRIPT)
    (tmp_path / "argsmod.py").write_text(ARGSMOD)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(script), *argv]
    if not tty:
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    main, term = pty.openpty()
    p = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=term, text=True, timeout=60)
    os.close(term)
    err = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # (EIO: the terminal's other end is closed)
            break
        if not chunk:
            break
        err += chunk
    os.close(main)
    p.stderr = err.decode().replace("\r\n", "\n")
    return p


def test_script_overrides(tmp_path):
    """Only the script's own output on stdout (`python sample.py > story.txt` stays clean); what the
    command line changed is one line on stderr."""
    (tmp_path / "cfg.py").write_text("batch_size = batch_size * 2\nlearning_rate = 1\nn_layer = 3\n")
    p = run_script(tmp_path, "cfg.py", "--out_dir=out-x", "--compile=False", tty=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == dict(batch_size=24, learning_rate=1.0, compile=False, out_dir="out-x")
    assert p.stderr == ("config: cfg.py, --out_dir=out-x, --compile=False -> batch_size=24, "
                        "learning_rate=1.0, compile=False, out_dir='out-x', n_layer=3\n")


@pytest.mark.parametrize("argv", [["--batchsize=3"], ["--compile"], ["missing.py"], ["--out_dir", "x"],
                                  ["--EOT=1"]])
def test_script_errors_are_one_line(tmp_path, argv):
    p = run_script(tmp_path, *argv)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_script_help(tmp_path):
    p = run_script(tmp_path, "--batch_size=3", "-h")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout == """\
usage: python train_like.py [config.py ...] [--key=value ...]
Train something small:
    python train_like.py cfg.py --batch_size=8

knobs (config files and --key=value change them):
  batch_size = 3                      # sequences per step
  learning_rate = 0.0006
  compile = True                      # torch.compile the model, on CUDA only
  out_dir = 'out'                     # where ckpt.pt goes
  n_layer = 2                         # blocks
  dropout = 0.0                       # residual dropout, in training only
  bias = False
"""


def closed_pipe_run(cmd, cwd):
    """cmd with its stdout a pipe whose reader has already gone, as `cmd | head -3` once head is done."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(cmd, cwd=cwd, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)


@pytest.mark.parametrize("script", ["train.py", "sample.py", "bench.py", "export.py"])
def test_help_into_a_closed_pipe_ends_quietly(script):
    """`python train.py --help | head -3`: the reader leaving early is normal, not a traceback."""
    p = closed_pipe_run([sys.executable, script, "--help"], REPO)
    assert p.returncode == -signal.SIGPIPE and p.stderr == "", p.stderr
