"""`plan --calibrate` prints its table, not profiler lines or deprecation warnings (issue 20 item 8)."""

import warnings

import torch

from lorakit.planner.calibrate import _profiled_peak_mb


def test_the_memory_profile_is_quiet(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peak = _profiled_peak_mb(lambda: (torch.ones(256, 256, requires_grad=True) * 2).sum().backward())
    captured = capfd.readouterr()
    assert "profiler_st" not in captured.err + captured.out and "FutureWarning" not in captured.err
    assert peak > 0.25  # the 256x256 fp32 input and its gradient (0.26 MB each) were seen
