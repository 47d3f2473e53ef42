"""
Config overrides for train.py / sample.py / export.py, in the spirit of nanoGPT's configurator.
A script defines its defaults as plain globals, then calls

    from configurator import configure
    configure(globals())

and the command line can change them:

    python train.py config/tiny.py --batch_size=32 --out_dir=out-tiny

Arguments without '--' are config files: Python files exec'd with the current globals (so they
can read earlier values), whose assignments become the new values. '--key=value' parses value as
a Python literal, falling back to the raw string, so '--out_dir=out-foo' needs no quotes.

Unlike nanoGPT this is strict, because a typo silently ignored costs a whole training run:
unknown keys, values of the wrong type, '--key value' without '=', and broken config files all
stop with one 'error: ...' line on stderr and exit code 2. Types follow the default's:
  bool  -> True or False only (not true/1/yes: one spelling, and no surprises from 'False' strings)
  int   -> an int (not a bool, not 1e4)
  float -> an int or a float (stored as float)
  str   -> any text, as written ('--out_dir=123' gives the string '123')
  None  -> anything
  other -> a value of the same type (e.g. a tuple default needs a tuple)
'-h' / '--help' prints every key with its current value and exits.
"""
import ast
import difflib
import inspect
import sys
import traceback


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def is_config(name, value):
    # the script's imports, helper functions and private names are not settings
    return not name.startswith("_") and not (inspect.ismodule(value) or inspect.isroutine(value)
                                             or inspect.isclass(value))


def unknown_key(key, keys):
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else " (see --help for the list)"
    fail(f"unknown config key '{key}'{hint}")


def check_type(key, value, default, raw=None):
    """Returns value converted to the default's type, or exits with an error naming both."""
    if default is None:
        return value
    if isinstance(default, str):
        # the raw text wins over a literal that parsed as something else: --out_dir=123 -> '123'
        if raw is not None and not isinstance(value, str):
            return raw
        if isinstance(value, str):
            return value
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
        fail(f"{key} must be True or False, got {value!r} (write --{key}=True or --{key}=False)")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, type(default)):
        return value
    fail(f"{key} must be {type(default).__name__} (default {default!r}), got {type(value).__name__} {value!r}")


def run_config_file(path, g, quiet):
    try:
        with open(path) as f:
            source = f.read()
    except FileNotFoundError:
        fail(f"config file '{path}' not found" + (f" (did you mean --{path}?)" if "=" in path else ""))
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read config file '{path}' ({e})")
    ns = dict(g)  # a copy, so a file that fails halfway changes nothing
    try:
        exec(compile(source, path, "exec"), ns)
    except SyntaxError as e:
        fail(f"{path}:{e.lineno}: SyntaxError: {e.msg}")
    except Exception as e:
        # the deepest frame that is in the config file itself gives the line to blame
        lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path]
        where = f"{path}:{lines[-1]}" if lines else path
        fail(f"{where}: {type(e).__name__}: " + " ".join(str(e).split()))
    keys = [k for k, v in g.items() if is_config(k, v)]
    for k, v in ns.items():
        if not is_config(k, v) or (k in g and g[k] is v):
            continue  # helpers the file defined, or values it did not touch
        if k not in keys:
            fail(f"{path}: unknown config key '{k}'" + (
                f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, keys, n=1)) else ""))
        g[k] = check_type(k, v, g[k])
        if not quiet:
            print(f"Overriding from {path}: {k} = {g[k]!r}")


def configure(g, argv=None, quiet=False):
    """Applies config files and --key=value overrides from argv (default sys.argv[1:]) to the dict g."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg in ("-h", "--help"):
            print("config keys (override with --key=value, or name a config file):")
            for k, v in g.items():
                if is_config(k, v):
                    print(f"  {k} = {v!r}")
            sys.exit(0)
        if not arg.startswith("-"):
            run_config_file(arg, g, quiet)
            continue
        if not arg.startswith("--"):
            fail(f"unrecognized argument '{arg}' (overrides look like --key=value)")
        key, eq, raw = arg[2:].partition("=")
        keys = [k for k, v in g.items() if is_config(k, v)]
        if key not in keys:
            unknown_key(key, keys)
        if not eq:
            if isinstance(g[key], bool):
                fail(f"--{key} needs a value: write --{key}=True or --{key}=False")
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                fail(f"write --{key}={argv[i + 1]} (with '='), not '--{key} {argv[i + 1]}'")
            fail(f"--{key} needs a value: write --{key}=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = raw  # not a Python literal: take it as text, e.g. --out_dir=out-foo
        g[key] = check_type(key, value, g[key], raw=raw)
        if not quiet:
            print(f"Overriding: {key} = {g[key]!r}")
