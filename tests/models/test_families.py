"""The per-family table (lorakit.models.families) against real models: decoder_blocks finds the blocks of
every builtin in each task class, and the table's block paths and heads name real modules."""

from __future__ import annotations

import pytest
from torch import nn

from lorakit.models import build_model
from lorakit.models.builtin import BUILTIN_SPECS
from lorakit.models.families import FAMILIES, decoder_blocks, family_of

BLOCK_CLASS = {"llama": "LlamaDecoderLayer", "gpt2": "GPT2Block", "bert": "BertLayer"}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("task", ["causal-lm", "classification", "base"])
def test_decoder_blocks_of_the_builtins(name, task):
    model = build_model(name, task=task)
    kind = BUILTIN_SPECS[name]["family"]
    blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert [type(b).__name__ for b in blocks] == [BLOCK_CLASS[kind]] * len(blocks)
    # the very modules of the model, in order: block i holds the parameters named "<container>.i."
    fam = family_of(model.config.model_type)
    prefix, root = fam.prefixes(task)
    named = dict(model.named_modules())
    assert blocks == [named[prefix.format(i=i).rstrip(".")] for i in range(len(blocks))]
    for i, block in enumerate(blocks):
        inner = {
            n for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
        }
        assert inner == set(fam.linears), (i, inner)  # the table names every linear of a block
    heads = [n for n in fam.head_names if n in named]
    assert heads == {"causal-lm": [fam.lm_head], "classification": [fam.classifier], "base": []}[task]


def test_decoder_blocks_refuses_a_model_of_no_known_family():
    with pytest.raises(ValueError, match="not a known family"):
        decoder_blocks(nn.Linear(2, 2))


def test_every_model_type_maps_to_a_complete_family():
    for model_type, fam in FAMILIES.items():
        assert fam.q and fam.k and fam.v and fam.o and fam.mlp_in and fam.mlp_out, model_type
        assert len({fam.short_name(p) for p in fam.attention}) == len(fam.attention), model_type
        assert [fam.group_of("x.0." + p) for p in fam.linears] == [
            g for g, paths in enumerate(fam.groups) for _ in paths
        ], model_type
