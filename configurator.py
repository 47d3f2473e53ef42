"""
Config overrides, after nanoGPT's: configure(globals()) applies config files (Python run with the current
values) and --key=value (a Python literal, else the text) to a script's knobs, the globals whose first letter
is lowercase (not CONSTANTS, _private) bar modules and callables. Strict: unknown keys, '--key value', broken
files and values not of the default's type (a float takes an int; a None default anything) exit 2.
"""
import ast
import difflib
import inspect
import linecache
import os
import re
import signal
import sys
import traceback
from dataclasses import fields, is_dataclass


def fail(msg, code=2):  # (2: a bad knob or input; 1: it failed at work)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def knobs(g):
    return [k for k, v in g.items() if k[0].islower() and not (inspect.ismodule(v) or callable(v))]


def set_knob(g, defaults, key, value, raw=None, where=""):
    """g[key] = value in the type of defaults[key], or exit with one line that says why not."""
    if key not in defaults:
        close = "".join(f" (did you mean '{c}'?)" for c in difflib.get_close_matches(key, list(defaults), 1))
        fail(f"{where}unknown config key '{key}'{close or ' (see --help)'}")
    default = defaults[key]
    if isinstance(default, str) and raw is not None and not isinstance(value, str):
        value = raw  # a literal of another type taken as the text written: --out_dir=123 is '123'
    if isinstance(default, bool) and not isinstance(value, bool):
        fail(f"{key} must be True or False, got {value!r} (write --{key}=True or --{key}=False)")
    value = float(value) if isinstance(default, float) and type(value) in (int, float) else value
    if default is not None and type(value) is not type(default):
        fail(f"{key} must be {type(default).__name__} (default {default!r}), got {value!r}")
    g[key] = value


def run_config_file(path, g, defaults, only_known=False):
    ns, source = dict(g), None  # a copy of g, so a file that fails halfway changes nothing
    try:
        with open(path) as f:
            source = f.read()
        exec(compile(source, path, "exec"), ns)
    except Exception as e:  # one line: the deepest frame in the config file itself gives the line to blame
        if source is None:  # unreadable; a missing file may be a --key=value without its '--'
            fail(f"cannot read config file '{path}' ({getattr(e, 'strerror', None) or e})"
                 + (f" (did you mean --{path}?)" if "=" in path and not os.path.exists(path) else ""))
        lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path]
        fail(f"{path}{f':{lines[-1]}' if lines else ''}: {type(e).__name__}: " + " ".join(str(e).split()))
    for k in knobs(ns):  # (values it left alone are the very same objects)
        if (k not in g and not only_known) or (k in g and g[k] is not ns[k]):
            set_knob(g, defaults, k, ns[k], where=f"{path}: ")


def show_help(g, caller):
    """Usage, the caller's docstring's first paragraph, then the knobs: value, and the comment on their last
    definition above the configure() call, or in a dataclass whose fields they all are (ModelArgs)."""
    docs = dict.fromkeys(knobs(g), "")
    lines = [ln for v in g.values() if inspect.isclass(v) and is_dataclass(v) and
             {f.name for f in fields(v)} <= set(docs) for ln in inspect.getsourcelines(v)[0]]
    text = "".join(lines + linecache.getlines(caller.f_code.co_filename)[:caller.f_lineno])
    # `name = value  # doc`, `name: type = value  # doc` (dataclass field) or `"name": value,  # doc` (dict),
    # the doc maybe continued on comment-only lines indented deeper than the name
    for m in re.finditer(r"""(?m)^( *)["']?(\w+)["']? *[:=][^#\n]*(#.*(?:\n\1 +#.*)*)?""", text):
        if m[2] in docs:
            docs[m[2]] = " ".join(part.strip(" #") for part in (m[3] or "").split("\n"))
    doc = re.split(r"\n\s*\n(?=\S)", (caller.f_globals.get("__doc__") or "").strip())[0]
    rows = [f"{f'  {k} = {g[k]!r}':36}  # {d}" if d else f"  {k} = {g[k]!r}" for k, d in docs.items()]
    print(f"usage: python {os.path.basename(sys.argv[0])} [config.py ...] [--key=value ...]\n{doc}\n\n"
          "knobs (config files and --key=value change them):", *rows, sep="\n", flush=True)
    sys.exit(0)


def configure(g, argv=None, only_known=False):
    """Applies config files and --key=value in argv (default sys.argv[1:]) to g (only_known: a file's keys
    that g lacks are left out); to a person at a terminal, says what changed on stderr (captured: silent)."""
    if hasattr(signal, "SIGPIPE"):  # a reader that leaves early (| head) ends the script quietly, like cat
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    before = {k: g[k] for k in knobs(g)}
    for i, arg in enumerate(argv):
        key, eq, raw = arg[2:].partition("=")
        if arg in ("-h", "--help"):
            show_help(g, inspect.currentframe().f_back)
        elif not arg.startswith("-"):
            run_config_file(arg, g, before, only_known)
        elif not arg.startswith("--"):
            fail(f"unrecognized argument '{arg}' (overrides look like --key=value)")
        elif key in before and not eq:  # '--key value', or a bool's '--key' alone
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            fail(f"write --{key}={nxt} (with '='), not '--{key} {nxt}'" if nxt else f"--{key} needs a value: "
                 f"write --{key}=" + (f"True or --{key}=False" if isinstance(before[key], bool) else "VALUE"))
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                value = raw  # not a Python literal: take it as text, e.g. --out_dir=out-foo
            set_knob(g, before, key, value, raw)
    changed = [f"{k}={g[k]!r}" for k in before if g[k] != before[k]]
    line = f"config: {', '.join(argv)} -> {', '.join(changed) or 'nothing changed'}"
    if argv and sys.stderr.isatty() and os.environ.get("RANK", "0") == "0":  # (torchrun: rank 0 alone)
        short = f"{line[:280].rsplit(', ', 1)[0]}, ... ({len(changed)} changed)"  # at a knob's end
        print(line if len(line) <= 300 else short, file=sys.stderr)
