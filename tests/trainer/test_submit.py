"""`tessera submit` without a cluster: the --dry-run script, and every error that must stop a
submission before it reaches Slurm."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from training import tiny_config

from tessera.data.format import DataError
from tessera.launch import slurm
from tessera.launch.env import DistEnv
from tessera.trainer import submit
from tessera.trainer.config import ConfigError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera", *args], capture_output=True, text=True)


def cli_overrides(run_dir, shards, **extra) -> list[str]:
    keys = {"run.dir": run_dir, "data.shards": shards, "model.num_kv_heads": 2, **extra}
    return [f"{key}={value}" for key, value in keys.items()]


def test_dry_run_prints_the_sbatch_script(tmp_path, byte_shards):
    done = run_cli("submit", "--dry-run", *cli_overrides(
        tmp_path / "run", byte_shards, **{
            "slurm.nodes": 4, "slurm.tasks_per_node": 8, "slurm.gpus_per_node": 8,
            "slurm.cpus_per_task": 12, "slurm.mem_gb": 500, "slurm.partition": "gpu",
            "slurm.account": "proj7", "slurm.qos": "high", "slurm.constraint": "h100",
            "slurm.time_min": 1440, "slurm.signal": "USR1", "slurm.signal_lead_s": 300,
            "slurm.sbatch_options": "{exclusive: true, mail-type: END, requeue: false}",
            "slurm.setup": "['module load cuda/12.4']", "parallel.tp": 2,
            "train.global_batch_size": 32, "train.micro_batch_size": 2,
        }))
    assert done.returncode == 0, done.stderr
    script = done.stdout
    log_dir = tmp_path.resolve() / "run" / "slurm" / "%j"
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=512000M", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj7", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
                 "#SBATCH --time=1440", "#SBATCH --signal=USR1@300", "#SBATCH --exclusive",
                 "#SBATCH --mail-type=END", "#SBATCH --job-name=tessera-run",
                 f"#SBATCH --output={log_dir}/%j_0_log.out", "module load cuda/12.4",
                 "export SUBMITIT_PREEMPT_SIGNAL=USR1"]:
        assert line in script.splitlines(), f"{line!r} not in:\n{script}"
    assert "srun --unbuffered" in script and "-m submitit.core._submit" in script
    assert "--wckey" not in script
    assert "#SBATCH --requeue" not in script  # a flag set to false is left out
    # the command each task runs, in plain view; the step restarts in the allocation
    config = tmp_path.resolve() / "run" / "slurm" / "submitted.yaml"
    assert (f"# each task is one rank ($SLURM_PROCID) of: python -m tessera train --config "
            f"{config}") in script.splitlines()
    [step] = [line for line in script.splitlines() if "srun --unbuffered" in line]
    assert "-m tessera.launch.restarts --run-dir" in step and "--max-restarts 3" in step
    assert step.index("tessera.launch.restarts") < step.index("srun") < step.index(
        "--kill-on-bad-exit=1")
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_a_dry_run_only_warns_about_data_it_cannot_read_here(tmp_path):
    """The README's `--dry-run data.shards=/shared/data/train` from a laptop: the data lives on
    the cluster, so the script is printed with a warning; a real submission refuses."""
    shards = tmp_path / "shared" / "data" / "train"
    done = run_cli("submit", "--dry-run", *cli_overrides(tmp_path / "run", shards))
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=1" in done.stdout
    assert done.stderr.startswith("tessera submit: warning:") and str(shards) in done.stderr
    refused = run_cli("submit", *cli_overrides(tmp_path / "run", shards))
    assert refused.returncode == 2 and refused.stderr.startswith("tessera submit: error:")
    assert str(shards) in refused.stderr


def test_torchrun_launcher_runs_one_task_per_node(tmp_path, byte_shards):
    cfg = tiny_config(tmp_path / "run", byte_shards, **{
        "slurm.launcher": "torchrun", "slurm.nodes": 2, "launch.nproc_per_node": 4,
        "slurm.gpus_per_node": 4, "train.global_batch_size": 16})
    submit.check_config(cfg)
    assert submit.world_size(cfg) == 8
    assert "#SBATCH --ntasks-per-node=1" in submit.sbatch_script(cfg).splitlines()


@pytest.mark.parametrize("overrides, key", [
    ({"parallel.tp": 3}, "parallel.tp"),  # does not divide the heads
    ({"slurm.nodes": 3}, "train.global_batch_size"),  # 8 sequences over dp=3
    ({"slurm.launcher": "mpirun"}, "slurm.launcher"),
    ({"slurm.launcher": "torchrun", "slurm.tasks_per_node": 2}, "slurm.tasks_per_node"),
    ({"slurm.gpus_per_node": 8, "slurm.tasks_per_node": 4}, "slurm.tasks_per_node"),
    ({"slurm.signal": "USR9"}, "slurm.signal"),
    ({"slurm.time_min": 2, "slurm.signal_lead_s": 120}, "slurm.signal_lead_s"),
    ({"slurm.sbatch_options": "{nodes: 2}"}, "slurm.sbatch_options"),
    ({"data.shards": "/nonexistent/shards"}, "/nonexistent/shards"),
])
def test_invalid_config_fails_at_submit(tmp_path, byte_shards, overrides, key):
    cfg = tiny_config(tmp_path / "run", byte_shards, **overrides)
    with pytest.raises((ConfigError, DataError), match=re.escape(key)):
        submit.submit(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, key, words", [
    ({"mail type": "END"}, "mail type", "not an sbatch long option"),
    ({"exclusive;": True}, "exclusive;", "not an sbatch long option"),
    ({"--exclusive": True}, "--exclusive", "without the leading --"),
    ({"comment": "one\nsbatch stops reading here"}, "comment", "must be one line"),
    ({"comment": ["a", "b"]}, "comment", "must be a single value"),
])
def test_sbatch_options_that_would_end_the_header_are_refused(tmp_path, byte_shards, options,
                                                               key, words):
    """sbatch reads #SBATCH lines up to the first other line: a broken one would silently drop
    --time, --nodes and the rest after it."""
    cfg = tiny_config(tmp_path / "run", byte_shards)
    cfg.slurm.sbatch_options = options
    with pytest.raises(ConfigError, match=re.escape(f"config key 'slurm.sbatch_options.{key}': "
                                                    f"") + ".*" + re.escape(words)):
        submit.check_config(cfg, dry_run=True)


def test_a_dry_run_refuses_a_run_dir_that_is_a_file(tmp_path, byte_shards, capsys):
    from tessera.cli import main

    (tmp_path / "a-file").write_text("not a directory")
    for run_dir, words in [(tmp_path / "a-file", "exists and is not a directory"),
                           (tmp_path / "a-file" / "run", f"lies under {tmp_path / 'a-file'}")]:
        assert main(["submit", "--dry-run", *cli_overrides(run_dir, byte_shards)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tessera submit: error: config key 'run.dir': {run_dir} {words}")
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("launcher, ranks_from", [
    ("srun", "slurm.tasks_per_node x slurm.nodes"),
    ("torchrun", "launch.nproc_per_node x slurm.nodes"),
])
def test_a_rank_count_that_does_not_fit_names_the_launchers_key(tmp_path, byte_shards, launcher,
                                                                 ranks_from):
    """Under srun the ranks per node are slurm.tasks_per_node; launch.nproc_per_node is
    torchrun's and the local launcher's."""
    cfg = tiny_config(tmp_path / "run", byte_shards, **{
        "parallel.tp": 2, "slurm.launcher": launcher, "launch.nproc_per_node": 1})
    with pytest.raises(ConfigError, match=re.escape(f"run a multiple of 2 ranks ({ranks_from})")):
        submit.check_config(cfg)


def test_cli_reports_an_invalid_config_in_one_line(tmp_path, byte_shards):
    done = run_cli("submit", *cli_overrides(tmp_path / "run", byte_shards, **{"slurm.nodes": 3}))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("tessera submit: error: config key 'train.global_batch_size'")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()


def test_missing_slurm_tools_fail_before_anything_is_written(tmp_path, byte_shards, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    cfg = tiny_config(tmp_path / "run", byte_shards, **{"slurm.nodes": 2})
    with pytest.raises(slurm.SlurmError, match="Slurm tools not found on PATH .*sbatch"):
        submit.submit(cfg)
    assert not (tmp_path / "run").exists()


def _env(rank: int) -> DistEnv:
    return DistEnv(rank=rank, world_size=2, local_rank=0, local_world_size=1, node_rank=rank,
                   num_nodes=2, master_addr="n1", master_port=20001, job_id="1")


def test_after_a_stop_only_task_0_requeues_and_at_most_max_requeues(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as leaving:
        slurm.requeue_or_end(_env(rank=1), 2, None)  # not task 0: leaves cleanly, requeues nothing
    assert leaving.value.code == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # a requeue attempt would fail loudly
    with pytest.raises(RuntimeError, match=r"2 requeues \(slurm.max_requeues=2\): not requeued"):
        slurm.requeue_or_end(_env(rank=0), 2, None)


def test_status_without_slurm_reads_the_run_directory(tmp_path, monkeypatch, capsys):
    from tessera.cli import main

    run = tmp_path / "run"
    (run / "slurm" / "41").mkdir(parents=True)
    (run / "slurm" / "jobs.jsonl").write_text(
        '{"job_id": "41", "job_name": "tessera-run", "log_dir": "%s", "submitted_at": '
        '"2026-01-01T00:00:00", "nodes": 2, "launcher": "srun", "world_size": 2, "steps": 8}\n'
        % (run / "slurm" / "41"))
    (run / "metrics.jsonl").write_text('{"step": 6, "total_steps": 8, "loss": 2.5}\n')
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "41" in out and "UNKNOWN (no Slurm tools here)" in out
    assert "last step: 6 of 8  loss 2.5000" in out
    assert "last checkpoint: none" in out
    assert "faults: restarts 0  hangs 0  crashes 0  stragglers 0  requeues 0" in out
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "shards").mkdir()  # a directory, but not a run's
    assert main(["status", str(tmp_path / "shards")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tessera status: error: {tmp_path / 'shards'} is not a run directory: no jobs submitted "
        f"from it and no config.yaml, metrics.jsonl, checkpoints")
    assert main(["status", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: tessera status RUN_DIR")


@pytest.mark.parametrize("output, line", [
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition "
     "combination specified", "config key 'slurm.account': Slurm rejects the job (sbatch "
     "--test-only): Invalid account or account/partition combination specified"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification",
     "config key 'slurm.qos': Slurm rejects the job (sbatch --test-only): Invalid qos"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "Slurm rejects the job (sbatch --test-only): Requested node configuration is not available"),
])
def test_a_refusal_by_sbatch_is_one_line_naming_its_key(output, line):
    assert slurm.rejection(output).startswith(line)


def test_an_unreachable_controller_is_one_line(tmp_path, byte_shards, monkeypatch):
    """Slurm's tools present, its controller down: sinfo's own words (several lines) become one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in slurm.SLURM_TOOLS:
        script = bin_dir / tool
        script.write_text("#!/bin/sh\necho 'sinfo: error: Unable to contact slurm controller "
                          "(connect failure)' >&2\necho 'slurm_load_partitions: Unable to "
                          "contact slurm controller (connect failure)' >&2\nexit 1\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    cfg = tiny_config(tmp_path / "run", byte_shards)
    with pytest.raises(slurm.SlurmError) as error:
        submit.submit(cfg)
    assert str(error.value) == ("the Slurm controller does not answer (`sinfo`); is slurmctld up, "
                                "and SLURM_CONF the cluster's? (`scontrol ping`)")
