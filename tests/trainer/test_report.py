"""`tessera report`: PNG and HTML from run directories, runs overlaid, duplicate steps of a
resumed run counted once, clear errors for what a user can get wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tessera.cli import main
from tessera.trainer.report import read_run, write_report


def fake_run(run_dir: Path, steps: int, lr: float, restart_at: int | None = None) -> Path:
    """A metrics.jsonl as training writes it; `restart_at`: a start that crashed after its
    last checkpoint logged steps restart_at.. once more."""
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "total_steps": steps,
            "loss": 6.0 * math.exp(-lr * step) + 2.0,
            "lr": lr,
            "grad_norm": 1.0 / step,
            "tokens_per_s": 1000.0 + step,
            "step_s": 0.5,
            "consumed_samples": 8 * step,
            "data/tokens/default": 8 * 64 * step,
            "throughput/mfu": 0.4,
        }
        if step % 5 == 0:
            row["eval/loss"] = row["loss"] + 0.1
        rows.append(row)
    if restart_at is not None:
        stale = [dict(r, loss=99.0) for r in rows[restart_at - 1 :]]
        rows = rows[: restart_at - 1] + stale + rows[restart_at - 1 :]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 21, "lo')  # cut short by a kill
    return run_dir


def test_png_with_runs_overlaid(tmp_path, capsys):
    a = fake_run(tmp_path / "lr-high", 20, 0.2, restart_at=12)
    b = fake_run(tmp_path / "lr-low", 20, 0.05)
    out = tmp_path / "out" / "report.png"
    assert main(["report", str(a), str(b), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"tessera: wrote {out}"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000


def test_resumed_steps_count_once_and_summary(tmp_path):
    run = read_run(fake_run(tmp_path / "r", 20, 0.2, restart_at=12))
    assert [r["step"] for r in run.rows] == list(range(1, 21))
    assert max(r["loss"] for r in run.rows) < 99.0  # the later rows of a step win
    summary = run.summary()
    assert summary["steps"] == "20" and summary["MFU"] == "40.0%"
    assert summary["final loss"] == f"{6.0 * math.exp(-4.0) + 2.0:.4f}"
    assert summary["tokens"] == "10.2k" and summary["train time"] == "0:10"


def test_html_holds_the_table_and_the_figure(tmp_path):
    a = fake_run(tmp_path / "a", 10, 0.1)
    out = write_report([str(a)], tmp_path / "report.html")
    text = out.read_text()
    assert "<table>" in text and "<td>a</td>" in text and "final loss" in text
    assert "data:image/png;base64," in text


def test_errors_name_the_cause_and_the_fix(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--output", str(tmp_path / "r.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert "metrics.jsonl: not found" in error and "tessera train" in error
    a = fake_run(tmp_path / "a", 3, 0.1)
    assert main(["report", str(a), "--output", str(tmp_path / "r.pdf")]) == 2
    assert "give a .png or .html file name" in capsys.readouterr().err


def test_damaged_rows_and_values_are_skipped(tmp_path, capsys):
    """Lines that are not a JSON object with an integer step, anywhere in the file, and values
    that are not numbers, are left out: the rest still makes a report."""
    run = fake_run(tmp_path / "r", 6, 0.2)
    lines = (run / "metrics.jsonl").read_text().splitlines()[:6]
    damaged = ["[1, 2]", '{"step": "x", "loss": 5}', "not json", '{"step": true, "loss": 1}',
               '{"step": 7, "loss": "5", "step_s": "x", "tokens_per_s": [1], "lr": null, '
               '"data/tokens/default": "many"}']
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + damaged + lines[3:]) + "\n")
    out = tmp_path / "report.png"
    assert main(["report", str(run), "--output", str(out)]) == 0
    assert capsys.readouterr().err == ""
    rows = read_run(run).rows
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert set(rows[-1]) == {"step"}
    summary = read_run(run).summary()
    assert summary["steps"] == "7" and summary["final loss"] == f"{6.0 * math.exp(-1.2) + 2.0:.4f}"


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    run = fake_run(tmp_path / "a", 3, 0.1)
    for output in (tmp_path / "taken.png", tmp_path / "taken.html"):  # directories, not files
        output.mkdir()
        assert main(["report", str(run), "--output", str(output)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"tessera report: error: --output {output}: cannot write it")
        assert len(error.splitlines()) == 1
    if Path("/proc/self").is_dir():  # Linux: nothing can be created in /proc
        assert main(["report", str(run), "--output", "/proc/r.png"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("tessera report: error: --output /proc/r.png: cannot write it")
