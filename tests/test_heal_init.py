"""Initialising across a cut (LaCo's merge): the kept block before a removed run takes the run's differences."""

from __future__ import annotations

import torch

from healer.prune.depth import merge_across_cuts


def _blocks(values: list[float]) -> torch.nn.ModuleList:
    """Blocks with one 1x1 weight each, block i holding values[i]."""
    blocks = torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in values)
    with torch.no_grad():
        for block, v in zip(blocks, values):
            block.weight.fill_(v)
    return blocks


def test_merge_folds_each_run_into_the_block_before_it_by_hand():
    # Blocks 1, 2, 4, 8, 16, 32. Cut {2, 3} and {5}: block 1 (theta 2) takes (4 - 2) + (8 - 2) -> 10;
    # block 4 (theta 16) takes (32 - 16) -> 32. A run at the start has no block before it and is dropped.
    blocks = _blocks([1, 2, 4, 8, 16, 32])
    merged = merge_across_cuts(blocks, [2, 3, 5])
    assert sorted(merged) == [1, 4]
    assert merged[1]["weight"].item() == 10.0 and merged[4]["weight"].item() == 32.0
    assert blocks[1].weight.item() == 2.0  # the dense model is left alone
    assert merge_across_cuts(blocks, [0, 1]) == {}
