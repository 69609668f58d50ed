"""What reaches a shell: the SLURM script, ssh and the ranks' recipe copy, fed hostile and secret values.

Keyed SLURM options are refused at recipe load with the key named; free-form values (paths, launch.env
values) are proven inert by running the generated script with stand-ins for srun and scontrol, not by
searching its text.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from healer.cli import main as healer_main
from healer.launch import hostfile, slurm
from healer.launch.config import LaunchConfig, SlurmConfig
from healer.launch.run import write_rank_recipe
from healer.launch.supervise import PREEMPTED_EXIT_CODE
from healer.recipe import RecipeError, load_recipe
from healer.train.rendezvous import master_port_for_job

HOSTILE = ["gpu\nrm -rf ~", "$(touch PWNED)", "`touch PWNED`", "gpu;touch PWNED", "gpu\n", "gpu && touch PWNED"]
TOKEN = "hf_" + "Zq7Lk2Vw9Xp4Rt6Ym1Nb3Cd5Fg8Hj0Ks2"


def _load(key: str, value) -> None:
    load_recipe(None, {"model.source": "unused", key: value})


@pytest.mark.parametrize("key", ["partition", "account", "qos", "time", "constraint", "mem"])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_sbatch_option_is_refused_at_load_naming_the_key(key, value):
    with pytest.raises(RecipeError) as err:
        _load(f"launch.slurm.{key}", value)
    message = str(err.value)
    assert f"launch.slurm.{key}: " in message
    if "\n" in value:
        assert f"launch.slurm.{key}: contains a newline" in message


@pytest.mark.parametrize("key, value", [("partition", "gpu,gpu-long"), ("time", "2-00:00:00"), ("time", "90"),
                                        ("time", "1-12"), ("mem", "480G"), ("mem", "0"), ("qos", "high"),
                                        ("constraint", "a100&[rack1|rack2]"), ("account", "proj_1.x")])
def test_ordinary_sbatch_options_are_accepted(key, value):
    _load(f"launch.slurm.{key}", value)


@pytest.mark.parametrize("key, value, problem", [
    ("launch.slurm.extra_sbatch", ["--exclusive", "--comment=x\n#SBATCH --uid=0"], "item 1 contains a newline"),
    ("launch.slurm.extra_sbatch", ["--comment=$(id) x"], "is not one `--option`"),
    ("launch.slurm.extra_sbatch", ["exclusive"], "is not one `--option`"),
    ("launch.slurm.setup", ["module load cuda\nrm -rf ~"], "item 0 contains a newline"),
    ("launch.env", {"A;touch PWNED": "1"}, "is not an environment variable name"),
    ("launch.env", {"1A": "1"}, "is not an environment variable name"),
    ("launch.env", {"HF_TOKEN": TOKEN + "\n"}, "HF_TOKEN: the value contains a newline"),
    ("launch.master_addr", "-oProxyCommand=touch PWNED", "may not start with '-'"),
    ("launch.master_addr", "$(touch PWNED)", "is not a host name"),
    ("launch.hostfile", "hosts\nx", "contains a newline"),
])
def test_other_hostile_launch_values_are_refused_naming_the_key(key, value, problem):
    with pytest.raises(RecipeError) as err:
        _load(key, value)
    assert f"{key}: " in str(err.value) and problem in str(err.value)
    assert TOKEN not in str(err.value)  # an error never repeats a secret


# ---- the script, run ---------------------------------------------------------------------------------

STUBS = {
    # srun: record its argv (NUL-separated) and what launch.env put in its environment, exit as told.
    "srun": '#!/bin/bash\nprintf "%s\\0" "$@" > "$SANDBOX/srun.args"\nprintf "%s" "${HF_TOKEN-unset}" > '
            '"$SANDBOX/srun.token"\nexit "${SRUN_RC:-0}"\n',
    "scontrol": '#!/bin/bash\necho "$@" >> "$SANDBOX/scontrol.calls"\nexit "${SCONTROL_RC:-0}"\n',
}
# No spaces or quotes (an #SBATCH line cannot carry them); everything else a shell might act on.
HOSTILE_DIR = "run$(touch${IFS}PWNED)`touch${IFS}PWNED`;touch${IFS}PWNED&%j|x"
HOSTILE_ENV = "$(touch PWNED) `touch PWNED`; touch PWNED '\" \\"


@pytest.fixture
def sandbox(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def _run_script(sandbox: Path, script: str, env: dict[str, str], **extra) -> subprocess.CompletedProcess:
    path = sandbox / "job.sbatch"
    path.write_text(script)
    base = {"PATH": f"{sandbox / 'bin'}:/usr/bin:/bin", "SANDBOX": str(sandbox), "SLURM_JOB_ID": "42",
            "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"}
    return subprocess.run(["bash", str(path)], cwd=sandbox, env={**base, **env, **extra}, capture_output=True,
                          text=True, timeout=60)


def _no_pwned(root: Path) -> None:
    assert not [p for p in root.rglob("PWNED*")], "a value in the script was executed"


def _render(sandbox: Path, **slurm_keys):
    launch_dir = sandbox / HOSTILE_DIR / "launch" / "cpt"
    launch_dir.mkdir(parents=True)
    cfg = LaunchConfig(backend="slurm", env={"HF_TOKEN": TOKEN, "NCCL_DEBUG": HOSTILE_ENV},
                       slurm=SlurmConfig(max_restarts=1, **slurm_keys))
    entry = ["-m", "healer", "cpt", "--config", str(launch_dir / "recipe.yaml")]
    return slurm.render_sbatch("cpt", entry, cfg, launch_dir, sandbox), launch_dir, entry


def test_script_holds_paths_and_env_values_inert(sandbox):
    script, launch_dir, entry = _render(sandbox)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert TOKEN not in script and "touch PWNED'" not in script  # launch.env values are not in the file
    output = next(line for line in script.splitlines() if line.startswith("#SBATCH --output="))
    assert output == f"#SBATCH --output={str(launch_dir).replace('%', '%%')}/slurm-%j.out"  # %% = a literal %

    env = {"HF_TOKEN": TOKEN, "NCCL_DEBUG": HOSTILE_ENV}
    done = _run_script(sandbox, script, env)
    assert done.returncode == 0, done.stderr
    _no_pwned(sandbox)
    args = (sandbox / "srun.args").read_text().split("\0")[:-1]
    node_cmd = args[args.index(sys.executable):]
    assert node_cmd == [sys.executable, "-m", "healer.launch.node", "--nproc-per-node=1", "--stage=cpt",
                        f"--log-dir={launch_dir}/logs", "--", *entry]  # every path reached srun as written
    assert (sandbox / "srun.token").read_text() == TOKEN  # launch.env reaches the job through the environment
    assert "healer: cpt finished" in done.stdout

    # a failure: the failure count lands in the real (hostile) directory, the message names it literally
    done = _run_script(sandbox, script, env, SRUN_RC="3")
    assert done.returncode == 0 and "requeueing (retry 1 of 1)" in done.stdout
    assert (launch_dir / "failures.42").read_text().strip() == "1"
    done = _run_script(sandbox, script, env, SRUN_RC="3")
    assert done.returncode == 3 and f"Per-rank logs: {launch_dir}/logs" in done.stdout
    # a preemption whose requeue fails says which script to resubmit, again literally
    done = _run_script(sandbox, script, env, SRUN_RC=str(PREEMPTED_EXIT_CODE), SCONTROL_RC="1")
    assert done.returncode == PREEMPTED_EXIT_CODE and f"resubmit {launch_dir}/cpt.sbatch" in done.stdout
    _no_pwned(sandbox)


def test_script_stops_when_launch_env_did_not_reach_the_job(sandbox):
    script, _, _ = _render(sandbox)
    done = _run_script(sandbox, script, {"NCCL_DEBUG": "INFO"})  # submitted by hand without HF_TOKEN
    assert done.returncode == 1
    assert "HF_TOKEN (launch.env) is not in the job environment" in done.stderr
    assert not (sandbox / "srun.args").exists()


def test_directory_an_sbatch_line_cannot_carry_is_refused(tmp_path):
    cfg = LaunchConfig(backend="slurm")
    for bad in ("my runs", "run'x", "run\nx"):
        with pytest.raises(slurm.SlurmError, match="launch directory"):
            slurm.render_sbatch("cpt", ["-m", "healer"], cfg, tmp_path / bad, tmp_path)


def test_one_master_port_per_job_below_the_ephemeral_range():
    from healer.launch.node import node_spec_from_slurm

    ports = {master_port_for_job(job) for job in range(100_000, 112_000)}
    assert len(ports) == 12_000 and min(ports) >= 20_000 and max(ports) < 32_768
    env = {"SLURM_JOB_ID": "123456", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n1"}
    node = node_spec_from_slurm(env, 8, "10.0.0.1", None, None, "cpt")
    assert node.master_port == master_port_for_job("123456")


# ---- secrets: what healer launch writes and prints --------------------------------------------------

@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": {"source": "unused"},
                                    "launch": {"env": {"HF_TOKEN": TOKEN, "NCCL_IB_HCA": "mlx5_0"}}}))
    return path


def test_slurm_dry_run_writes_and_prints_no_secret(tmp_path, recipe, capsys):
    assert healer_main(["launch", "--slurm", "--dry-run", "cpt", str(recipe)]) == 0
    out, err = capsys.readouterr()
    launch_dir = tmp_path / "run" / "launch" / "cpt"
    for text in (out, err, (launch_dir / "cpt.sbatch").read_text(), (launch_dir / "recipe.yaml").read_text()):
        assert TOKEN not in text and "mlx5_0" not in text
    assert "HF_TOKEN, NCCL_IB_HCA (launch.env) in sbatch's environment" in err
    copy = yaml.safe_load((launch_dir / "recipe.yaml").read_text())
    assert copy["launch"]["env"] == {"HF_TOKEN": "<redacted>", "NCCL_IB_HCA": "<redacted>"}
    assert stat.S_IMODE((launch_dir / "recipe.yaml").stat().st_mode) & 0o077 != 0o077  # not private: no secret


def test_ranks_copy_keeps_a_secret_they_need_but_only_for_its_owner(tmp_path):
    url = f"https://user:{TOKEN}@models.example/tiny"
    recipe = load_recipe(None, {"model.source": url, "launch.env": {"WANDB_API_KEY": "0123456789abcdef" * 2}})
    path = tmp_path / "launch" / "recipe.yaml"
    assert write_rank_recipe(recipe, path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    copy = yaml.safe_load(path.read_text())
    assert copy["model"]["source"] == url  # the ranks load the model from it
    assert copy["launch"]["env"] == {"WANDB_API_KEY": "<redacted>"}  # they get this one from their environment


def test_error_from_a_launch_flag_names_the_flag(tmp_path, recipe, capsys):
    assert healer_main(["launch", "--nproc", "1", "--master-addr=-oProxyCommand=x", "cpt", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "--master-addr: '-oProxyCommand=x' is not a host name" in err and TOKEN not in err


# ---- hostfiles and ssh -------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"\x7fELF\x02\x01\x01\x00\x00\x00", "hôst slots=1\n".encode("latin-1")])
def test_binary_or_non_utf8_hostfile_is_one_line_naming_it(tmp_path, recipe, capsys, data):
    hosts = tmp_path / "hosts"
    hosts.write_bytes(data)
    assert healer_main(["launch", "--hostfile", str(hosts), "--no-ssh", "--node-rank", "0", "cpt",
                        str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"hostfile {hosts}: not a text file" in err


def test_host_that_ssh_would_read_as_an_option_is_refused(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\n-v slots=1\n")
    with pytest.raises(hostfile.HostfileError, match=r"line 2: host '-v' starts with '-'"):
        hostfile.parse_hostfile(hosts)


def test_ssh_trusts_unknown_host_keys_only_when_asked(monkeypatch):
    calls = []

    def fake_ssh(cmd, **kwargs):
        calls.append(cmd)
        known = "StrictHostKeyChecking=yes" not in cmd
        return subprocess.CompletedProcess(cmd, 0 if known else 255, "",
                                           "" if known else "Host key verification failed.\n")

    monkeypatch.setattr(hostfile.subprocess, "run", fake_ssh)
    monkeypatch.setattr(hostfile.shutil, "which", lambda name: "/usr/bin/ssh")
    hosts = [hostfile.Host("node1", 1, 1)]
    with pytest.raises(hostfile.HostfileError, match="launch.ssh_host_key_checking: accept-new"):
        hostfile.check_ssh(hosts)  # the default: an unknown host key is refused
    hostfile.check_ssh(hosts, "accept-new")
    assert "StrictHostKeyChecking=accept-new" in calls[-1]
    assert calls[-1][-3:] == ["--", "node1", "true"]  # the host can never be taken for an option
    assert LaunchConfig().ssh_host_key_checking == "yes"


def test_env_value_the_deepspeed_launcher_would_run_over_ssh_is_refused(tmp_path, recipe, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    args = ["launch", "--hostfile", str(hosts), "--dry-run", "cpt", str(recipe)]
    assert healer_main(args) == 0  # a token is letters and digits: passed as it is
    out, err = capsys.readouterr()
    assert "deepspeed.launcher.runner" in out and TOKEN not in out + err
    assert healer_main([*args, "--launch.env", "{HF_TOKEN: '$(touch PWNED)'}"]) == 2
    err = capsys.readouterr().err
    assert "launch.env.HF_TOKEN: its value holds $" in err and "--no-ssh" in err and "touch" not in err


def test_secret_typed_into_setup_keeps_the_script_private_and_the_console_clean(tmp_path, recipe, capsys):
    args = ["launch", "--slurm", "--dry-run", "cpt", str(recipe), "--launch.slurm.setup", f"[export WANDB={TOKEN}]"]
    assert healer_main(args) == 0
    out, err = capsys.readouterr()
    script = tmp_path / "run" / "launch" / "cpt" / "cpt.sbatch"
    assert TOKEN not in out and "export WANDB=<redacted>" in out and "mode 0600" in err
    assert TOKEN in script.read_text() and stat.S_IMODE(script.stat().st_mode) == 0o600  # the job needs it


def test_path_the_deepspeed_launcher_would_paste_into_the_remote_shell_is_refused(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    run_dir = tmp_path / "run;touch PWNED"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(run_dir), "model": {"source": "unused"}}))
    assert healer_main(["launch", "--hostfile", str(hosts), "--dry-run", "cpt", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "holds characters a shell acts on" in err and "--no-ssh" in err
    assert not list(tmp_path.rglob("PWNED*"))


def test_numeric_env_value_from_yaml_becomes_text():
    recipe = load_recipe(None, {"model.source": "unused", "launch.env": {"NCCL_IB_DISABLE": 1}})
    assert recipe.launch.env == {"NCCL_IB_DISABLE": "1"}


def test_run_stage_hands_flags_and_overrides_to_every_rank_and_checks_the_overrides(tmp_path, recipe, capsys):
    from healer.launch.run import run_stage

    cfg = LaunchConfig(nproc_per_node=2)
    assert run_stage("cpt", str(recipe), ["--resume", "none", "seed=7"], cfg, dry_run=True) == 0
    assert f"-m healer cpt --config {recipe.resolve()} --resume none seed=7" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="seed"):
        run_stage("cpt", str(recipe), ["seed=seven"], cfg, dry_run=True)
