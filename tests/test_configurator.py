"""Tests for configurator.py: typed --key=value overrides, config files, and one-line errors (exit 2)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configurator import configure  # noqa: E402


def defaults():
    return {"__name__": "__main__", "_private": 1, "math": math, "helper": len, "Thing": dict,
            "batch_size": 12, "learning_rate": 6e-4, "compile": True, "out_dir": "out",
            "init_from": "scratch", "wandb_run_name": None, "betas": (0.9, 0.95), "dropout": 0.0}


def configured(capsys, *argv, g=None, quiet=False):
    g = defaults() if g is None else g
    configure(g, list(argv), quiet=quiet)
    return g, capsys.readouterr().out


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
    g, out = configured(capsys, arg)
    assert g[key] == value and type(g[key]) is type(value)
    assert out == f"Overriding: {key} = {value!r}\n"


def test_float_override_is_converted(capsys):
    g, _ = configured(capsys, "--dropout=0")
    assert g["dropout"] == 0.0 and isinstance(g["dropout"], float)


def test_quiet_and_no_args(capsys):
    g, out = configured(capsys, "--batch_size=4", quiet=True)
    assert g["batch_size"] == 4 and out == ""
    g, out = configured(capsys)
    assert g == defaults() and out == ""


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
    g, out = configured(capsys, "--init_from=gpt", str(cfg))
    assert g["batch_size"] == 48 and g["out_dir"] == "out-gpt"
    assert g["learning_rate"] == 1.0 and isinstance(g["learning_rate"], float)
    assert "f" not in g and "_scale" not in g and "os" not in g
    assert f"Overriding from {cfg}: batch_size = 48" in out


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
    ("x = 1\ny = (\n", "cfg.py:2: SyntaxError"),
    ("a = 1\n\nbatch_size = 1 / 0\n", "cfg.py:3: ZeroDivisionError: division by zero"),
    ("def f():\n    raise ValueError('bad\\nvalue')\nf()\n", "cfg.py:2: ValueError: bad value"),
    ("batch_size = undefined_name\n", "cfg.py:1: NameError"),
])
def test_config_file_errors(capsys, tmp_path, source, expect):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(source)
    assert expect in error(capsys, cfg)


def test_missing_or_unreadable_config_file(capsys, tmp_path):
    assert "config file 'nope.py' not found" in error(capsys, "nope.py")
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
    (["--batch_size=1e4"], "batch_size must be int (default 12), got float 10000.0"),
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


# -----------------------------------------------------------------------------
# as scripts use it: configure(globals()) in a real __main__

SCRIPT = """\
import json, math
batch_size = 12
learning_rate = 6e-4
compile = True
out_dir = 'out'
from configurator import configure
configure(globals())
print(json.dumps({k: globals()[k] for k in ('batch_size', 'learning_rate', 'compile', 'out_dir')}))
"""


def run_script(tmp_path, *argv):
    script = tmp_path / "train_like.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_script_overrides(tmp_path):
    (tmp_path / "cfg.py").write_text("batch_size = batch_size * 2\nlearning_rate = 1\n")
    p = run_script(tmp_path, "cfg.py", "--out_dir=out-x", "--compile=False")
    assert p.returncode == 0, p.stderr
    *log, result = p.stdout.splitlines()
    assert json.loads(result) == {"batch_size": 24, "learning_rate": 1.0, "compile": False, "out_dir": "out-x"}
    assert "Overriding: out_dir = 'out-x'" in log and "Overriding from cfg.py: batch_size = 24" in log


@pytest.mark.parametrize("argv", [["--batchsize=3"], ["--compile"], ["missing.py"], ["--out_dir", "x"]])
def test_script_errors_are_one_line(tmp_path, argv):
    p = run_script(tmp_path, *argv)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_script_help(tmp_path):
    p = run_script(tmp_path, "-h")
    assert p.returncode == 0 and "  batch_size = 12" in p.stdout and "math" not in p.stdout
