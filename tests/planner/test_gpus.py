"""GPU names resolve the way people type them (issue 20 item 7): `--gpu a100` suggested H100-80GB and
`--gpu H100` was not matched."""

import pytest

from lorakit.planner.arch import PlanError
from lorakit.planner.gpus import get_gpu


@pytest.mark.parametrize(
    "typed,entry",
    [("h100", "H100-80GB"), ("H100", "H100-80GB"), ("a6000", "A6000-48GB"), ("4090", "RTX4090-24GB"),
     ("a10", "A10-24GB"), ("l4", "L4-24GB"), ("a100-80gb", "A100-80GB")],
)
def test_an_unambiguous_part_of_the_name_resolves(typed, entry):
    assert get_gpu(typed).name == entry


def test_an_ambiguous_name_lists_the_candidates():
    with pytest.raises(PlanError, match="ambiguous: A100-40GB or A100-80GB"):
        get_gpu("a100")


def test_an_unknown_name_lists_the_table():
    with pytest.raises(PlanError, match="not in the GPU table.*known GPUs: T4-16GB"):
        get_gpu("v100")
