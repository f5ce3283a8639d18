"""Hostile and careless input, built the way an attacker or a hurried user would build it: a
checkpoint folder never runs code, one trainer per run directory, manifests and retention stay
inside their folder. The README's "When something goes wrong" keeps the table of these cases."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoints import flip_byte, largest_file
from multiproc import run_ranks
from training import read_metrics, tiny_config, train_each

from tessera.trainer import checkpoint
from tessera.trainer.config import ConfigError


def resign(step_dir: Path) -> None:
    """What an attacker who edited a checkpoint does next: make its manifest vouch for it."""
    manifest = json.loads((step_dir / checkpoint.MANIFEST_FILE).read_text())
    files = {}
    for path in sorted(step_dir.rglob("*")):
        relative = path.relative_to(step_dir).as_posix()
        if path.is_file() and relative != checkpoint.MANIFEST_FILE:
            files[relative] = {"bytes": path.stat().st_size,
                               "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest["files"] = files
    config = (step_dir / checkpoint.CONFIG_FILE).read_bytes()
    manifest["config_sha256"] = hashlib.sha256(config).hexdigest()
    (step_dir / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, byte_shards) -> Path:
    """A run of 2 steps (one committed checkpoint) to tamper with, copied per test."""
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    run_ranks(1, train_each, [tiny_config(run_dir, byte_shards, **{"train.steps": 2})])
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(trained, tmp_path / "run"))


def plant_pipe_command(step_dir: Path, marker: Path) -> None:
    """The step's config names a `pipe:` data source whose command writes `marker`."""
    from omegaconf import OmegaConf

    path = step_dir / checkpoint.CONFIG_FILE
    cfg = OmegaConf.create(path.read_text())
    cfg.data.shards = f"pipe:id > {marker}; cat {step_dir}/manifest.json"
    path.write_text(OmegaConf.to_yaml(cfg))
    resign(step_dir)


def test_a_checkpoint_naming_a_pipe_command_runs_nothing(run_copy, tmp_path, capsys):
    from tessera.trainer.convert import convert_command
    from tessera.trainer.generate import Sampling, generate

    step_dir = run_copy / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    plant_pipe_command(step_dir, marker)
    assert checkpoint.problems(step_dir) == []  # the attacker re-signed it: it verifies

    text = generate(run_copy, "the model", Sampling(max_new_tokens=4))  # the carried tokenizer
    assert isinstance(text, str)
    assert convert_command(["to-hf", str(run_copy), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert convert_command(["reshard", str(run_copy), str(tmp_path / "resharded")]) == 0
    out = capsys.readouterr().out
    assert "data.shards of the checkpoint's config is a URL or pipe: command" in out
    resharded = (tmp_path / "resharded" / "config.yaml").read_text()
    assert "pipe:" not in resharded
    assert checkpoint.carried_tokenizer(  # the resharded checkpoint carries it on
        tmp_path / "resharded" / "checkpoints" / "step-00000002") is not None
    assert not marker.exists(), "a command from the checkpoint ran"


def test_a_checkpoint_without_a_tokenizer_asks_for_one_and_opens_no_data(run_copy, tmp_path,
                                                                          capsys):
    from tessera.cli import main

    step_dir = run_copy / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    for path in (step_dir / checkpoint.TOKENIZER_DIR).iterdir():
        path.unlink()
    (step_dir / checkpoint.TOKENIZER_DIR).rmdir()
    plant_pipe_command(step_dir, marker)
    capsys.readouterr()
    assert main(["generate", str(step_dir), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "carries no tokenizer" in err and "--tokenizer" in err and len(err.splitlines()) == 1
    assert main(["convert", "to-hf", str(step_dir), str(tmp_path / "hf")]) == 2
    assert not marker.exists()


def test_a_tokenizer_other_than_the_checkpoints_is_refused(run_copy, tmp_path, byte_shards,
                                                             capsys):
    """--tokenizer of generate and to-hf: a tokenizer that gives other ids than the one the
    checkpoint carries would read and write other text; the data's own is accepted."""
    from tessera.cli import main
    from tessera.data.tokenizer import train_bpe

    step_dir = run_copy / "checkpoints" / "step-00000002"
    other = tmp_path / "tokenizer.json"
    other.write_text(train_bpe(["the quick brown fox", "jumps over the dog"] * 20, 260).to_str())
    capsys.readouterr()
    for command in (["generate", str(step_dir), "--prompt", "hi"],
                    ["convert", "to-hf", str(step_dir), str(tmp_path / "hf")]):
        assert main([*command, "--tokenizer", str(other)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--tokenizer {other}: another tokenizer than the one {step_dir} was "
                            f"trained with (hf, vocabulary 260, EOS 0 vs bytes, vocabulary 257, "
                            f"EOS 256); leave --tokenizer out to use the checkpoint's"), err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()
    assert main(["generate", str(step_dir), "--prompt", "hi", "--max-new-tokens", "2",
                 "--tokenizer", str(byte_shards)]) == 0


def test_a_runs_damaged_newest_checkpoint_is_skipped_as_a_resume_skips_it(run_copy, byte_shards,
                                                                           tmp_path, capsys):
    """generate and to-hf of a run directory take its newest valid checkpoint, naming the damaged
    one; a damaged step directory given by name is refused."""
    from tessera.cli import main

    run_ranks(1, train_each, [tiny_config(run_copy, byte_shards, **{"train.steps": 3})])
    newest, valid = (run_copy / "checkpoints" / f"step-0000000{step}" for step in (3, 2))
    flip_byte(largest_file(newest))
    capsys.readouterr()
    for command in (["generate", str(run_copy), "--prompt", "hi", "--max-new-tokens", "2"],
                    ["convert", "to-hf", str(run_copy), str(tmp_path / "hf")]):
        assert main(command) == 0
        err = capsys.readouterr().err
        assert f"{newest} is not valid: " in err, err
        assert f"loading {valid}, the newest valid checkpoint" in err, err
    assert main(["generate", str(newest), "--prompt", "hi"]) == 2
    assert f"{newest} is not a valid checkpoint: " in capsys.readouterr().err


def test_manifest_entries_outside_the_checkpoint_are_refused_at_once(run_copy):
    """`../../../../etc/hostname` listed as a checkpoint file, and `../../dev/zero` with 0 bytes
    (hashing it would never end): both refused by name, before anything is opened."""
    step_dir = run_copy / "checkpoints" / "step-00000002"
    manifest = json.loads((step_dir / checkpoint.MANIFEST_FILE).read_text())
    for name in ("../../../../etc/hostname", "../../dev/zero", "/etc/passwd"):
        hostile = {**manifest, "files": {**manifest["files"],
                                         name: {"bytes": 0, "sha256": "0" * 64}}}
        (step_dir / checkpoint.MANIFEST_FILE).write_text(json.dumps(hostile))
        info = checkpoint.inspect(step_dir)
        assert not info.valid and f"file entry {name!r} is not a plain relative path" in \
            info.reason
    command = [sys.executable, "-m", "tessera", "checkpoint", "inspect", str(step_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)  # no hang
    assert done.returncode == 1 and "not a plain relative path" in done.stdout + done.stderr


def test_a_listed_file_that_is_a_link_to_a_device_is_refused_quickly(run_copy):
    step_dir = run_copy / "checkpoints" / "step-00000002"
    (step_dir / "rng" / "rank-00001.pt").symlink_to("/dev/zero")
    resign(step_dir)  # the link is followed to size 0: the manifest says 0 bytes
    manifest = json.loads((step_dir / checkpoint.MANIFEST_FILE).read_text())
    manifest["files"]["rng/rank-00001.pt"] = {"bytes": 0, "sha256": hashlib.sha256().hexdigest()}
    (step_dir / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))
    command = [sys.executable, "-m", "tessera", "checkpoint", "inspect", str(step_dir)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 120
    assert done.returncode == 1
    assert "rank-00001.pt: not a regular file" in done.stdout + done.stderr


def test_retention_never_deletes_through_a_linked_step_directory(tmp_path, trained):
    """A step directory of this run that is a link to another run's checkpoint: not a
    candidate for resume or retention, never deleted through; the other run stays valid."""
    other_step = trained / "checkpoints" / "step-00000002"
    manifest_before = (other_step / checkpoint.MANIFEST_FILE).read_bytes()
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step-00000001").symlink_to(other_step)
    (root / "step-00000005").mkdir()
    (root / "step-00000005" / checkpoint.MANIFEST_FILE).write_text("{}")
    assert checkpoint.committed_steps(root) == [5]
    checkpoint.apply_retention(root, keep_last=1)
    checkpoint.remove_uncommitted(root)
    checkpoint.delete_checkpoint(root / "step-00000001")  # even when asked directly
    assert (root / "step-00000001").is_symlink()
    assert (other_step / checkpoint.MANIFEST_FILE).read_bytes() == manifest_before
    assert checkpoint.problems(other_step) == []


HOLD_LOCK = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": "n2", "pid": 4242, "slurm_job_id": "77",
                         "since": "2026-01-01T00:00:00"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_lock_left_by_this_slurm_jobs_dead_instance_does_not_block_its_requeue(
        tmp_path, monkeypatch):
    """A lock the file system still holds for a job on a host that died (here: another
    process holds it, under Slurm job 77 on n2). The requeued job 77 takes over; any other
    job is refused with the holder named."""
    from tessera.trainer.run_dir import LOCK_FILE, RunLock

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for job in ("78", None):
            if job is None:
                monkeypatch.delenv("SLURM_JOB_ID", raising=False)
            else:
                monkeypatch.setenv("SLURM_JOB_ID", job)
            with pytest.raises(ConfigError, match="in use by another tessera train \\(host n2, "
                                                  "pid 4242, Slurm job 77"):
                RunLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        lock = RunLock(tmp_path)
        lock.acquire()  # the requeue of job 77
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()


def test_ranks_started_by_another_launcher_refuse_a_locked_run_dir(tmp_path, byte_shards):
    """torchrun or srun start the ranks themselves: rank 0 finds the lock taken and every rank
    stops with its message (none waits in a collective)."""
    from tessera.trainer.run_dir import LOCK_FILE

    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run" / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = tiny_config(tmp_path / "run", byte_shards, **{"train.steps": 2})
        with pytest.raises(AssertionError, match="in use by another tessera train"):
            run_ranks(2, train_each, [cfg], timeout_s=120)
    finally:
        holder.kill()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_two_trainers_on_one_run_directory(tmp_path, byte_shards):
    """Two `tessera train` of 2 ranks each on one run.dir: the second is refused in one line
    naming the first's host and pid; the first finishes and its metrics read 1, 2, 3, ..."""
    args = [f"{k}={v}" for k, v in {
        "run.dir": tmp_path / "run", "data.shards": byte_shards, "data.streams": 2,
        "model.seq_len": 32, "train.global_batch_size": 8, "train.micro_batch_size": 2,
        "train.steps": 4, "checkpoint.interval": 1, "launch.nproc_per_node": 2,
    }.items()]
    # a fresh launch (not the rendezvous an in-process test of this session left in os.environ)
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env[checkpoint.DELAY_ENV] = "0.5"  # slow saves: the first job lasts
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "tessera", "train", *args], env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not metrics.is_file():
            assert first.poll() is None, first_log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "tessera", "train", *args], env=env,
                                capture_output=True, text=True, timeout=300)
        assert first.wait(timeout=300) == 0, first_log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "is in use by another tessera train (host " in errors[0]
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_a_refused_resume_leaves_the_config_as_it_was(run_copy, byte_shards, capsys):
    from tessera.cli import main

    before = (run_copy / "config.yaml").read_bytes()
    args = [f"{k}={v}" for k, v in {
        "run.dir": run_copy, "data.shards": byte_shards, "data.streams": 2, "model.seq_len": 32,
        "model.hidden_size": 32, "train.global_batch_size": 8, "train.micro_batch_size": 2,
        "train.steps": 4}.items()]
    assert main(["train", *args]) == 2
    assert "was saved for another model" in capsys.readouterr().err
    assert (run_copy / "config.yaml").read_bytes() == before


def test_an_unusable_run_dir_is_one_line_before_anything_starts(tmp_path, byte_shards, capsys):
    from tessera.cli import main

    (tmp_path / "a-file").write_text("not a directory")
    started = time.monotonic()
    assert main(["train", f"run.dir={tmp_path / 'a-file'}", f"data.shards={byte_shards}",
                 "launch.nproc_per_node=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tessera train: error: config key 'run.dir': {tmp_path / 'a-file'} exists "
                   f"and is not a directory")
    assert time.monotonic() - started < 10


def test_generate_refuses_a_temperature_that_is_not_a_number(run_copy, capsys):
    from tessera.cli import main

    assert main(["generate", str(run_copy), "--prompt", "x", "--temperature", "nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tessera generate: error: --temperature must be a number >= 0, got nan"


def test_generate_refuses_a_seed_torch_cannot_take(run_copy, capsys):
    from tessera.cli import main

    assert main(["generate", str(run_copy), "--prompt", "x", "--seed", str(2**70)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tessera generate: error: --seed must lie in [0, 2**64), got {2**70}"


def train_args(run_dir: Path, shards: Path, **overrides) -> list[str]:
    """`tessera train` arguments of the `trained` fixture's config, with overrides."""
    keys = {"run.dir": run_dir, "run.seed": 3, "data.shards": shards, "data.streams": 2,
            "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
            "model.num_kv_heads": 2, "model.ffn_hidden_size": 176, "model.seq_len": 32,
            "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.lr": 3e-3,
            "train.min_lr": 3e-4, "train.warmup_steps": 2, "train.steps": 2,
            "checkpoint.interval": 0, **overrides}
    return [f"{k}={v}" for k, v in keys.items()]


def tampered_state(step_dir: Path, state: object) -> None:
    (step_dir / checkpoint.STATE_FILE).write_text(json.dumps(state))
    resign(step_dir)


def tampered_model_states(step_dir: Path, change: str) -> None:
    """The model file of rank 0 changed as `change` says, and the manifest re-signed."""
    import torch

    path = step_dir / "mp_rank_00_model_states.pt"
    states = torch.load(path, weights_only=True)
    if change == "no module":
        del states["module"]
    elif change == "other optimizer state":
        states["optimizer"] = {"state": {}, "param_groups": []}
    elif change == "missing tensor":
        del states["module"]["embedding.embed.weight"]
    else:
        states["module"]["embedding.embed.weight"] = torch.zeros(3, 3)
    torch.save(states, path)
    resign(step_dir)


@pytest.mark.parametrize("change, words", [
    ("no module", "no entry 'module' in a file"),
    ("other optimizer state", "loaded state dict has a different number of parameter groups"),
    ("missing tensor", 'Missing key(s) in state_dict: "embedding.embed.weight".'),
    ("other shape", "size mismatch for embedding.embed.weight: copying a param with shape "
                    "torch.Size([3, 3]) from checkpoint"),
])
def test_model_files_that_do_not_fit_the_model_stop_the_resume_in_one_line(
        run_copy, byte_shards, capsys, change, words):
    """Files a re-signed manifest vouches for but not of this model: one line naming the
    checkpoint and the tensor, not DeepSpeed's traceback; the checkpoint stays."""
    from tessera.cli import main

    step_dir = run_copy / "checkpoints" / "step-00000002"
    tampered_model_states(step_dir, change)
    assert main(["train", *train_args(run_copy, byte_shards, **{"train.steps": 3})]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tessera train: error: {step_dir}: its files do not load into the "
                          f"model: "), err
    assert words in err and len(err.splitlines()) == 1, err
    assert checkpoint.committed_steps(run_copy / "checkpoints") == [2]


@pytest.mark.parametrize("state, words", [
    ({}, "'train' is not an object"),
    ({"train": {"step": "2"}, "data": {}}, "train.step is not a count: '2'"),
    ({"train": {"step": 2, "epoch": 1}, "data": {}}, "'train' has an unknown field 'epoch'"),
    ({"train": {"step": 10**20}, "data": {}}, "train.step 100000000000000000000 is not the "
                                              "manifest's step 2"),
])
def test_a_state_file_that_is_not_a_training_state_stops_the_resume_and_keeps_it(
        run_copy, byte_shards, capsys, state, words):
    """A re-signed state file without a usable "train" used to read as a weights-only load: the
    run trained from step 0 and its first save deleted the checkpoint."""
    from tessera.cli import main

    step_dir = run_copy / "checkpoints" / "step-00000002"
    tampered_state(step_dir, state)
    manifest = (step_dir / checkpoint.MANIFEST_FILE).read_bytes()
    assert main(["train", *train_args(run_copy, byte_shards, **{"train.steps": 3})]) == 2
    err = capsys.readouterr().err
    assert f"{step_dir / checkpoint.STATE_FILE}: {words}" in err, err
    assert (step_dir / checkpoint.MANIFEST_FILE).read_bytes() == manifest
    assert checkpoint.committed_steps(run_copy / "checkpoints") == [2]


@pytest.mark.parametrize("damage, words", [
    ("no manifest", "latest names step-00000002; step-00000002 has no manifest.json"),
    ("linked", "latest names step-00000002; step-00000002 is a link"),
])
def test_checkpoints_none_of_which_is_committed_stop_the_resume_and_stay(
        run_copy, byte_shards, tmp_path, capsys, damage, words):
    """Checkpoints resume does not take (manifests lost in a copy, step directories moved to
    another disk and linked back) used to read as a fresh run, which deleted them at its first
    save."""
    from tessera.cli import main

    root = run_copy / "checkpoints"
    step_dir = root / "step-00000002"
    if damage == "no manifest":
        (step_dir / checkpoint.MANIFEST_FILE).unlink()
    else:
        step_dir.rename(tmp_path / "elsewhere")
        step_dir.symlink_to(tmp_path / "elsewhere")
    files_before = sorted(p.name for p in step_dir.iterdir())
    assert main(["train", *train_args(run_copy, byte_shards, **{"train.steps": 3})]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tessera train: error: {root} holds checkpoints but none committed ({words}): "
                   f"nothing was loaded or deleted; restore them, train in another run.dir, or "
                   f"remove them to start afresh")
    assert sorted(p.name for p in step_dir.iterdir()) == files_before


@pytest.mark.parametrize("edit, words", [
    ({"layout": "x"}, "'layout' is not an object"),
    ({"layout": {"world_size": 1, "pp": 1, "dp": 1, "zero_stage": 0}},
     "layout.tp is not a count of ranks: None"),
    ({"layout": {"world_size": 10**12, "tp": 1, "pp": 1, "dp": 10**12, "zero_stage": 1}},
     "layout: 1000000000000 ranks, but the manifest lists"),
    ({"layout": {"world_size": 2, "tp": 1, "pp": 1, "dp": 2, "zero_stage": 0}},
     "lists no rng/rank-00001.pt: rank 1 of 2 saved nothing"),
    ({"layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "zero_stage": 4}},
     "layout.zero_stage is not 0-3: 4"),
    ({"model": [1]}, "'model' is not an object"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line_for_every_command(run_copy, tmp_path, capsys,
                                                                     edit, words):
    from tessera.cli import main

    step_dir = run_copy / "checkpoints" / "step-00000002"
    path = step_dir / checkpoint.MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    for command, code in ((["convert", "to-hf", str(step_dir), str(tmp_path / "hf")], 2),
                          (["checkpoint", "inspect", str(step_dir)], 1)):  # 1: invalid
        assert main(command) == code, command
        out = capsys.readouterr()
        assert f"{path}: {words}" in out.out + out.err, command
        assert "Traceback" not in out.err


def test_a_run_directory_with_glob_characters_in_its_name_converts(tmp_path, byte_shards):
    """ZeRO's optimizer partitions are found from the manifest, not by a glob of the path."""
    from tessera.trainer.convert import convert_command

    run_dir = tmp_path / "run[z1]"
    run_ranks(1, train_each, [tiny_config(run_dir, byte_shards, **{
        "train.steps": 1, "parallel.zero_stage": 1})])
    assert convert_command(["to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
