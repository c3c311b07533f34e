"""The README's two set-up commands, and CI running the README's test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_install_and_test_commands_and_ci_runs_the_test_command():
    blocks = [b.strip() for b in _bash_blocks()]
    main_cmd, test_cmd = blocks[0], blocks[1]
    assert main_cmd.startswith("pip install torch==2.13.0") and "lorakit quickstart" in main_cmd
    assert "pytest" in test_cmd and "ruff check" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": f"readme_{i}"})
    assert "trainable" in capsys.readouterr().out
