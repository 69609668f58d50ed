"""The criterion registry is the single list: every entry works as it says, adding one is one function plus
one entry, and the criteria table in docs/pruning.md is the registry's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny, tiny_model

from healer.prune import depth
from healer.prune.blockwise import BlockStack
from healer.prune.config import PruneConfig
from healer.prune.criteria import CRITERIA, Criterion, criteria_table, criterion_names, describe_choices
from healer.prune.stage import prune

PRUNING_DOC = Path(__file__).resolve().parents[1] / "docs" / "pruning.md"
TOKENS = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(3))
ENTRIES = [(method, name) for method, table in CRITERIA.items() for name in table]


def test_the_pruning_doc_table_is_the_registry():
    assert criteria_table() in PRUNING_DOC.read_text(), "regenerate docs/pruning.md's table: print(criteria_table())"


@pytest.mark.parametrize("method,name", ENTRIES)
def test_every_entry_scores_what_its_method_expects(method, name, tmp_path):
    """Memory and disk give the same scores where the entry claims it can read shards."""
    spec = CRITERIA[method][name]
    moe = spec.target == "experts"
    model = tiny_model("qwen3_moe" if moe else "qwen2", layers=4, heads=4, kv_heads=2)
    tokens = TOKENS if spec.needs_data else None
    if method == "sparse":
        _check_sparse_entry(name, model, tokens, tmp_path)
        return

    def run(stack):
        if method == "depth":
            return spec.score(stack, tokens, [1, 2], 2, progress=False)
        return spec.score(stack, tokens, progress=False)

    scores = run(BlockStack.from_model(model))
    if method == "depth":
        assert set(scores) <= {1, 2} and scores and all(isinstance(v, float) for v in scores.values())
        assert spec.select(scores, 2) == [1, 2]
    else:
        units = {"mlp": model.config.intermediate_size, "attention": model.config.num_key_value_heads,
                 "experts": 8 if moe else None}[spec.target]
        assert [tuple(s.shape) for s in scores] == [(units,)] * 4
    if spec.reads_shards:
        model.save_pretrained(tmp_path / "m")
        from_disk = run(BlockStack.from_pretrained_dir(tmp_path / "m"))
        if method == "depth":
            assert from_disk == pytest.approx(scores, rel=1e-5)
        else:
            assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(from_disk, scores))


def _check_sparse_entry(name, model, tokens, tmp_path):
    """A sparse entry zeros exactly the 2:4 share of every projection, the same from memory and from disk."""
    from healer.prune.sparse import ShardWriter, sparsify

    model.save_pretrained(tmp_path / "m")
    in_memory = sparsify(model, tokens, criterion=name, pattern="2:4", progress=False)["sparsity"]
    writer = ShardWriter(tmp_path / "m", tmp_path / "out")
    from_disk = sparsify(BlockStack.from_pretrained_dir(tmp_path / "m"), tokens, criterion=name, pattern="2:4",
                         write=writer, progress=False)["sparsity"]
    assert in_memory["pattern_holds"] and in_memory["overall"] == 0.5
    assert from_disk["per_layer"] == in_memory["per_layer"]


def last_blocks(stack, tokens, candidates, count, progress=True):
    """A toy criterion: later blocks matter less."""
    return {i: -float(i) for i in candidates}


def test_adding_a_criterion_is_one_function_and_one_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(CRITERIA["depth"], "last_blocks",
                        Criterion(last_blocks, "remove the last blocks", needs_data=False, reads_shards=True))
    assert "last_blocks" in criterion_names() and "last_blocks" in describe_choices()
    assert "| depth | `last_blocks` | blocks | remove the last blocks | no | yes |" in criteria_table()
    src = save_tiny(tmp_path, "llama", layers=5)
    report = prune(str(src), PruneConfig(criterion="last_blocks", num_blocks=2), tmp_path / "out", progress=False)
    assert report["removed"] == [3, 4] and report["scored_from"] == "disk, one block at a time"
    assert report["criterion_description"] == "remove the last blocks"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_protected_ends_and_needed_data_come_from_the_entry():
    assert PruneConfig(criterion="ppl", ratio=0.2).protected == CRITERIA["depth"]["ppl"].keep_ends == (4, 2)
    assert PruneConfig(criterion="magnitude", ratio=0.2).protected == (0, 0)
    assert PruneConfig(criterion="ppl", ratio=0.2, keep_first=1).protected == (1, 2)
    assert not PruneConfig(criterion="magnitude", ratio=0.2).needs_calibration
    assert PruneConfig(criterion="block_influence", ratio=0.2).needs_calibration
    assert not PruneConfig(criterion="block_influence", blocks=[1]).needs_calibration  # explicit: nothing scored


def test_width_target_follows_the_criterion():
    assert PruneConfig(method="width", criterion="head_norm", ratio=0.5).spec.target == "attention"
    assert PruneConfig(method="width", criterion="maw", target="mlp", ratio=0.5).spec.target == "mlp"


def test_angular_chooses_a_contiguous_span():
    assert depth.lowest_span({2: 0.3, 3: 0.1, 4: 0.1}, 3) == [3, 4, 5]
