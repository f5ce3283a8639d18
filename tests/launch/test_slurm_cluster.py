"""On a real two-node Slurm cluster (tests/launch/local_slurm.py): a 2-node job trains and
checkpoints; a 2-node job that gets USR2 mid-run saves, requeues, resumes and ends with losses
bitwise equal to the uninterrupted job; --dry-run prints the script submitit submits; requests the
cluster cannot run fail at submit with nothing submitted. Skipped without root and apt-get."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from training import last_losses, losses, rank_pid, read_metrics, tiny_config

from tessera.launch import faults, slurm
from tessera.trainer import checkpoint, stragglers, submit
from tessera.trainer.config import ConfigError
from tessera.trainer.status import status_lines

pytestmark = pytest.mark.slow

STEPS = 24  # enough that USR2, sent after step 3, lands mid-run
JOB_TIMEOUT_S = 600  # generous: other work may share the 2 cores
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def job_config(run_dir: Path, shards: Path, **overrides):
    """A tiny fp32 model on 2 nodes x 1 task, clipping off (as for a bitwise comparison)."""
    return tiny_config(run_dir, shards, **{
        "train.steps": STEPS, "train.grad_clip": 0, "checkpoint.interval": 8,
        "slurm.nodes": 2, "slurm.tasks_per_node": 1, "slurm.cpus_per_task": 1,
        "slurm.time_min": 10, "slurm.signal_lead_s": 60, **overrides})


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True,
                         text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(predicate, what: str, timeout_s: float = JOB_TIMEOUT_S, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_until_ended(job: slurm.Submitted) -> dict[str, str]:
    info = wait_for(lambda: (i := job_info(job.job_id))["JobState"] in ENDED and i,
                    f"job {job.job_id} to end", interval_s=0.5)
    if info["JobState"] != "COMPLETED":
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(job.log_dir.glob("*_log.*")))
        fields = {k: info.get(k) for k in ("Reason", "ExitCode", "DerivedExitCode", "Restarts")}
        raise AssertionError(f"job {job.job_id} ended {info['JobState']} {fields}:\n{logs}\n"
                             f"slurmctld.log on job {job.job_id}:\n{controller_log(job.job_id)}")
    return info


def controller_log(job_id: str) -> str:
    """The local cluster's slurmctld.log lines on one job (next to its SLURM_CONF)."""
    log = Path(os.environ["SLURM_CONF"]).parent / "log" / "slurmctld.log"
    mark = f"JobId={job_id} "
    return "\n".join(line for line in log.read_text().splitlines() if mark in line + " ")


def known_jobs() -> list[str]:
    out = subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, byte_shards, tmp_path_factory):
    """A 2-node job (srun launcher: Slurm starts both ranks) run to its end."""
    cfg = job_config(tmp_path_factory.mktemp("slurm") / "uninterrupted", byte_shards)
    job = submit.submit(cfg)
    return cfg, job, wait_until_ended(job)


def test_two_node_job_trains_across_both_nodes_and_checkpoints(uninterrupted):
    cfg, job, info = uninterrupted
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0"
    rows = read_metrics(cfg.run.dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # a finished run: no requeue
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    task_logs = {t: (job.log_dir / f"{job.job_id}_{t}_log.out").read_text() for t in (0, 1)}
    assert "world=2 dp=2" in task_logs[0]
    assert "node=1(2), global_rank=1(2)" in task_logs[1]  # the second rank ran on the second node
    root = Path(cfg.run.dir) / "checkpoints"
    assert checkpoint.committed_steps(root) == [8, 16, 24]
    rng_files = sorted(p.name for p in (root / checkpoint.tag_for(STEPS) / "rng").iterdir())
    assert rng_files == ["rank-00000.pt", "rank-00001.pt"]
    assert any("COMPLETED" in line and "requeues 0" in line for line in status_lines(cfg.run.dir))


def test_usr2_mid_run_saves_requeues_and_matches_the_uninterrupted_job(uninterrupted, byte_shards,
                                                                       tmp_path):
    """torchrun launcher here (one task per node starting the node's ranks), srun for the
    reference: the same training either way, so the losses must agree bit for bit."""
    reference, _, _ = uninterrupted
    cfg = job_config(tmp_path / "preempted", byte_shards, **{"slurm.launcher": "torchrun"})
    job = submit.submit(cfg)
    metrics = Path(cfg.run.dir) / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3,
             "step 3 of the job")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    # The requeued job starts again once Slurm's credential lifetime has passed (the local
    # cluster's AuthInfo=cred_expire). Forcing an earlier start (StartTime=now) can get the new
    # run's launch refused as its old run's revoked credential: the job then ends FAILED.
    wait_for(lambda: job_info(job.job_id)["Restarts"] == "1", "the requeue")
    info = wait_until_ended(job)
    assert info["Restarts"] == "1"
    log = (job.log_dir / f"{job.job_id}_0_log.out").read_text()
    assert "SIGUSR2 received" in log and f"job {job.job_id} requeued" in log
    stopped_at = int(log.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 3 <= stopped_at < STEPS
    rows = read_metrics(cfg.run.dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert losses(rows) == losses(read_metrics(reference.run.dir))  # bitwise, fp32
    lines = status_lines(cfg.run.dir)
    assert any("COMPLETED" in line and "requeues 1" in line for line in lines), lines
    assert any(line.startswith(f"last step: {STEPS} of {STEPS}  loss") for line in lines), lines
    last = Path(cfg.run.dir) / "checkpoints" / checkpoint.tag_for(STEPS)
    assert f"last checkpoint: {last}" in lines


def test_dry_run_prints_the_script_submitit_submitted(uninterrupted):
    cfg, job, _ = uninterrupted
    submitted = (job.log_dir / f"{job.job_id}_submission.sh").read_text()
    assert submit.sbatch_script(cfg) == submitted
    assert "--wckey" not in submitted  # only where slurm.sbatch_options names one


@pytest.mark.parametrize("overrides, message", [
    ({"slurm.partition": "gpu-h100"}, "config key 'slurm.partition': no partition 'gpu-h100'"),
    ({"slurm.gpus_per_node": 1}, "config key 'slurm.gpus_per_node': 1 GPUs per node requested"),
    ({"slurm.cpus_per_task": 3}, "config key 'slurm.cpus_per_task': 3 CPUs"),
    ({"slurm.mem_gb": 64}, "config key 'slurm.mem_gb': 65536 MB"),
    ({"slurm.nodes": 3, "train.global_batch_size": 6}, "config key 'slurm.nodes': 3 nodes"),
    ({"parallel.tp": 3}, "config key 'parallel.tp'"),  # an invalid config: not even Slurm is asked
])
def test_requests_the_cluster_cannot_run_fail_with_nothing_submitted(
        slurm_cluster, byte_shards, tmp_path, overrides, message):
    before = known_jobs()
    cfg = job_config(tmp_path / "run", byte_shards, **overrides)
    with pytest.raises((slurm.SlurmError, ConfigError)) as error:
        submit.submit(cfg)
    assert message in str(error.value)
    assert known_jobs() == before
    assert not (tmp_path / "run" / "slurm").exists()


# ---------------------------------------------------------------------------------------------
# Faults (resilience): a hang named and restarted, a killed rank restarted in the allocation, a
# straggler named, a struck host left out



def fault_at_step(cfg, job: slurm.Submitted, sig: signal.Signals, step: int = 6) -> float:
    """`sig` to rank 1 (on n2) once `step` steps are logged; returns when (monotonic)."""
    metrics = Path(cfg.run.dir) / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= step,
             f"step {step} of the job")
    os.kill(rank_pid(cfg.run.dir, 1), sig)
    return time.monotonic()



def test_a_stopped_rank_is_named_with_its_node_and_restarted_in_the_allocation(
        uninterrupted, byte_shards, tmp_path):
    reference, _, _ = uninterrupted
    # a save at step 4 before the fault: a later save then has no 10x first-save allowance
    cfg = job_config(tmp_path / "hang", byte_shards, **{"resilience.hang_timeout_s": 5,
                                                        "checkpoint.interval": 4})
    job = submit.submit(cfg)
    fault = fault_at_step(cfg, job, signal.SIGSTOP)
    summary = Path(cfg.run.dir) / faults.HANGS_DIR
    wait_for(lambda: list(summary.glob("*/summary.txt")), "the hang's line")
    named_after_s = time.monotonic() - fault
    info = wait_until_ended(job)
    assert info["Restarts"] == "0"  # restarted in the allocation, not requeued
    log = (job.log_dir / f"{job.job_id}_0_log.out").read_text()
    batch_log = (job.log_dir / f"{job.job_id}_0_log.err").read_text()
    line = next(line for line in log.splitlines() if "tessera: hang at step" in line)
    assert "rank 1 on n2 stopped (no heartbeat for" in line, line
    assert named_after_s < 5 + 30, named_after_s
    assert "restart 1 of 3" in batch_log, batch_log
    [hang_dir] = summary.iterdir()
    assert 'File "' in (hang_dir / "rank-00000.txt").read_text()
    assert last_losses(cfg.run.dir) == losses(read_metrics(reference.run.dir))  # bitwise
    assert faults.host_strikes(cfg.run.dir)["n2"]["strikes"] == 1
    print(f"hang named {named_after_s:.1f} s after SIGSTOP")


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_a_killed_rank_is_restarted_in_the_allocation_without_a_requeue(
        uninterrupted, byte_shards, tmp_path, launcher):
    """torchrun: the node's agent sees its rank die and fails its task; srun ends the step on
    both nodes, and the batch script's loop starts it again, as with srun ranks."""
    reference, _, _ = uninterrupted
    cfg = job_config(tmp_path / "killed", byte_shards, **{"slurm.launcher": launcher})
    job = submit.submit(cfg)
    fault_at_step(cfg, job, signal.SIGKILL)
    info = wait_until_ended(job)
    assert info["Restarts"] == "0"
    batch_log = (job.log_dir / f"{job.job_id}_0_log.err").read_text()
    assert "killed or crashed without an error: rank 1 on n2" in batch_log, batch_log
    assert "restart 1 of 3" in batch_log
    assert last_losses(cfg.run.dir) == losses(read_metrics(reference.run.dir))
    lines = "\n".join(status_lines(cfg.run.dir))
    assert "restarts 1" in lines and "host n2: 1 strikes" in lines, lines


def test_a_slow_rank_is_named_within_three_log_steps(slurm_cluster, byte_shards, tmp_path,
                                                     monkeypatch):
    # rank 1: 1.5 s more per step, well above the first steps' own times on a loaded 2-core
    # machine (with 0.4 s, a slow first step of rank 0 once kept the ratio below 1.5 until step 5)
    monkeypatch.setenv(stragglers.TEST_HOOK_VARIABLE, "1:1.5")
    cfg = job_config(tmp_path / "straggler", byte_shards, **{"train.steps": 6})
    job = submit.submit(cfg)
    wait_until_ended(job)
    err = (job.log_dir / f"{job.job_id}_0_log.err").read_text()
    line = next(line for line in err.splitlines() if "tessera: straggler at step" in line)
    assert line.startswith("tessera: straggler at step 3: rank 1 on n2 ("), line
    rows = read_metrics(cfg.run.dir)
    assert all(row["straggler/slowest_rank"] == 1 for row in rows)
    ratios = [row["straggler/ratio"] for row in rows]
    # the 3 rows that named it; later ones stay above 1 (the other test worker's load may slow
    # rank 0 too on 2 cores: seen at 1.16 once)
    assert min(ratios[:3]) > 1.5 and min(ratios) > 1.0, ratios


def test_a_host_with_enough_strikes_is_left_out_of_the_next_submission(
        slurm_cluster, byte_shards, tmp_path):
    """n1 is the node Slurm picks first; two strikes there send a 1-node job to n2."""
    cfg = job_config(tmp_path / "struck", byte_shards, **{
        "train.steps": 2, "slurm.nodes": 1, "resilience.exclude_after": 2})
    for _ in range(2):
        faults.add_strike(cfg.run.dir, "n1", "a test's strike")
    assert "--exclude=n1" in submit.sbatch_script(cfg)
    job = submit.submit(cfg)
    info = wait_until_ended(job)
    assert info["NodeList"] == "n2", info


def test_spent_restarts_requeue_the_job_without_the_struck_node(uninterrupted, byte_shards,
                                                                 tmp_path):
    """No in-allocation restart left: the job requeues as a preempted one does, with the node of
    the killed rank (one strike, exclude_after=1) excluded, and finishes on the other node."""
    reference, _, _ = uninterrupted
    cfg = job_config(tmp_path / "requeued", byte_shards, **{
        "slurm.nodes": 1, "slurm.tasks_per_node": 2, "resilience.max_restarts": 0,
        "resilience.exclude_after": 1})
    job = submit.submit(cfg)
    fault_at_step(cfg, job, signal.SIGKILL)
    wait_for(lambda: job_info(job.job_id)["Restarts"] == "1", "the requeue")
    info = wait_until_ended(job)
    [struck] = faults.host_strikes(cfg.run.dir)
    assert info["NodeList"] != struck, info  # the requeued job ran on the other node
    batch_log = (job.log_dir / f"{job.job_id}_0_log.err").read_text()
    assert f"requeuing job {job.job_id} without {struck}" in batch_log, batch_log
    assert last_losses(cfg.run.dir) == losses(read_metrics(reference.run.dir))  # dp=2 either way
