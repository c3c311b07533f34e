"""``lorakit.train(...)`` is the training function however the package was imported: importing any
``lorakit.train.*`` module binds the name ``train`` in ``lorakit`` to the subpackage, which used to make the
README's ``lorakit.train("cfg.yaml")`` fail with "'module' object is not callable"."""

import subprocess
import sys


def test_lorakit_train_is_callable_after_a_submodule_import(tmp_path):
    code = (
        "import lorakit as lk, lorakit.train.config, lorakit.train.trainer as t\n"
        "assert callable(lk.train), type(lk.train)\n"
        "assert lk.train.train is t.train and lk.train.RunConfig is lorakit.train.config.RunConfig\n"
        "try:\n"
        "    lk.train('no-such-config.yaml')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "not callable" not in out.stdout and "no-such-config.yaml" in out.stdout
