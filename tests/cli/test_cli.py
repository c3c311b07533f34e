import subprocess
import sys

import pytest

from lorakit.cli.main import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: lorakit" in capsys.readouterr().out


def test_parser_lists_every_command():
    help_text = build_parser().format_help()
    assert all(name in help_text for name in COMMANDS)


def test_inspect_prints_dry_run_and_table(capsys):
    assert main(["inspect", "--model", "tiny-llama", "--targets", "q_proj,v_proj", "--r", "8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "trainable parameters" in out


def test_bad_input_is_one_line_error_exit_2(capsys):
    assert main(["inspect", "--model", "tiny-llama", "--targets", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matched no module" in err[0]


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "inspect" in out.stdout


def test_version_flag(capsys):
    import lorakit as lk

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"lorakit {lk.__version__}"
