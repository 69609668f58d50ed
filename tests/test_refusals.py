"""Bad input on the command line is refused with exit 2 and a message naming the offending key or file.

Each case runs ``healer`` in-process on a recipe or file it writes into ``tmp_path``: the refusal comes before
anything runs, and no traceback reaches the user. Cases pinned elsewhere (YAML syntax, NUL bytes, unknown
nested keys, hostile SLURM names, hostfile syntax and encoding, impossible prune settings, non-finite numbers,
domain weights) are left to those tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import save_tiny

from healer.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model"), "llama", layers=4, hidden=32, intermediate=64)


def _put(d: Path, name: str, content: str | bytes) -> str:
    path = d / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _recipe(d: Path, extra: str = "", model: Path | str = "unused") -> str:
    return _put(d, "recipe.yaml", f"name: probe\nrun_dir: {d / 'run'}\nmodel: {{source: {model}}}\n" + extra)


def _slurm(d: Path, *flags: str) -> list[str]:
    return ["launch", "cpt", _recipe(d), "--slurm", "--dry-run", *flags]


def _hosts(d: Path, content: str) -> list[str]:
    return ["launch", "cpt", _recipe(d), "--hostfile", _put(d, "hosts", content), "--dry-run"]


def _sources(d: Path, source: str) -> list[str]:
    return ["data", "stats", "--config", _recipe(d, f"data: {{sources: [{source}], seq_len: 32}}\n")]


# (id, argv built from (tmp_path, model directory), text the error line must hold)
CASES = [
    ("unknown_top_key", lambda d, m: ["prune", _recipe(d, "promne: {ratio: 0.5}\n")], "promne: unknown key"),
    ("wrong_type_in_file", lambda d, m: ["prune", _recipe(d, "prune: {ratio: lots}\n")],
     "prune.ratio: Input should be a valid number"),
    ("recipe_missing", lambda d, m: ["prune", str(d / "nope.yaml")], "nope.yaml: no such file"),
    ("recipe_empty", lambda d, m: ["prune", _put(d, "r.yaml", "")], "model: required key is missing"),
    ("recipe_top_level_list", lambda d, m: ["prune", _put(d, "r.yaml", "- a\n- b\n")],
     "r.yaml: a recipe is a mapping of sections, got list"),
    ("bad_dtype", lambda d, m: ["prune", _recipe(d), "--num-blocks", "1", "--dtype", "float8"],
     "model.dtype: unknown dtype 'float8'"),
    ("unknown_verb", lambda d, m: ["prun", _recipe(d)], "unknown verb 'prun'"),
    ("slurm_qos_space", lambda d, m: _slurm(d, "--launch.slurm.qos", "high prio"),
     "launch.slurm.qos: 'high prio' is not a SLURM name"),
    ("slurm_time_garbage", lambda d, m: _slurm(d, "--launch.slurm.time", "tomorrow"),
     "launch.slurm.time: 'tomorrow' is not a SLURM time"),
    ("slurm_mem_garbage", lambda d, m: _slurm(d, "--launch.slurm.mem", "lots"),
     "launch.slurm.mem: 'lots' is not a SLURM memory size"),
    ("master_port_range", lambda d, m: _slurm(d, "--master-port", "99999"), "--master-port: "),
    ("gpus_negative", lambda d, m: _slurm(d, "--gpus-per-node", "-2"), "launch.slurm.gpus_per_node: "),
    ("nproc_zero", lambda d, m: ["launch", "cpt", _recipe(d), "--nproc", "0", "--dry-run"], "--nproc: "),
    ("host_dash", lambda d, m: _hosts(d, "-oProxyCommand=touch_pwned slots=1\n"), "hosts, line 1: "),
    ("host_semicolon", lambda d, m: _hosts(d, "node1;touch_x slots=1\n"), "hosts, line 1: "),
    ("host_slots_not_a_number", lambda d, m: _hosts(d, "node1 slots=two\n"),
     "hosts, line 1: slots=two is not a positive integer"),
    ("host_duplicate", lambda d, m: _hosts(d, "node1 slots=1\nnode1 slots=1\n"),
     "hosts, line 2: host node1 is already on line 1"),
    ("hostfile_empty", lambda d, m: _hosts(d, "# nothing\n"), "hosts: no hosts in it"),
    ("hostfile_missing", lambda d, m: ["launch", "cpt", _recipe(d), "--hostfile", str(d / "nope"), "--dry-run"],
     "hostfile {d}/nope: cannot read it"),
    ("block_negative", lambda d, m: ["prune", _recipe(d, model=m), "--criterion", "magnitude", "--blocks", "[-1]",
                                     "--output", str(d / "out")], "prune.blocks: [-1] out of range"),
    ("source_weight_negative", lambda d, m: _sources(d, f"{{path: {d}, weight: -1}}"),
     "data.sources.0.weight: Input should be greater than 0"),
    ("source_weight_zero", lambda d, m: _sources(d, f"{{path: {d}, weight: 0}}"),
     "data.sources.0.weight: Input should be greater than 0"),
]


@pytest.mark.parametrize("argv,named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_it(argv, named, tmp_path, model, capsys):
    assert main(argv(tmp_path, model)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    # An invalid recipe is a header line plus one line per bad key; anything else is a single line.
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and named.format(d=tmp_path) in lines[-1]
    # nothing ran: the only file a refusal may leave is launch's copy of the recipe for the ranks
    written = [p for p in tmp_path.glob("run/**/*") if p.is_file() and p.name != "recipe.yaml"]
    assert written == [] and not (tmp_path / "out").exists()
