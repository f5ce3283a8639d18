"""`tessera status RUN_DIR`: the run's Slurm jobs and their states, its last step and checkpoint."""

from __future__ import annotations

import collections
import datetime
import io
import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

from tessera.launch import faults
from tessera.launch.slurm import JOBS_FILE
from tessera.trainer import checkpoint
from tessera.trainer.report import metrics_rows
from tessera.trainer.run_dir import RUN_MARKS, is_run_dir

# a Slurm job id: 123, an array task 123_4, a heterogeneous component 123+0
JOB_ID = re.compile(r"[0-9]+(?:[_+][0-9]+)?")
# submitit's result of a finished job is a short tuple; a larger file is not one of its results
RESULT_MAX_BYTES = 1 << 20


class StatusError(ValueError):
    pass


def job_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """State, reason, restarts and nodes of jobs Slurm still knows, by `scontrol show job`."""
    if not job_ids or shutil.which("scontrol") is None:
        return {}
    states = {}
    for job_id in job_ids:
        done = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0 or not done.stdout.strip():
            continue
        fields = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
        states[job_id] = {key: fields.get(key, "") for key in
                          ("JobState", "Reason", "Restarts", "NodeList", "RunTime")}
    return states


def _sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Final states from accounting, where the cluster keeps it (empty without)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    command = ["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State"]
    for job_id in job_ids:
        command += ["--jobs", job_id]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {}
    return dict(line.split("|", 1) for line in done.stdout.splitlines() if "|" in line)


class _NoGlobals(pickle.Unpickler):
    """Loads builtin containers, strings and numbers only. A result file lies in a directory that
    jobs.jsonl names, so anyone who wrote the run directory chose it: refusing every global (a
    class, or a function such as os.system for REDUCE to call) means loading it runs no code."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def _result_state(log_dir: Path, job_id: str) -> str | None:
    """submitit's result file of task 0: written when the job ended, not when it requeued. It
    holds ("success", what TrainJob returned: a dict of str and int) or ("error", traceback
    text): builtins only, so it is read without globals, and anything else is unreadable."""
    path = log_dir / f"{job_id}_0_result.pkl"
    try:
        if not path.is_file():  # (inside the try: a path too long or not searchable raises)
            return None
        with open(path, "rb") as f:
            data = f.read(RESULT_MAX_BYTES + 1)
        outcome = None
        if len(data) <= RESULT_MAX_BYTES:
            result = _NoGlobals(io.BytesIO(data)).load()
            if isinstance(result, tuple) and len(result) == 2:
                outcome = result[0]
    except Exception:  # noqa: BLE001 - any damage or refused global: unreadable, not a failure
        outcome = None
    if outcome == "success":
        return "COMPLETED"
    if outcome == "error":
        return "FAILED (see the log)"
    return "ENDED (unreadable result file)"


def read_jobs(run_dir: Path) -> tuple[list[dict], list[int]]:
    """The jobs of slurm/jobs.jsonl in submission order, and the numbers of the lines that are not
    job records (cut short by a kill, or damaged): status names them rather than fail on them."""
    path = run_dir / "slurm" / JOBS_FILE
    if not path.is_file():
        return [], []
    jobs, damaged = [], []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                job = _job(line)
                if job is None:
                    damaged.append(number)
                else:
                    jobs.append(job)
    except OSError as e:
        raise StatusError(f"{path}: cannot read it ({e.strerror or e})") from None
    return jobs, damaged


def _job(line: str) -> dict | None:
    """A jobs.jsonl line as {job_id, log_dir, nodes, submitted_at}, or None where it is not one.
    Everything shown is a printable string: the file may come from someone else."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict):
        return None
    job_id, log_dir = row.get("job_id"), row.get("log_dir")
    if not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
        return None
    if not (isinstance(log_dir, str) and log_dir and log_dir.isprintable()):
        return None
    return {"job_id": job_id, "log_dir": log_dir, "nodes": _shown(row.get("nodes")),
            "submitted_at": _shown(row.get("submitted_at"))}


def _shown(value: object) -> str:
    """A field as text for the status line; '?' for one of another type, or with control
    characters (which could move a terminal's cursor)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value.isprintable() else "?"


def last_metrics(run_dir: Path) -> dict | None:
    """The last readable row of metrics.jsonl (report's reader: damaged lines are skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    try:
        rows = metrics_rows(path)
    except OSError as e:
        raise StatusError(f"{path}: cannot read it ({e.strerror or e})") from None
    return rows[-1] if rows else None


def status_lines(run_dir: str | Path) -> list[str]:
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise StatusError(f"{run_dir} is a file, not a run directory; give the run.dir that "
                          f"`tessera train` or `tessera submit` wrote")
    if not run_dir.is_dir():
        raise StatusError(f"run directory not found: {run_dir}")
    jobs, damaged = read_jobs(run_dir)
    if not (jobs or damaged) and not is_run_dir(run_dir):
        raise StatusError(f"{run_dir} is not a run directory: no jobs submitted from it and no "
                          f"{', '.join(RUN_MARKS)}")
    ids = [job["job_id"] for job in jobs]
    live = job_states(ids)
    final = _sacct_states([i for i in ids if i not in live])
    lines = [f"run {run_dir.resolve()}"]
    lines.append("jobs:" if jobs or damaged else "jobs: none submitted from this run directory")
    for job in jobs:
        job_id = job["job_id"]
        if job_id in live:
            info = live[job_id]
            state = info["JobState"]
            if info["Reason"] not in ("", "None"):
                state += f" ({info['Reason']})"
            detail = (f"requeues {info['Restarts'] or 0}  nodes {info['NodeList']}  "
                      f"run time {info['RunTime']}")
        else:
            unknown = ("ENDED (Slurm no longer lists it)" if shutil.which("scontrol")
                       else "UNKNOWN (no Slurm tools here)")
            state = final.get(job_id) or _result_state(Path(job["log_dir"]), job_id) or unknown
            detail = f"nodes {job['nodes']}"
        lines.append(f"  {job_id:<10} {state:<22} {detail}  submitted {job['submitted_at']}  "
                     f"logs {job['log_dir']}")
    if damaged:
        where = "line" if len(damaged) == 1 else "lines"
        lines.append(f"  slurm/{JOBS_FILE} {where} {', '.join(map(str, damaged))}: not a job "
                     f"record (cut short or damaged), skipped")
    lines.append(_step_line(last_metrics(run_dir)))
    root = run_dir / "checkpoints"
    tag = checkpoint.latest_tag(root)
    lines.append(f"last checkpoint: {root / tag}" if tag else "last checkpoint: none")
    return lines + fault_lines(run_dir)


def _step_line(row: dict | None) -> str:
    if row is None:
        return "last step: none logged"
    total = row.get("total_steps")
    line = f"last step: {row['step']} of {total if isinstance(total, int) else '?'}"
    return line + (f"  loss {row['loss']:.4f}" if "loss" in row else "")


def fault_lines(run_dir: Path) -> list[str]:
    """Restarts, hangs, crashes and stragglers (run.dir/resilience/), the last of each, and the
    hosts with strikes. Records of another shape (a damaged file) are left out."""
    events = [event for event in faults.read_events(run_dir)
              if isinstance(event, dict) and isinstance(event.get("event"), str)]
    counts = collections.Counter(event["event"] for event in events)
    kinds = {"restart": "restarts", "hang": "hangs", "crash": "crashes",
             "straggler": "stragglers", "requeue": "requeues"}
    lines = ["faults: " + "  ".join(f"{plural} {counts[kind]}" for kind, plural in kinds.items())]
    last = {event["event"]: event for event in events}
    for kind in ("hang", "crash", "straggler"):
        if kind in last:
            event = last[kind]
            what = event.get("line") or event.get("reason") or (
                f"step {event.get('step')}: ranks {event.get('ranks')} on {event.get('hosts')} "
                f"({event.get('ratio')}x the median)")
            lines.append(f"  last {kind} {_when(event.get('time'))}: {what}")
    hosts = faults.host_strikes(run_dir)
    for host, entry in sorted(hosts.items() if isinstance(hosts, dict) else []):
        if isinstance(entry, dict):
            reasons = entry.get("reasons")
            reason = reasons[-1] if isinstance(reasons, list) and reasons else "?"
            lines.append(f"  host {host}: {entry.get('strikes', '?')} strikes ({reason})")
    return lines


def _when(seconds: object) -> str:
    """An event's Unix time as local ISO time; '?' where it is not one."""
    try:
        return datetime.datetime.fromtimestamp(seconds).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"
