"""
nanoGPT-style configuration, hardened. train.py writes its config as plain globals, then runs

    exec(open('configurator.py').read())  # overrides from config files and --key=value

which applies each argument of sys.argv[1:] in order to train.py's globals:

    python train.py config/long_sft_cpu.py --batch_size=8 --learning_rate=3e-4

  config/x.py   a positional argument is a config file: plain Python, exec'd with the current config
                visible. Every public name it binds must be an existing config key (names starting with
                "_" and the modules, functions and classes it imports or defines are ignored), and its
                values are checked like command-line values.
  --key=value   the value is parsed by ast.literal_eval, falling back to the text as written.

Hardened where nanoGPT's configurator is weak (its issues #156, #439):
  - an unknown key is an error that names it and the closest existing keys;
  - the value must fit the type of the default train.py wrote (not of a value a config file set),
    else an error names the key, the expected type and the given type:
        int     also 1e4 or 2.0 (integral floats); 1.5 is an error
        float   also ints
        bool    True/False/true/false/1/0
        str     the text as written, quotes optional: --init_from=resume, --out_dir=1e4 (a string)
        None    a default of None accepts any literal, else the text as a string
        list/tuple  either, converted to the default's type
  - "--key=a=b" sets key to "a=b" (split on the first '=');
  - "--help" lists the config keys and their values.
Config keys are train.py's public globals whose value is None, bool, int, float, str, list, tuple or
dict when the configurator runs. Importing this module (tests) only defines apply_overrides().
"""
import builtins
import ast
import difflib
import os
import sys

_CONFIG_TYPES = (type(None), bool, int, float, str, list, tuple, dict)


class ConfigError(ValueError):
    pass


def _config_keys(g):
    return {k: v for k, v in g.items() if not k.startswith("_") and isinstance(v, _CONFIG_TYPES)}


def _unknown(key, defaults):
    close = difflib.get_close_matches(key, list(defaults), n=3)
    return ConfigError(f"unknown config key '{key}'" + (f"; did you mean {', '.join(close)}?" if close else ""))


def _parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text  # not a literal: the text itself (a string)


def _coerce(key, value, default, text=None):
    """value -> the type of default, or ConfigError. text: the command-line spelling, if any."""
    want = type(default)
    if default is None:
        return value
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # --max_iters=1e4
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
        if text is not None:
            return text  # unquoted text that happens to parse as a literal: --out_dir=1e4
    elif want in (list, tuple):
        if isinstance(value, (list, tuple)):
            return want(value)
    elif isinstance(value, want):
        return value
    given = text if text is not None else repr(value)
    raise ConfigError(f"{key}: expected {want.__name__} (default {default!r}), "
                      f"got {type(value).__name__} {given}")


def _apply_file(g, path, defaults, log):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        src = f.read()
    ns = dict(g)  # the file can read the config so far; we copy back only the config keys it set
    exec(builtins.compile(src, path, "exec"), ns)  # builtins: train.py has a `compile` key
    for k, v in ns.items():
        if k.startswith("_") or (k in g and v is g[k]):
            continue
        if k not in defaults:
            if isinstance(v, _CONFIG_TYPES):
                raise ConfigError(f"{path}: {_unknown(k, defaults)}")
            continue  # an import, function or class the config file made for itself
        try:
            g[k] = _coerce(k, v, defaults[k])
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        log(f"Overriding from {path}: {k} = {g[k]!r}")


def apply_overrides(g, argv, verbose=True):
    """Apply config files and --key=value arguments (argv, e.g. sys.argv[1:]) to the dict g in place."""
    defaults = _config_keys(g)  # snapshot: types are checked against these defaults
    log = print if verbose else (lambda *a: None)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("config keys (override with --key=value):")
            for k, v in defaults.items():
                print(f"  --{k}={g[k]!r}")
            sys.exit(0)
        if not arg.startswith("-"):
            _apply_file(g, arg, defaults, log)
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"bad argument {arg!r}: expected --key=value or a config file path")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise _unknown(key, defaults)
        g[key] = _coerce(key, _parse(text), defaults[key], text)
        log(f"Overriding: {key} = {g[key]!r}")
    return g


if __name__ != "configurator":  # exec'd by train.py (its globals are ours); `import configurator` skips this
    try:
        apply_overrides(globals(), sys.argv[1:], verbose=os.environ.get("RANK", "0") == "0")
    except ConfigError as _e:
        sys.exit(f"error: {_e}")
