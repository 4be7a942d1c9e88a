"""configurator.py: --key=value and config files, hardened where nanoGPT's configurator is weak."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from configurator import ConfigError, apply_overrides


def defaults():
    import math  # a module among the globals, like train.py's imports: never a config key
    return dict(math=math, max_iters=5000, learning_rate=6e-4, compile=True, out_dir="out", init_from="scratch",
                dataset=None, betas=(0.9, 0.95), _private=1)


def run(argv, g=None):
    g = g or defaults()
    apply_overrides(g, argv, verbose=False)
    return g


def test_types():
    g = run(["--max_iters=1e4", "--learning_rate=1", "--compile=false", "--out_dir=1e4",
             "--init_from='resume'", "--betas=[0.8, 0.9]"])
    assert g["max_iters"] == 10000 and type(g["max_iters"]) is int
    assert g["learning_rate"] == 1.0 and type(g["learning_rate"]) is float
    assert g["compile"] is False
    assert g["out_dir"] == "1e4"        # str keys take the text as written
    assert g["init_from"] == "resume"   # quotes optional
    assert g["betas"] == (0.8, 0.9) and type(g["betas"]) is tuple
    for text, want in [("True", True), ("False", False), ("true", True), ("false", False), ("1", True), ("0", False)]:
        assert run([f"--compile={text}"])["compile"] is want


def test_none_default_accepts_any_literal_or_string():
    assert run(["--dataset=data/my_sft"])["dataset"] == "data/my_sft"
    assert run(["--dataset=3"])["dataset"] == 3
    assert run(["--dataset=[1, 2]"])["dataset"] == [1, 2]
    assert run(["--dataset=None"])["dataset"] is None


def test_equals_inside_value():
    assert run(["--out_dir=runs/lr=3e-4,bs=8"])["out_dir"] == "runs/lr=3e-4,bs=8"
    assert run(["--dataset=a=b=c"])["dataset"] == "a=b=c"


@pytest.mark.parametrize("arg,words", [
    ("--max_iter=10", ["unknown config key 'max_iter'", "max_iters"]),   # close match suggested
    ("--math=1", ["unknown config key 'math'"]),                         # modules are not keys
    ("--_private=2", ["unknown config key '_private'"]),
    ("--max_iters=1.5", ["max_iters", "expected int", "got float 1.5"]),
    ("--max_iters=abc", ["max_iters", "expected int", "got str abc"]),
    ("--learning_rate=True", ["learning_rate", "expected float", "got bool"]),
    ("--compile=2", ["compile", "expected bool", "got int 2"]),
    ("--compile=yes", ["compile", "expected bool", "got str yes"]),
    ("--max_iters", ["expected --key=value"]),
    ("-max_iters=3", ["expected --key=value"]),
    ("no_such_config.py", ["config file not found: no_such_config.py"]),
])
def test_errors_name_key_and_types(arg, words):
    with pytest.raises(ConfigError) as e:
        run([arg])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_config_file(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import os\n_tmp = 3\nmax_iters = 2 * _tmp\nout_dir = os.path.join('out', init_from)\n"
                   "learning_rate = 1\n")
    g = run([str(cfg), "--max_iters=7"])  # the command line comes after the file and wins
    assert g["max_iters"] == 7 and g["out_dir"] == os.path.join("out", "scratch") and g["learning_rate"] == 1.0
    assert "_tmp" not in g and "os" not in g
    bad = tmp_path / "bad.py"
    bad.write_text("max_itres = 10\n")  # a typo must not silently create a new global
    with pytest.raises(ConfigError, match=r"bad\.py: unknown config key 'max_itres'; did you mean max_iters"):
        run([str(bad)])
    bad.write_text("compile = 'fast'\n")
    with pytest.raises(ConfigError, match=r"bad\.py: compile: expected bool .* got str"):
        run([str(bad)])
    # types are checked against train.py's defaults, not against what a config file set
    cfg.write_text("dataset = 'data/x'\n")
    assert run([str(cfg), "--dataset=5"])["dataset"] == 5


def test_exec_from_a_training_script(tmp_path):
    """The way train.py uses it: exec(open('configurator.py').read()) on the script's globals."""
    script = tmp_path / "train.py"
    script.write_text(
        "import json\n"
        "batch_size = 4\nlearning_rate = 1e-3\nout_dir = 'out'\n"
        f"exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())\n"
        "print(json.dumps(dict(batch_size=batch_size, learning_rate=learning_rate, out_dir=out_dir)))\n")
    r = subprocess.run([sys.executable, str(script), "--batch_size=8", "--out_dir=a=b"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == dict(batch_size=8, learning_rate=1e-3, out_dir="a=b")
    assert "Overriding: batch_size = 8" in r.stdout
    r = subprocess.run([sys.executable, str(script), "--batch_sise=8"], capture_output=True, text=True)
    assert r.returncode == 1 and "error: unknown config key 'batch_sise'; did you mean batch_size?" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--batch_size=4" in r.stdout and "--json" not in r.stdout
