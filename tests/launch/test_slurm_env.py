"""Ranks and rendezvous from Slurm's variables (as submitit reads them), without a cluster."""

from __future__ import annotations

import os
import re
import signal

import pytest

from tessera.launch.env import (
    PORT_BASE,
    PORT_SPAN,
    LaunchEnvError,
    check_launch_env,
    from_slurm,
    master_port_for_job,
)
from tessera.launch.signals import parse_signal
from tessera.launch.slurm import JobStep, SlurmError, gpus_in_gres

SLURM_TASK_3_OF_4 = {  # what srun sets for the second task on the second of two nodes
    "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NTASKS_PER_NODE": "2",
}


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")


def test_ranks_and_master_from_slurm_variables(monkeypatch):
    for key, value in SLURM_TASK_3_OF_4.items():
        monkeypatch.setenv(key, value)
    for key in (*TORCHRUN_VARIABLES, "GROUP_RANK"):
        monkeypatch.setenv(key, "")  # records the original, so that the test's export is undone
        monkeypatch.delenv(key)
    env = from_slurm()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.job_id) == (1, 2, "4242")
    assert env.master_addr == "gpu-a07"  # the allocation's first host
    env.export()
    assert {k: os.environ[k] for k in TORCHRUN_VARIABLES} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu-a07", "MASTER_PORT": str(PORT_BASE + 4242),
    }
    check_launch_env()  # what srun's tasks export passes the check of stray variables


def test_master_port_follows_the_job_id():
    assert master_port_for_job("4242") == master_port_for_job("4242") == PORT_BASE + 4242
    assert master_port_for_job(str(PORT_SPAN + 7)) == PORT_BASE + 7
    ports = {master_port_for_job(str(job)) for job in range(100_000, 100_050)}
    assert len(ports) == 50 and all(PORT_BASE <= p < 32768 for p in ports)  # below ephemeral ports


def test_signal_names():
    assert parse_signal("USR2") is parse_signal("SIGUSR2") is parse_signal("usr2") is signal.SIGUSR2
    assert parse_signal("TERM") is signal.SIGTERM
    with pytest.raises(ValueError, match="not a signal name"):
        parse_signal("USR3")


@pytest.mark.parametrize("gres, gpus", [
    ("(null)", 0), ("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:4(S:0-1),shard:8", 4),
    ("gpu:h100:2,gpu:a100:2", 4), ("shard:8", 0),
])
def test_gpus_per_node_from_sinfo_gres(gres, gpus):
    assert gpus_in_gres(gres) == gpus


SUBMITIT_SCRIPT = ("#!/bin/bash\n#SBATCH --nodes=2\nexport X=1\n"
                   "srun --output x.out python -u -m run\n")


def test_the_job_step_wraps_the_one_srun_line():
    step = JobStep(wrapper=("python", "-m", "restarts", "--max=2 tries", "--"), note=("task: x",))
    assert step.wrap(SUBMITIT_SCRIPT).split("\n")[3:5] == [
        "# task: x", "python -m restarts '--max=2 tries' -- srun --output x.out python -u -m run"]


@pytest.mark.parametrize("script", [SUBMITIT_SCRIPT.replace("srun ", "  srun "),
                                    SUBMITIT_SCRIPT + "srun --other\n"])
def test_a_script_without_exactly_one_srun_line_is_refused(script):
    with pytest.raises(SlurmError, match=r"submitit .* (0|2) lines starting with `srun `"):
        JobStep(wrapper=("restarts", "--")).wrap(script)


@pytest.mark.parametrize("env, words", [
    ({"RANK": "abc"}, "RANK='abc' is not a rank (an integer from 0 to WORLD_SIZE-1 = 0)"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK='2' is not a rank"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a number of processes (an integer >= 1)"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a local rank (an integer >= 0)"),
    ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' is not a number of ranks per node"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 asks for 2 processes but MASTER_ADDR is not "
                                       "set"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "but RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "70000"},
     "MASTER_PORT='70000' is not a TCP port"),
])
def test_stray_launcher_variables_are_named(env, words):
    with pytest.raises(LaunchEnvError, match=re.escape(words)) as error:
        check_launch_env(env)
    assert "torchrun sets" in str(error.value) and "unset" in str(error.value)


def test_a_launch_and_a_plain_shell_pass_the_check():
    check_launch_env({})
    check_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
