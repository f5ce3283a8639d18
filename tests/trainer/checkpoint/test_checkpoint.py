"""Checkpoints on real DeepSpeed engines (gloo, CPU): bitwise resume in every layout, corrupt
files refused with a fallback, another model or layout refused with what differs, load_from,
asynchronous saves, safe loading, retention, and the `tessera checkpoint` command.

Bitwise resume: a run of 10 steps saves at step 5 and 10; a fresh engine started from its step-5
checkpoint (copied into a new run directory, as if the run had been killed there) trains 6-10
and must log the same losses and end with every model, optimizer and RNG tensor equal. (A first
half run with train.steps=5 would not do: train.steps shapes the learning-rate schedule.)

Distributed runs are grouped: one spawned 2-rank group trains every layout, another runs every
damage scenario (process start-up dominates on small machines). Kills are in
test_checkpoint_faults.py."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import time
import traceback
from pathlib import Path

import pytest
from checkpoints import assert_same_checkpoint, flip_byte, largest_file, truncate
from multiproc import run_ranks
from training import losses, read_metrics, tiny_config

from tessera.cli import main as cli_main
from tessera.trainer import checkpoint
from tessera.trainer.checkpoint import CheckpointError

PIPELINE_SUPPORTED = importlib.util.find_spec("tessera.parallel.pipeline") is not None

# name -> (layout overrides, saves asynchronous)
LAYOUTS = {
    "dp2-zero1": ({"parallel.zero_stage": 1}, False),
    "dp2-zero3": ({"parallel.zero_stage": 3}, True),
    "tp2": ({"parallel.tp": 2}, False),
    "pp2": ({"parallel.pp": 2}, True),
}
HALF = 5


# ---------------------------------------------------------------------------------------------
# Bitwise resume: 10 steps straight against 5 + restart + 5


def straight_then_restart(pairs: list) -> list:
    """Rank body: per (straight, resumed) config pair, train `straight` for 10 steps (saving at
    step 5 and 10); give `resumed` that run's step-5 checkpoint, as if it had stopped there, and
    let a fresh engine resume it to step 10. Rank 0 returns both runs' metrics rows and the
    weights_only argument of every torch.load the resume made."""
    import torch.distributed as dist

    from tessera.trainer.train import train

    out = []
    for straight, resumed in pairs:
        train(straight)
        if dist.get_rank() == 0:
            source = Path(straight.run.dir) / "checkpoints" / checkpoint.tag_for(HALF)
            root = Path(resumed.run.dir) / "checkpoints"
            shutil.copytree(source, root / source.name)
            checkpoint.replace_text_atomically(root / checkpoint.LATEST_FILE, source.name)
        dist.barrier()
        with _recording_torch_load() as calls:
            train(resumed)
        if dist.get_rank() == 0:
            out.append((read_metrics(straight.run.dir), read_metrics(resumed.run.dir), calls))
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, byte_shards) -> dict:
    base = tmp_path_factory.mktemp("layouts")
    names = [n for n in LAYOUTS if n != "pp2" or PIPELINE_SUPPORTED]
    pairs = []
    for name in names:
        layout, async_save = LAYOUTS[name]
        common = {**layout, "checkpoint.async": async_save, "train.steps": 10}
        pairs.append(
            (
                tiny_config(
                    base / name / "straight", byte_shards, **common, **{"checkpoint.interval": HALF}
                ),
                tiny_config(base / name / "resumed", byte_shards, **common),
            )
        )
    runs = run_ranks(2, straight_then_restart, pairs)[0]
    return {name: (base / name, *rows) for name, rows in zip(names, runs)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bitwise(layout, layout_runs):
    if layout == "pp2" and not PIPELINE_SUPPORTED:
        pytest.skip("parallel.pp > 1 is not supported yet (no tessera.parallel.pipeline)")
    run_dir, straight, resumed, torch_loads = layout_runs[layout]
    assert torch_loads and all(weights_only is True for weights_only in torch_loads)
    assert [r["step"] for r in straight] == list(range(1, 11))
    assert [r["step"] for r in resumed] == list(range(HALF + 1, 11))  # a fresh engine from step 5
    assert losses(resumed) == losses(straight[HALF:])
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight[HALF:]]
    final = checkpoint.tag_for(10)
    compared = assert_same_checkpoint(
        run_dir / "straight" / "checkpoints" / final, run_dir / "resumed" / "checkpoints" / final
    )
    assert compared > 20  # model, optimizer moments, fp32 partitions, RNG states
    # only what Tessera reads: no copy of DeepSpeed's zero_to_fp32.py beside ZeRO checkpoints
    assert not list((run_dir / "straight" / "checkpoints").glob("*.py"))


# ---------------------------------------------------------------------------------------------
# Damage, mismatches, load_from, async ordering: one 2-rank group runs every scenario


def _quietly(fn) -> tuple[object, str]:
    """Run fn with stderr captured: (its result or the CheckpointError it raised, the text)."""
    text = io.StringIO()
    with contextlib.redirect_stderr(text):
        try:
            result = fn()
        except CheckpointError as e:
            result = e
    return result, text.getvalue()


def _barrier_after(fn) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def _first_step(run_dir: Path, previous_rows: int) -> int:
    return read_metrics(run_dir)[previous_rows]["step"]


def scenario_corrupt_files(base: Path, shards: Path) -> dict:
    from tessera.trainer.train import train

    run = base / "damaged"
    root = run / "checkpoints"

    def cfg(steps: int):  # one run of 6 steps, stopped after `steps` (its schedule unchanged)
        return tiny_config(
            run,
            shards,
            **{"train.steps": 6, "train.stop_at": steps, "checkpoint.interval": 1,
               "checkpoint.keep_last": 5},
        )

    train(cfg(3))  # steps 1, 2, 3 committed
    flipped = largest_file(root / "step-00000003")
    _barrier_after(lambda: flip_byte(flipped))
    rows = len(read_metrics(run))
    _, flip_text = _quietly(lambda: train(cfg(4)))
    after_flip = _first_step(run, rows)

    truncated = largest_file(root / "step-00000004")
    _barrier_after(lambda: truncate(truncated))
    rows = len(read_metrics(run))
    _, truncate_text = _quietly(lambda: train(cfg(5)))
    after_truncate = _first_step(run, rows)

    def damage_all():
        for step in checkpoint.committed_steps(root):
            flip_byte(largest_file(root / checkpoint.tag_for(step)))

    _barrier_after(damage_all)
    none_valid, _ = _quietly(lambda: train(cfg(6)))
    return {
        "flipped": str(flipped),
        "flip_text": flip_text,
        "after_flip": after_flip,
        "truncated": str(truncated),
        "truncate_text": truncate_text,
        "after_truncate": after_truncate,
        "none_valid": str(none_valid),
    }


def scenario_other_model_and_layout(base: Path, shards: Path) -> dict:
    from tessera.trainer.train import train

    source = base / "source"
    train(tiny_config(source, shards, **{"train.steps": 2}))
    wider = tiny_config(
        base / "wider", shards, **{"model.hidden_size": 32, "checkpoint.load_from": str(source)}
    )
    other_model, _ = _quietly(lambda: train(wider))
    other_layout, _ = _quietly(
        lambda: train(
            tiny_config(
                base / "tp2", shards, **{"parallel.tp": 2, "checkpoint.load_from": str(source)}
            )
        )
    )
    other_tokenizer, _ = _quietly(lambda: _carrying_another_tokenizer(
        lambda: train(tiny_config(base / "bpe", shards, **{"checkpoint.load_from": str(source)}))
    ))
    corrupt_dir = source / "checkpoints" / "step-00000002"
    corrupt_file = largest_file(corrupt_dir)
    _barrier_after(lambda: flip_byte(corrupt_file, 0.25))
    corrupt, _ = _quietly(
        lambda: train(
            tiny_config(base / "from-corrupt", shards, **{"checkpoint.load_from": str(corrupt_dir)})
        )
    )
    unverified, _ = _quietly(
        lambda: train(
            tiny_config(
                base / "unverified",
                shards,
                **{
                    "checkpoint.load_from": str(corrupt_dir),
                    "checkpoint.verify": False,
                    "train.steps": 3,
                },
            )
        )
    )
    return {
        "other_model": str(other_model),
        "other_layout": str(other_layout),
        "other_tokenizer": str(other_tokenizer),
        "other_tokenizer_config_written": (base / "bpe" / "config.yaml").exists(),
        "corrupt": str(corrupt),
        "corrupt_file": str(corrupt_file),
        "unverified": str(unverified),
    }


def _carrying_another_tokenizer(fn):
    """fn() while load_from's checkpoint seems to carry a BPE tokenizer (the data is bytes);
    reading its weights fails the scenario."""
    from unittest import mock

    from tessera.data.tokenizer import train_bpe

    load_module = importlib.import_module("tessera.trainer.checkpoint.load")
    bpe = train_bpe(["the model reads tokens from shards", "the quick brown fox"] * 20, 270)

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    carried = (bpe.info(), bpe.to_str())
    with (mock.patch.object(load_module, "carried_tokenizer", lambda directory: carried),
          mock.patch.object(load_module, "load", no_load)):
        return fn()


def _engine(cfg):
    """Init (inside the running process group), build the training engine, install ours."""
    from tessera.data.format import read_manifest
    from tessera.parallel.topology import init_distributed
    from tessera.trainer.train import build_training_engine

    cfg.model.vocab_size = read_manifest(cfg.data.shards).tokenizer.vocab_size
    topo = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.launch.backend)
    engine, _, _ = build_training_engine(cfg, topo)
    checkpoint.install(engine, cfg)
    return engine


def _module_tensors(engine) -> dict:
    """Whole tensors (gathered under ZeRO-3)."""
    import deepspeed
    import torch

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {
            k: v.detach().clone()
            for k, v in engine.module.state_dict().items()
            if isinstance(v, torch.Tensor)
        }


@contextlib.contextmanager
def _recording_torch_load():
    """Record the weights_only argument of every torch.load call made inside (DeepSpeed's too)."""
    import torch

    calls = []
    original = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    torch.load = recording
    try:
        yield calls
    finally:
        torch.load = original


def scenario_load_from(base: Path, shards: Path) -> dict:
    """load_from: full state (step, optimizer and data continue) and weights only (fresh)."""
    import torch
    import torch.distributed as dist

    from tessera.parallel.topology import destroy_distributed
    from tessera.trainer.train import train

    source = base / "load-source"
    train(tiny_config(source, shards, **{"train.steps": 3, "parallel.zero_stage": 1}))
    source_dir = source / "checkpoints" / "step-00000003"
    out = {}
    for mode, zero_stage in (
        ("weights-zero1", 1),
        ("weights-zero0", 0),
        ("weights-zero3", 3),
        ("full", 1),
    ):
        cfg = tiny_config(
            base / mode,
            shards,
            **{
                "checkpoint.load_from": str(source),
                "parallel.zero_stage": zero_stage,
                "checkpoint.load_weights_only": mode.startswith("weights"),
                "train.steps": 3,
            },
        )
        engine = _engine(cfg)
        fresh = _module_tensors(engine)
        with _recording_torch_load() as calls:
            saved = checkpoint.resume(engine, cfg.run.dir + "/checkpoints", cfg)
        loaded = _module_tensors(engine)
        expected = checkpoint.safe_load(source_dir / "mp_rank_00_model_states.pt")["module"]
        out[mode] = {
            "saved_keys": sorted(saved),
            "equal_source": all(torch.equal(loaded[k], expected[k]) for k in loaded),
            "differs_from_fresh": any(not torch.equal(loaded[k], fresh[k]) for k in loaded),
            "step": saved.get("train", {}).get("step"),
            "torch_load_calls": len(calls),
            "unsafe_torch_loads": [c for c in calls if c is not True],
        }
        destroy_distributed(process_group_too=False)
        dist.barrier()
    return out


def scenario_async_order(base: Path, shards: Path) -> dict:
    """A second asynchronous save waits for the first; the commit comes when writing ends."""
    import os

    import torch.distributed as dist

    from tessera.parallel.topology import destroy_distributed

    cfg = tiny_config(base / "async", shards, **{"checkpoint.async": True})
    root = base / "async" / "checkpoints"
    engine = _engine(cfg)
    os.environ[checkpoint.DELAY_ENV] = "0.15"  # each file and commit phase takes 0.15 s longer
    try:
        started = time.perf_counter()
        checkpoint.save(engine, root, 1, {"train": {"step": 1}}, cfg)
        first_return_s = time.perf_counter() - started
        committed_after_first = checkpoint.committed_steps(root)
        checkpoint.save(engine, root, 2, {"train": {"step": 2}}, cfg)
        committed_after_second = checkpoint.committed_steps(root)
        latest_after_second = checkpoint.read_latest(root)
        started = time.perf_counter()
        checkpoint.wait(engine)
        wait_s = time.perf_counter() - started
    finally:
        del os.environ[checkpoint.DELAY_ENV]
    out = {
        "first_return_s": first_return_s,
        "wait_s": wait_s,
        "committed_after_first": committed_after_first,
        "committed_after_second": committed_after_second,
        "latest_after_second": latest_after_second,
        "committed_at_end": checkpoint.committed_steps(root),
        "latest_at_end": checkpoint.read_latest(root),
        "problems": checkpoint.problems(root / "step-00000002"),
    }
    destroy_distributed(process_group_too=False)
    dist.barrier()
    return out


def scenario_async_write_failure(base: Path, shards: Path) -> dict:
    """A write that fails on rank 1 in the background: no commit, and rank 0 raises too."""
    import torch.distributed as dist

    from tessera.parallel.topology import destroy_distributed

    cfg = tiny_config(base / "async-fail", shards, **{"checkpoint.async": True})
    root = base / "async-fail" / "checkpoints"
    engine = _engine(cfg)
    from tessera.trainer.checkpoint import engine as checkpoint_engine  # where files are written

    original = checkpoint_engine.write_torch_file

    def disk_full(obj, path):
        raise OSError(28, "No space left on device", str(path))

    if dist.get_rank() == 1:
        checkpoint_engine.write_torch_file = disk_full
    try:
        checkpoint.save(engine, root, 1, {"train": {"step": 1}}, cfg)
        error, _ = _quietly(lambda: checkpoint.wait(engine))
    finally:
        checkpoint_engine.write_torch_file = original
    out = {"error": str(error), "committed": checkpoint.committed_steps(root)}
    destroy_distributed(process_group_too=False)
    dist.barrier()
    return out


SCENARIOS = [
    scenario_async_write_failure,
    scenario_corrupt_files,
    scenario_other_model_and_layout,
    scenario_load_from,
    scenario_async_order,
]


def run_scenarios(base: Path, shards: Path) -> dict:
    """Rank body: every scenario in turn; rank 0 returns each one's result or traceback."""
    import torch.distributed as dist

    results = {}
    for scenario in SCENARIOS:
        try:
            results[scenario.__name__] = ("ok", scenario(base, shards))
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            results[scenario.__name__] = ("error", traceback.format_exc())
    return results if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, byte_shards) -> dict:
    base = tmp_path_factory.mktemp("scenarios")
    return run_ranks(2, run_scenarios, base, byte_shards)[0]


def result_of(scenarios: dict, name: str) -> dict:
    status, value = scenarios[name]
    assert status == "ok", value
    return value


def test_corrupt_file_is_refused_and_the_previous_checkpoint_loaded(scenarios):
    r = result_of(scenarios, "scenario_corrupt_files")
    # a flipped byte in step 3: named, and the run resumes from step 2 (trains 3 and 4 again)
    assert r["flipped"] in r["flip_text"] and "sha256" in r["flip_text"]
    assert "step-00000002" in r["flip_text"] and r["after_flip"] == 3
    # a truncated file in step 4: named with its sizes, resume from step 3 (saved again, valid)
    assert r["truncated"] in r["truncate_text"] and "truncated" in r["truncate_text"]
    assert r["after_truncate"] == 4
    # nothing valid left: a clear error, not a silent fresh start
    assert r["none_valid"].startswith("no valid checkpoint to load:")
    assert "step-00000005" in r["none_valid"] and "sha256" in r["none_valid"]
    assert r["none_valid"].endswith("; and 2 older ones")


def test_another_model_or_layout_says_what_differs(scenarios):
    r = result_of(scenarios, "scenario_other_model_and_layout")
    assert (
        "was saved for another model: model.hidden_size: checkpoint 64, config 32; set the model "
        "keys as its config.yaml has them"
        in r["other_model"]
    )
    assert "parallel.tp: checkpoint 1, now 2" in r["other_layout"]
    assert "tessera convert reshard" in r["other_layout"]
    # data prepared with another tokenizer: refused before a weight is read or a file written
    assert "was trained with another tokenizer than the one data.shards was prepared with (hf, " \
        "vocabulary 270" in r["other_tokenizer"]
    assert not r["other_tokenizer_config_written"]
    assert r["corrupt_file"] in r["corrupt"] and "checkpoint.load_from" in r["corrupt"]
    # verify=false skips the checksums: the flipped byte reaches torch.load, or loads unnoticed
    assert "sha256" not in r["unverified"]


def test_load_from_full_state_and_weights_only(scenarios):
    r = result_of(scenarios, "scenario_load_from")
    for mode in ("weights-zero1", "weights-zero0", "weights-zero3"):  # from a ZeRO-1 source
        assert r[mode]["equal_source"] and r[mode]["differs_from_fresh"], mode
        assert r[mode]["saved_keys"] == ["directory"], mode  # step, optimizer, data start fresh
    assert r["full"]["equal_source"] and r["full"]["step"] == 3
    assert r["full"]["saved_keys"] == ["data", "directory", "layout", "train"]
    for mode, result in r.items():  # every load, DeepSpeed's included, unpickles safely
        assert result["torch_load_calls"] > 0 and result["unsafe_torch_loads"] == [], mode


def test_second_async_save_waits_for_the_first(scenarios):
    r = result_of(scenarios, "scenario_async_order")
    assert r["committed_after_first"] == []  # returned after the host copy, before the writes
    assert r["committed_after_second"] == [1] and r["latest_after_second"] == "step-00000001"
    assert r["committed_at_end"] == [1, 2] and r["latest_at_end"] == "step-00000002"
    assert r["problems"] == []
    assert r["wait_s"] > 0.3  # the second save's files were still being written


def test_failed_background_write_reaches_every_rank(scenarios):
    r = result_of(scenarios, "scenario_async_write_failure")
    assert r["error"].startswith("saving ") and "rank 1: OSError" in r["error"], r["error"]
    assert "No space left on device" in r["error"] and r["committed"] == []


# ---------------------------------------------------------------------------------------------
# Retention and the command line (no processes)


def fake_checkpoint(root: Path, step: int) -> Path:
    directory = root / checkpoint.tag_for(step)
    (directory / "rng").mkdir(parents=True)
    (directory / "weights.pt").write_bytes(b"x" * step)
    (directory / "rng" / "rank-00000.pt").write_bytes(b"r")
    (directory / checkpoint.STATE_FILE).write_text(json.dumps({"train": {"step": step}}))
    manifest = {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "step": step,
        "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "zero_stage": 0},
        "files": {
            name: {"bytes": (directory / name).stat().st_size,
                   "sha256": checkpoint.file_sha256(directory / name)}
            for name in ("weights.pt", "rng/rank-00000.pt", checkpoint.STATE_FILE)
        },
    }
    (directory / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


def test_checkpoint_commands_say_what_a_path_is_when_it_is_no_checkpoint(tmp_path, capsys):
    """A file (the `latest` pointer) is not "missing", and a step directory or prepared data
    does not list as "0 checkpoints"."""
    root = tmp_path / "run" / "checkpoints"
    step_dir = fake_checkpoint(root, 2)
    checkpoint.replace_text_atomically(root / checkpoint.LATEST_FILE, step_dir.name + "\n")
    data = tmp_path / "data"  # what `tessera prepare` writes
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    (data / "shard-000000.tar").write_bytes(b"")
    for argv, words in [
        (["inspect", root / "latest"], f"{root / 'latest'} is a file, not a checkpoint "
         f"directory: the pointer to the newest checkpoint, step 2 ({step_dir})"),
        (["inspect", data / "manifest.json"], f"{data / 'manifest.json'} is a file, not a "
         f"checkpoint directory"),
        (["list", step_dir], f"{step_dir} is a checkpoint; use tessera checkpoint inspect "
         f"{step_dir}"),
        (["list", data], f"{data} is not a run directory: it has no checkpoints/ and no step-N "
         f"directories"),
    ]:
        assert cli_main(["checkpoint", argv[0], str(argv[1])]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tessera checkpoint {argv[0]}: error: {words}"), err
    assert cli_main(["checkpoint", "list", str(tmp_path / "run")]) == 0
    assert "1 checkpoint, latest -> step-00000002" in capsys.readouterr().out
    fresh = tmp_path / "fresh"  # a run that has not saved yet
    fresh.mkdir()
    (fresh / "config.yaml").write_text("")
    assert cli_main(["checkpoint", "list", str(fresh)]) == 0
    assert "0 checkpoints, latest -> none" in capsys.readouterr().out


def test_retention_keeps_last_and_every(tmp_path):
    for step in range(1, 13):
        fake_checkpoint(tmp_path, step)
    checkpoint.replace_text_atomically(tmp_path / checkpoint.LATEST_FILE, checkpoint.tag_for(12))
    deleted = checkpoint.apply_retention(tmp_path, keep_last=3, keep_every=5)
    assert checkpoint.committed_steps(tmp_path) == [5, 10, 11, 12]
    assert deleted == [1, 2, 3, 4, 6, 7, 8, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step-00000005",
        "step-00000010",
        "step-00000011",
        "step-00000012",
    ]


def test_directories_without_a_valid_manifest_are_never_candidates(tmp_path):
    fake_checkpoint(tmp_path, 1)
    (tmp_path / "step-00000002.tmp").mkdir()  # a save cut short
    half_deleted = fake_checkpoint(tmp_path, 3)
    (half_deleted / checkpoint.MANIFEST_FILE).unlink()  # retention cut short
    checkpoint.replace_text_atomically(tmp_path / checkpoint.LATEST_FILE, "step-00000003")
    assert checkpoint.latest_tag(tmp_path) == "step-00000001"
    checkpoint.remove_uncommitted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def test_a_step_directory_that_is_gone_is_named_with_the_steps_there_are(tmp_path):
    for step in (300, 400):
        fake_checkpoint(tmp_path, step)
    gone = tmp_path / "step-00000200"  # deleted by retention
    with pytest.raises(CheckpointError, match=f"{gone} does not exist; {tmp_path} holds steps "
                       "300, 400"):
        checkpoint.resolve_step_dir(gone)
    assert checkpoint.resolve_step_dir(tmp_path / "step-00000300") == tmp_path / "step-00000300"


def test_a_resume_by_more_ranks_says_whose_rng_streams_restart(tmp_path):
    from tessera.trainer.checkpoint.load import restarted_rng_note

    assert restarted_rng_note(tmp_path, 1, 2) == (
        f"{tmp_path} was saved by 1 ranks, this run has 2: the RNG streams of ranks 1 and up "
        f"restart from the seed")
    assert restarted_rng_note(tmp_path, 2, 2) is None
    assert restarted_rng_note(tmp_path, 4, 2) is None  # each of the 2 restores its own


def test_manifest_problems_name_the_file(tmp_path):
    directory = fake_checkpoint(tmp_path, 7)
    assert checkpoint.problems(directory) == []
    (directory / "weights.pt").write_bytes(b"y" * 7)
    assert checkpoint.problems(directory) == [
        f"{directory / 'weights.pt'}: sha256 does not match the manifest (the file is corrupt)"
    ]
    assert checkpoint.problems(directory, checksum=False) == []
    (directory / "extra.pt").write_bytes(b"z")
    assert checkpoint.problems(directory, checksum=False) == [
        f"{directory / 'extra.pt'}: not listed in the manifest"
    ]
    (directory / checkpoint.MANIFEST_FILE).write_text("{not json")
    assert "manifest.json: unreadable" in checkpoint.problems(directory)[0]


def test_checkpoint_command_lists_and_inspects(layout_runs, capsys, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(layout_runs["tp2"][0] / "resumed", run_dir)
    step_dir = run_dir / "checkpoints" / "step-00000010"
    assert cli_main(["checkpoint", "list", str(run_dir)]) == 0
    listing = capsys.readouterr().out
    assert "step-00000005" in listing and "step-00000010" in listing and "latest" in listing
    assert "tp=2" in listing and "valid" in listing
    assert cli_main(["checkpoint", "inspect", str(step_dir)]) == 0
    report = capsys.readouterr().out
    assert "step 10" in report and "valid" in report and "mp_rank_01_model_states.pt" in report
    loss = read_metrics(run_dir)[-1]["loss"]  # the step, its loss and what it had seen
    assert f"training: step 10, loss {loss:.4f}, 80 sequences (2.6k tokens) seen" in report
    flip_byte(step_dir / "mp_rank_01_model_states.pt")
    assert cli_main(["checkpoint", "inspect", str(step_dir)]) == 1
    assert "INVALID" in capsys.readouterr().out
    assert cli_main(["checkpoint", "inspect", str(run_dir / "nope")]) == 2
    assert f"{run_dir / 'nope'} does not exist" in capsys.readouterr().err
    assert cli_main(["checkpoint", "inspect", str(run_dir)]) == 1  # its newest: step 10
    assert f"{step_dir}: step 10" in capsys.readouterr().out
