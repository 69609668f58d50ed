"""Loss-driven domain mixing (``data.dynamic``): the update rule, the streams following a new mixture, an exact
resume of weights and batches, a real heal run stopped and resumed, and the refusals a user meets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SAMPLE_TEXT, save_tiny

from healer.train.data.config import DataConfig
from healer.train.data.dynamic import DomainMixer, MixedBatches, update_weights

WORDS = SAMPLE_TEXT.split()


def write_corpus(path: Path, domains=("A", "B", "C"), per_domain: int = 60, seed: int = 0) -> Path:
    """JSON lines records of ``domains``, interleaved, SlimPajama-style (``meta.redpajama_set_name``)."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(per_domain):
            for d in domains:
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                fh.write(json.dumps({"text": f"{d} {i} {words}", "meta": {"redpajama_set_name": d}}) + "\n")
    return path


def data_cfg(train: Path, valid: Path | None = None, domains=None, **dynamic) -> DataConfig:
    domains = domains or {"A": 0.5, "B": 0.3, "C": 0.2}
    return DataConfig(sources=[{"path": str(train), "domains": domains}], seq_len=16, tokenizer_batch_size=8,
                      validation=[{"path": str(valid or train), "domains": {d: 1 for d in domains}}],
                      dynamic={"every": 2, "eta": 1.0, **dynamic})


def test_the_update_is_the_smoothed_exponentiated_excess():
    # hand computation, eta 2, c 0.1: A 0.5 * e^(2*0.4) = 1.112770, B 0.3 (excess -0.1 counts as 0),
    # C 0.2 * e^(2*0.1) = 0.244281; sum 1.657051 -> 0.671536, 0.181044, 0.147419; then 0.9 * p + 0.1 / 3
    new = update_weights([0.5, 0.3, 0.2], [0.4, -0.1, 0.1], eta=2.0, smoothing=0.1)
    assert new == pytest.approx([0.637716, 0.196273, 0.166010], abs=2e-6)
    assert sum(new) == pytest.approx(1.0, abs=1e-12)
    # no excess anywhere: the weights stay (up to the smoothing's pull toward uniform)
    assert update_weights([0.7, 0.3], [-1.0, 0.0], eta=5.0, smoothing=0.0) == pytest.approx([0.7, 0.3])
    # a huge excess does not overflow, and smoothing keeps the other domain alive
    starved = update_weights([0.5, 0.5], [1e6, 0.0], eta=1.0, smoothing=1e-4)
    assert starved[1] == pytest.approx(0.5e-4) and starved[0] == pytest.approx(1 - 0.5e-4)


def test_the_domain_lagging_its_reference_most_gains_weight(tmp_path, tokenizer):
    from healer.train.data.loader import plan_entries

    corpus = write_corpus(tmp_path / "c.jsonl")
    cfg = data_cfg(corpus)
    mixer = DomainMixer(cfg.dynamic, plan_entries(cfg.sources))
    mixer.measure_reference({"A": 2.0, "B": 2.0, "C": 2.0}.__getitem__)
    before = dict(zip(mixer.names, mixer.weights))
    scalars = mixer.update(2, {"A": 2.1, "B": 3.0, "C": 1.5})
    after = dict(zip(mixer.names, mixer.weights))
    assert after["B"] > before["B"] and after["A"] < before["A"] and after["C"] < before["C"]
    assert scalars["mix/excess/B"] == pytest.approx(1.0) and scalars["mix/excess/C"] == pytest.approx(-0.5)
    assert mixer.weight_scalars()["mix/weight/B"] == after["B"]
    # a diverged student (NaN loss) is logged, and the mixture stays where it was
    scalars = mixer.update(4, {"A": float("nan"), "B": 3.0, "C": 1.5})
    assert dict(zip(mixer.names, mixer.weights)) == after and scalars["mix/loss/A"] != scalars["mix/loss/A"]


def _mixed(cfg: DataConfig, tokenizer, num_workers: int = 0) -> MixedBatches:
    from healer.train.cpt import CorpusBatches
    from healer.train.data import build_loader

    cfg = cfg.model_copy(update={"num_workers": num_workers})
    loader = build_loader(cfg, tokenizer, micro_batch_size=2)
    mixer = DomainMixer(cfg.dynamic, loader.entries)
    mixer.measure_reference(lambda d: 3.0)
    return MixedBatches(CorpusBatches(loader), mixer)


def _student_loss(step: int):
    # B lags its reference more and more: the mixture must keep moving toward it
    return lambda d: {"A": 3.1, "B": 3.0 + 0.2 * step, "C": 2.9}[d]


def _run(mixed: MixedBatches, steps: range) -> tuple[list[list[int]], list[list[float]]]:
    batches, weights = [], []
    for step in steps:
        batches.append(mixed.next()["input_ids"].flatten().tolist())
        mixed.step(step, _student_loss(step))
        weights.append(list(mixed.mixer.weights))
    return batches, weights


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_and_resume_gives_the_same_weights_and_the_same_next_batches(tmp_path, tokenizer, num_workers):
    cfg = data_cfg(write_corpus(tmp_path / "c.jsonl"))
    straight = _mixed(cfg, tokenizer, num_workers)
    _run(straight, range(1, 6))
    state = json.loads(json.dumps(straight.state_dict()))  # checkpoints hold it as JSON
    expected = _run(straight, range(6, 12))

    resumed = _mixed(cfg, tokenizer, num_workers)
    resumed.load_state_dict(state)
    assert resumed.mixer.weights == state["mixture"]["weights"] and len(resumed.mixer.history) == 2
    got = _run(resumed, range(6, 12))
    assert got[1] == expected[1]  # bit-identical weights
    assert got[0] == expected[0]  # the same token ids in the same order
    assert expected[1][-1][1] > 0.5  # B (0.3 at first) took over: the mixture really moved


def test_a_new_mixture_sets_the_pace_from_then_on(tmp_path, tokenizer):
    """After an update the streams follow the new shares from there, not catching up on the whole history."""
    from healer.train.data import build_loader

    cfg = data_cfg(write_corpus(tmp_path / "c.jsonl", domains=("A", "B"), per_domain=400),
                   domains={"A": 0.5, "B": 0.5})
    loader = build_loader(cfg, tokenizer, micro_batch_size=4)
    it = iter(loader)
    for _ in range(40):
        next(it)
    before = loader.stats()["tokens"]
    unchanged = build_loader(cfg, tokenizer, micro_batch_size=4)
    unchanged.load_state_dict(loader.state_dict())
    loader.set_weights([0.8, 0.2])
    it = iter(loader)
    # the documents already read keep the mixture they were read with (a resume re-reads them identically)
    assert next(it)["input_ids"].tolist() == next(iter(unchanged))["input_ids"].tolist()
    for _ in range(39):
        next(it)
    after = loader.stats()["tokens"]
    new = {k: after[k] - before[k] for k in after}
    share = new["A"] / sum(new.values())
    # one tokenizer batch (8 documents) is still read under 0.5/0.5, and the deficit rule keeps each
    # domain within about a document of its share; catching up on history would give A all of it
    assert 0.65 < share < 0.86, new


def test_refusals_name_the_key_and_what_to_do(tmp_path):
    from pydantic import ValidationError

    corpus = write_corpus(tmp_path / "c.jsonl")
    with pytest.raises(ValidationError, match=r"data\.sources\[0\].*not split by domain"):
        DataConfig(sources=[{"path": str(corpus)}], validation=[{"path": str(corpus)}], dynamic={})
    with pytest.raises(ValidationError, match=r"data\.dynamic needs at least 2 training domains"):
        DataConfig(sources=[{"path": str(corpus), "domains": {"A": 1, "B": 0}}], dynamic={})
    with pytest.raises(ValidationError, match=r"data\.validation, which is empty"):
        DataConfig(sources=[{"path": str(corpus), "domains": {"A": 1, "B": 1}}], dynamic={})
    with pytest.raises(ValidationError, match=r"data\.validation\[0\].*not split by domain"):
        DataConfig(sources=[{"path": str(corpus), "domains": {"A": 1, "B": 1}}], validation=[{"path": str(corpus)}],
                   dynamic={})
    with pytest.raises(ValidationError, match=r"training domain\(s\) \['B'\] have no held-out data"):
        DataConfig(sources=[{"path": str(corpus), "domains": {"A": 1, "B": 1}}],
                   validation=[{"path": str(corpus), "domains": {"A": 1}}], dynamic={})
    with pytest.raises(ValidationError, match=r"data\.dynamic\.reference gives no loss for domain\(s\) \['C'\]"):
        data_cfg(corpus, reference={"A": 2.0, "B": 2.0})
    # nan is refused as any non-finite recipe number is, naming the domain
    with pytest.raises(ValidationError, match=r"dynamic\.reference\.dict\[str,float\]\.B\n  Input should be a finite"):
        data_cfg(corpus, reference={"A": 2.0, "B": float("nan"), "C": 1.0})
    with pytest.raises(ValidationError, match="eta"):
        data_cfg(corpus, eta=0)


def test_a_recipe_with_a_bad_dynamic_section_says_which_key(tmp_path):
    from healer.recipe import RecipeError, load_recipe

    corpus = write_corpus(tmp_path / "c.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: m}}\ndata:\n  sources: [{{path: {corpus}}}]\n  dynamic: {{every: 10}}\n")
    with pytest.raises(RecipeError, match=r"data\.sources\[0\].*not split by domain"):
        load_recipe(recipe)


def _heal(tmp_path: Path, model: Path, teacher: Path, cfg: DataConfig, max_steps: int):
    from healer.model.modeling import resolve_source
    from healer.train.config import CPTConfig
    from healer.train.cpt import Options, heal

    cpt = CPTConfig(zero_stage=0, micro_batch_size=2, global_batch_size=2, save_every=2, warmup_steps=0,
                    schedule="constant", lr=1e-2, seed=0, max_steps=max_steps, eval_batches=2, report_to=[])
    return heal(cpt, cfg, location=resolve_source(str(model)), teacher_location=resolve_source(str(teacher)),
                stage_dir=tmp_path / "cpt", hf_dir=tmp_path / "cpt" / "hf", opts=Options())


def _rows(stage: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_a_heal_run_stopped_and_resumed_moves_the_mixture_like_one_that_was_not(tmp_path):
    """The teacher's per-domain loss is the reference; weights, excess and tokens per domain are logged; a
    run stopped at step 2 and resumed to 6 ends with the same weights, losses and token counts as one run."""
    model = save_tiny(tmp_path, "llama", layers=2, hidden=32, intermediate=64)
    teacher = save_tiny(tmp_path, "llama", name="teacher", seed=1, layers=2, hidden=32, intermediate=64)
    cfg = data_cfg(write_corpus(tmp_path / "train.jsonl"), write_corpus(tmp_path / "valid.jsonl", per_domain=8,
                                                                        seed=1))
    one = tmp_path / "one"
    whole = _heal(one, model, teacher, cfg, 6)
    two = tmp_path / "two"
    _heal(two, model, teacher, cfg, 2)
    resumed = _heal(two, model, teacher, cfg, 6)

    assert whole["mixture"]["updates"] == 3 and resumed["mixture"] == whole["mixture"]
    assert whole["mixture"]["weights"] != whole["mixture"]["initial"]
    a, b = _rows(one / "cpt"), _rows(two / "cpt")
    for step in (4, 6):
        assert {k: v for k, v in b[step].items() if k.startswith(("mix/", "data/tokens/"))} == \
               {k: v for k, v in a[step].items() if k.startswith(("mix/", "data/tokens/"))}
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-5)
    assert {"mix/excess/B", "mix/reference/B", "mix/loss/B", "mix/weight/B", "data/tokens/B"} <= set(a[6])
    assert (one / "cpt" / "domain_weights.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_agree_on_the_weights_and_a_killed_run_resumes_them(tmp_path):
    """Under torchrun with 2 ranks every rank saves the same mixture, and a run SIGKILLed at step 5 and resumed
    logs the same weights, excess and tokens per domain as one never interrupted."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    teacher = save_tiny(tmp_path, "llama", name="teacher", layers=3, hidden=32, intermediate=64)
    student = save_tiny(tmp_path, "llama", name="student", seed=1, layers=2, hidden=32, intermediate=64)
    data = data_cfg(write_corpus(tmp_path / "train.jsonl"), write_corpus(tmp_path / "valid.jsonl", per_domain=12,
                                                                         seed=1)).model_dump(mode="json")

    def run(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        recipe = out.with_suffix(".yaml")
        recipe.write_text(yaml.safe_dump({
            "model": {"source": str(teacher)}, "data": data,
            "cpt": {"input": str(student), "output": str(out), "zero_stage": 2, "micro_batch_size": 2,
                    "global_batch_size": 4, "max_steps": 8, "lr": 1e-2, "warmup_steps": 0, "save_every": 1,
                    "eval_batches": 2, "report_to": []}}))
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        env.pop("HEALER_FAULT", None)
        if fault:
            env["HEALER_FAULT"] = fault
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["timeout", "300", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "healer", "cpt", "--config",
               str(recipe)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)

    straight = tmp_path / "straight"
    assert run(straight).returncode == 0
    killed = tmp_path / "killed"
    assert run(killed, "kill_at_step:5").returncode != 0
    done = run(killed)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr

    final = sorted((straight / "checkpoints").glob("step*"))[-1]
    ranks = [json.loads((final / f"trainer_state_rank{r}.json").read_text())["data"]["mixture"] for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]["history"]) == 4
    a, b = _rows(straight), _rows(killed)
    for step in range(1, 9):
        assert {k: v for k, v in b[step].items() if k.startswith(("mix/", "data/tokens/"))} == \
               {k: v for k, v in a[step].items() if k.startswith(("mix/", "data/tokens/"))}
    assert json.loads((killed / "manifest.json").read_text())["outputs"]["mixture"]["updates"] == 4


def test_a_negligible_change_of_weights_leaves_the_stream_as_it_was(tmp_path, tokenizer):
    """Each domain keeps its lead or lag across an update: a stream that forgot it would pick afresh (and
    favour domains of long documents) at every update, however little the weights moved."""
    from healer.train.data import build_loader

    cfg = data_cfg(write_corpus(tmp_path / "c.jsonl"))
    moved, kept = (build_loader(cfg, tokenizer, micro_batch_size=4) for _ in range(2))
    its = [iter(moved), iter(kept)]
    for _ in range(10):
        next(its[0]), next(its[1])
    moved.set_weights([0.5 + 1e-9, 0.3, 0.2 - 1e-9])
    its[0] = iter(moved)
    for _ in range(30):  # several document batches under the new weights
        assert next(its[0])["input_ids"].tolist() == next(its[1])["input_ids"].tolist()
