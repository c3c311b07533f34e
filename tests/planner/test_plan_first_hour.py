"""The planner's rough edges a new user hit (issue 20 item 7): data-size flags named as flags, counts
written as 1e7 / 10M, no -100% ROI when no benefit was given, the chosen GPU printed."""

import argparse

import pytest

from lorakit.cli.main import main
from lorakit.cli.plan import count


def test_counts_accept_the_ways_people_write_them():
    assert count("10000000") == count("1e7") == count("10M") == count("10_000_000") == 10_000_000
    assert count("2.5B") == 2_500_000_000 and count("50k") == 50_000
    for bad in ("1.5", "-3", "0", "ten"):
        with pytest.raises(argparse.ArgumentTypeError):
            count(bad)


def test_a_missing_data_size_names_the_flags(capsys):
    assert main(["plan", "--model", "7B"]) == 2
    err = capsys.readouterr().err
    assert "--tokens N" in err and "--dataset-rows R" in err


def test_no_benefit_is_said_not_priced_as_minus_100_percent(capsys):
    assert main(["plan", "--model", "7B", "--tokens", "1e7", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "-100.0%" not in out and "no benefit given" in out and "GPU H100-80GB" in out
    assert main(["plan", "--model", "7B", "--tokens", "1e7", "--benefit-per-month", "3000"]) == 0
    assert "no benefit given" not in capsys.readouterr().out
