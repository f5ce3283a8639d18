"""Fault injection: kill -9 one rank, or the whole job, at random points during a save.

One job (2 ranks, tiny model, a save after every step) is started, killed while it saves, and
started again, 10 times over; every start must resume from the last committed checkpoint (never
a partial one), and the run finished after the last kill must end bitwise where an uninterrupted
run ends. The test hook TESSERA_TEST_CHECKPOINT_DELAY_S slows every file and commit phase of a
save, so that random kill times land inside saves.

Jobs are forked from one spawned driver process that has imported torch, DeepSpeed and Tessera
but run nothing, so a start costs well under a second instead of a fresh interpreter's ~8 s; the
driver runs the uninterrupted run once and both chains (one rank killed, whole job killed).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time
import traceback
from pathlib import Path

import pytest
from checkpoints import assert_same_checkpoint
from training import read_metrics, tiny_config

from tessera.launch.local import free_port
from tessera.trainer import checkpoint

STEPS = 24
TRIALS = 10
DELAY_S = 0.04  # per written file and per commit phase: a save lasts about 0.3 s
KILL_WINDOW_S = 0.35
START_TIMEOUT_S = 240  # generous: a loaded machine starts jobs slowly
GRACE_S = 15  # a survivor of a one-rank kill must notice the dead peer within this


def _rank_main(rank: int, world: int, port: int, cfg, delay_s: float, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if delay_s:
        os.environ[checkpoint.DELAY_ENV] = str(delay_s)
    from tessera.trainer.train import train

    train(cfg)


def _start(ctx, cfg, delay_s: float, log: Path, world: int = 2) -> list:
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, cfg, delay_s, str(log)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def _wait_for_row(run: Path, rows_before: int, step: int | None, procs: list) -> dict:
    """The metrics row this start logs for `step` (its first row when None). The loop logs a
    step before it saves it, so a save of that step starts right after."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            rows = _rows(run)[rows_before:]
        except ValueError:  # a line being written
            rows = []
        for row in rows:
            if step is None or row["step"] == step:
                return row
        if not any(p.is_alive() for p in procs):
            raise AssertionError(f"the job ended before it logged step {step}")
        time.sleep(0.005)
    for p in procs:
        p.kill()
    raise AssertionError(f"step {step} not logged within {START_TIMEOUT_S} s")


def _reap(procs: list, grace_s: float) -> list:
    """Wait for the processes; kill (as a launcher would) those alive after `grace_s`.
    Returns each one's exit code, None for those that had to be killed."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode if not p.is_alive() else None for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def _rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []


def _invalid_commits(root: Path) -> dict:
    found = {}
    for step in checkpoint.committed_steps(root):
        problems = checkpoint.problems(root / checkpoint.tag_for(step))
        if problems:
            found[checkpoint.tag_for(step)] = problems
    return found


def kill_chain(ctx, base: Path, shards: Path, whole_job: bool, rng: random.Random) -> dict:
    """TRIALS killed starts of one run, then the start that finishes it."""
    log = base / "jobs.log"
    run = base / ("whole-job" if whole_job else "one-rank")
    root = run / "checkpoints"
    trials = []
    for trial in range(TRIALS):
        cfg = tiny_config(
            run,
            shards,
            **{
                "train.steps": STEPS,
                "checkpoint.interval": 1,
                "checkpoint.keep_last": 2,
                "checkpoint.keep_every": 4,
                "checkpoint.async": trial % 2 == 1,
            },
        )
        rows_before = len(_rows(run))
        procs = _start(ctx, cfg, DELAY_S, log)
        resumed_from = _wait_for_row(run, rows_before, None, procs)["step"] - 1
        # kill inside the save of the 1st or 2nd step this start takes, at a random point
        target = resumed_from + rng.randint(1, 2)
        _wait_for_row(run, rows_before, target, procs)
        time.sleep(rng.uniform(0, KILL_WINDOW_S))
        latest_before = checkpoint.read_latest(root)
        in_save = any(root.glob("step-*.tmp"))
        victims = procs if whole_job else [rng.choice(procs)]
        for p in victims:
            os.kill(p.pid, signal.SIGKILL)
        codes = _reap(procs, GRACE_S)
        trials.append(
            {
                "saving": target,
                "latest_before": latest_before,
                "in_save": in_save,
                "resumed_from": resumed_from,
                "survivor_codes": [c for p, c in zip(procs, codes) if p not in victims],
                "invalid_commits": _invalid_commits(root),
            }
        )
    rows_before = len(_rows(run))
    finish = tiny_config(
        run, shards, **{"train.steps": STEPS, "checkpoint.keep_last": 2, "checkpoint.keep_every": 4}
    )
    assert _reap(_start(ctx, finish, 0, log), START_TIMEOUT_S) == [0, 0], "finishing run failed"
    rows = _rows(run)
    compared = assert_same_checkpoint(
        base / "straight" / "checkpoints" / checkpoint.tag_for(STEPS),
        root / checkpoint.tag_for(STEPS),
    )
    return {
        "trials": trials,
        "finish_resumed_from": rows[rows_before]["step"] - 1,
        "chain_rows": rows,
        "tensors_compared": compared,
    }


def kill_chains(base: Path, shards: Path, seed: int) -> dict:
    """Driver body: the uninterrupted run, then a chain of killed starts per mode."""
    import tessera.trainer.train  # noqa: F401 - imported once here: the forked jobs share it

    ctx = mp.get_context("fork")
    rng = random.Random(seed)
    straight = tiny_config(base / "straight", shards, **{"train.steps": STEPS})  # saves at the end
    assert _reap(_start(ctx, straight, 0, base / "jobs.log"), START_TIMEOUT_S) == [0, 0]
    results = {"straight_rows": _rows(base / "straight")}
    for whole_job in (False, True):
        try:
            results[whole_job] = ("ok", kill_chain(ctx, base, shards, whole_job, rng))
        except Exception:  # noqa: BLE001 - reported by the test of that mode
            results[whole_job] = ("error", traceback.format_exc())
    return results


def _driver_entry(queue, fn, args) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the test
        queue.put(("error", traceback.format_exc()))


def run_driver(fn, *args, timeout_s: float = 600):
    """Run fn(*args) in a freshly spawned process (nothing initialized) and return its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    driver = ctx.Process(target=_driver_entry, args=(queue, fn, args))
    driver.start()
    try:
        status, value = queue.get(timeout=timeout_s)
    finally:
        driver.join(10)
        if driver.is_alive():
            driver.kill()
    assert status == "ok", value
    return value


@pytest.fixture(scope="module")
def chains(tmp_path_factory, byte_shards) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("kills")
    return base, run_driver(kill_chains, base, byte_shards, 1234)


@pytest.mark.parametrize("whole_job", [False, True], ids=["one-rank", "whole-job"])
def test_kill_during_save_resumes_from_last_commit(chains, whole_job):
    base, results = chains
    status, result = results[whole_job]
    assert status == "ok", result
    trials = result["trials"]
    log = (base / "jobs.log").read_text()[-3000:]
    previous_latest = None
    for index, trial in enumerate(trials):
        where = f"trial {index}: {json.dumps(trial)}\n{log}"
        assert trial["invalid_commits"] == {}, where  # nothing committed is ever partial
        if index > 0:  # this start resumed from what the previous kill left committed
            assert trial["resumed_from"] >= (checkpoint.step_of(previous_latest or "") or 0), where
        if not whole_job:  # the other rank noticed the dead peer and stopped by itself
            assert all(code not in (None, 0) for code in trial["survivor_codes"]), where
        previous_latest = trial["latest_before"]
    assert result["finish_resumed_from"] >= (checkpoint.step_of(previous_latest or "") or 0)
    assert sum(t["in_save"] for t in trials) >= TRIALS // 2  # most kills hit a save in flight
    # every start resumed correctly: each step's loss, whichever start logged it, is the
    # uninterrupted run's, and the final state is bitwise the same
    straight = {r["step"]: r["loss"] for r in results["straight_rows"]}
    assert len(straight) == STEPS
    for row in result["chain_rows"]:
        assert row["loss"] == straight[row["step"]], f"step {row['step']}"
    assert result["chain_rows"][-1]["step"] == STEPS
    assert result["tensors_compared"] > 10
