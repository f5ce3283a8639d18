"""`tessera status` on run directories that someone else wrote, or a kill left damaged: it reads
them without running anything from them, and says one line for what it cannot read."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from submitit.core.utils import cloudpickle_dump

from tessera.cli import main


def job_row(run: Path, job_id: str) -> str:
    log_dir = run / "slurm" / job_id
    log_dir.mkdir(parents=True, exist_ok=True)
    return json.dumps({"job_id": job_id, "job_name": "tessera-run", "log_dir": str(log_dir),
                       "submitted_at": "2026-01-01T00:00:00", "nodes": 2, "launcher": "srun",
                       "world_size": 2, "steps": 8})


def make_run(tmp_path: Path, job_ids: tuple[str, ...] = ("41",), extra_job_lines: str = "",
             metrics: str = '{"step": 5, "total_steps": 8, "loss": 2.5}\n') -> Path:
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    text = "".join(job_row(run, job_id) + "\n" for job_id in job_ids) + extra_job_lines
    (run / "slurm" / "jobs.jsonl").write_text(text)
    (run / "metrics.jsonl").write_text(metrics)
    return run


def status(capsys, run: Path) -> list[str]:
    """The status lines; a clean exit and nothing on stderr."""
    assert main(["status", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out.splitlines()


def job_line(lines: list[str], job_id: str) -> str:
    [line] = [line for line in lines if line.startswith(f"  {job_id} ")]
    return line


@pytest.fixture(autouse=True)
def no_slurm_tools(tmp_path, monkeypatch):
    """No scontrol or sacct: the states come from submitit's result files."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


class RunsAShellCommand:
    """A planted result file: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo planted > {self.marker}",)


def test_a_planted_result_pickle_runs_no_code(tmp_path, capsys):
    run = make_run(tmp_path)
    marker = tmp_path / "marker"
    (run / "slurm" / "41" / "41_0_result.pkl").write_bytes(
        pickle.dumps(("success", RunsAShellCommand(marker))))
    lines = status(capsys, run)
    assert not marker.exists()
    assert "ENDED (unreadable result file)" in job_line(lines, "41")


def test_submitits_own_result_files_still_read(tmp_path, capsys):
    """What submitit writes (cloudpickle) for TrainJob's summary and for a failure loads without
    any global."""
    run = make_run(tmp_path, ("41", "42", "43"))
    cloudpickle_dump(("success", {"step": 8, "run_dir": str(run), "job_id": "41"}),
                     run / "slurm" / "41" / "41_0_result.pkl")
    cloudpickle_dump(("error", "Traceback (most recent call last):\n..."),
                     run / "slurm" / "42" / "42_0_result.pkl")
    (run / "slurm" / "43" / "43_0_result.pkl").write_bytes(b"\x80\x05garbage")
    lines = status(capsys, run)
    assert "COMPLETED" in job_line(lines, "41")
    assert "FAILED (see the log)" in job_line(lines, "42")
    assert "ENDED (unreadable result file)" in job_line(lines, "43")


@pytest.mark.parametrize("last_line, expected", [
    (b'{"step": 6, "lo', "last step: 5 of 8  loss 2.5000"),  # cut short by a kill
    (b"[1, 2]\n", "last step: 5 of 8  loss 2.5000"),
    (b'{"step": "x", "loss": 1.0}\n', "last step: 5 of 8  loss 2.5000"),
    (b'{"step": 6, "total_steps": 8, "loss": [1]}\n', "last step: 6 of 8"),
    (b'{"step": 6, "total_steps": "8", "loss": 2.0}\n', "last step: 6 of ?  loss 2.0000"),
    (b"\xff\xfe not UTF-8\n", "last step: 5 of 8  loss 2.5000"),
])
def test_damaged_metrics_lines_are_skipped(tmp_path, capsys, last_line, expected):
    run = make_run(tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(last_line)
    assert expected in status(capsys, run)


def test_damaged_job_records_are_named_in_one_line(tmp_path, capsys):
    damaged = ('{"job_id": "42"}\n'  # no log_dir
               '{"job_id": 1, "log_dir": "x"}\n'  # not a Slurm job id (a string)
               '["41"]\n'
               '{"job_id": "43", "log_')  # cut short by a kill
    lines = status(capsys, make_run(tmp_path, extra_job_lines=damaged))
    assert "UNKNOWN (no Slurm tools here)" in job_line(lines, "41")
    assert ("  slurm/jobs.jsonl lines 2, 3, 4, 5: not a job record (cut short or damaged), "
            "skipped") in lines
    assert "last step: 5 of 8  loss 2.5000" in lines


def test_damaged_fault_records_are_left_out(tmp_path, capsys):
    run = make_run(tmp_path)
    (run / "resilience").mkdir()
    (run / "resilience" / "events.jsonl").write_text(
        '[1]\n{"time": 1}\n{"event": "hang", "time": "noon", "line": "rank 3 stuck"}\n')
    (run / "resilience" / "hosts.json").write_text('{"n1": 3, "n2": {"strikes": 2}}')
    lines = status(capsys, run)
    assert "faults: restarts 0  hangs 1  crashes 0  stragglers 0  requeues 0" in lines
    assert "  last hang ?: rank 3 stuck" in lines
    assert "  host n2: 2 strikes (?)" in lines


def test_a_file_is_not_a_run_directory(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("{}\n")
    assert main(["status", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tessera status: error: {path} is a file, not a run directory; give the run.dir that "
        f"`tessera train` or `tessera submit` wrote")
