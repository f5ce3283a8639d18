"""`tessera report RUN_DIR [RUN_DIR ...] --output FILE.png|FILE.html`: curves and a summary.

Reads each run's metrics.jsonl (a step logged twice, by a start that crashed after its last
checkpoint and by the start that resumed, counts once: the later row wins; a line that a kill cut
short, or a damaged one, is skipped), draws training and held-out loss, throughput, learning rate
and gradient norm with the runs overlaid, and a table of final loss, tokens, tokens/s, MFU and
wall time. HTML embeds the same figure and the table as text.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
import math
import sys
from pathlib import Path

from tessera.data.progress import clock_text, human_count


class ReportError(ValueError):
    """A run directory without metrics, or an output format we do not write."""


@dataclasses.dataclass
class Run:
    name: str
    rows: list[dict]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [
            (r["step"], r[key])
            for r in self.rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, key: str) -> float | None:
        _, values = self.series(key)
        return values[-1] if values else None

    def summary(self) -> dict[str, str]:
        steps = [r["step"] for r in self.rows]
        train_s = sum(
            r.get("step_s", 0.0) * _interval(self.rows, i) for i, r in enumerate(self.rows)
        )
        train_s = train_s if math.isfinite(train_s) else 0.0  # (a damaged row's inf or NaN)
        tokens = sum(v for k, v in self.rows[-1].items() if k.startswith("data/tokens/"))
        tokens = tokens if math.isfinite(tokens) else 0
        _, tokens_per_s = self.series("tokens_per_s")
        mfu = self.last("throughput/mfu")
        return {
            "run": self.name,
            "steps": f"{steps[-1]:,}",
            "final loss": _fmt(self.last("loss"), ".4f"),
            "eval loss": _fmt(self.last("eval/loss"), ".4f"),
            "tokens": human_count(tokens) if tokens else "-",
            "tokens/s (median)": human_count(_median(tokens_per_s)) if tokens_per_s else "-",
            "MFU": f"{100 * mfu:.1f}%" if mfu is not None else "-",
            "train time": clock_text(train_s),
        }


def _interval(rows: list[dict], index: int) -> int:
    """Steps a row's step_s stands for (the log interval before it)."""
    return rows[index]["step"] - (rows[index - 1]["step"] if index else 0)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def metrics_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, in file order, as far as they can be read: a line that is
    not a JSON object with an integer step (the half-written last line of a killed run, or a
    damaged one) is skipped, and so is a value that is not a number. `tessera report` and
    `tessera status` read metrics through this one function: a damaged file never fails them.
    Raises OSError where the file cannot be read at all."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [row for row in map(_metrics_row, f) if row is not None]


def _metrics_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # cut short, not JSON, or nested past the parser
        return None
    if not isinstance(row, dict) or not _is_number(row.get("step")):
        return None
    if not isinstance(row["step"], int):
        return None
    return {key: value for key, value in row.items() if _is_number(value)}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(run_dir: str | Path) -> Run:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(
            f"{path}: not found; give run directories that `tessera train` wrote "
            f"(each holds a metrics.jsonl)"
        )
    try:
        rows = metrics_rows(path)
    except OSError as e:
        raise ReportError(f"{path}: cannot read it ({e.strerror or e})") from None
    by_step = {row["step"]: row for row in rows}  # a step logged twice: the later row wins
    if not by_step:
        raise ReportError(f"{path}: no logged step yet")
    return Run(Path(run_dir).resolve().name, [by_step[s] for s in sorted(by_step)])


def draw(runs: list[Run]):
    """The figure: loss, throughput, learning rate, grad norm; one colour per run."""
    import matplotlib  # lazy: matplotlib, only for `tessera report`

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # lazy: matplotlib, only for `tessera report`

    fig = plt.figure(figsize=(13, 9.6), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[1.15, 1.0, 0.1 + 0.075 * len(runs)])
    panels = {
        "loss": fig.add_subplot(grid[0, 0]),
        "tokens_per_s": fig.add_subplot(grid[0, 1]),
        "lr": fig.add_subplot(grid[1, 0]),
        "grad_norm": fig.add_subplot(grid[1, 1]),
    }
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        steps, values = run.series("loss")
        panels["loss"].plot(steps, values, color=colour, lw=1.4, label=f"{run.name} (train)")
        steps, values = run.series("eval/loss")
        if steps:
            panels["loss"].plot(
                steps,
                values,
                color=colour,
                lw=1.4,
                ls="--",
                marker="o",
                ms=4,
                label=f"{run.name} (held-out)",
            )
        for key in ("tokens_per_s", "lr", "grad_norm"):
            steps, values = run.series(key)
            panels[key].plot(steps, values, color=colour, lw=1.2, label=run.name)
    labels = {
        "loss": ("Loss", "cross entropy (nats/token)"),
        "tokens_per_s": ("Throughput", "tokens/s (all devices)"),
        "lr": ("Learning rate", "learning rate"),
        "grad_norm": ("Gradient norm", "global L2 norm (before clipping)"),
    }
    for key, axes in panels.items():
        title, ylabel = labels[key]
        axes.set_title(title, loc="left", fontweight="bold")
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best")
    panels["lr"].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    table_axes = fig.add_subplot(grid[2, :])
    table_axes.axis("off")
    table_axes.set_title("Summary", loc="left", fontweight="bold")
    summaries = [run.summary() for run in runs]
    table = table_axes.table(
        cellText=[list(s.values()) for s in summaries],
        colLabels=list(summaries[0].keys()),
        loc="center",
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    fig.suptitle("Tessera runs: " + ", ".join(run.name for run in runs), fontsize=13)
    return fig


def summary_html(runs: list[Run]) -> str:
    summaries = [run.summary() for run in runs]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in summaries[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in s.values()) + "</tr>"
        for s in summaries
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run_dirs: list[str], output: str | Path) -> Path:
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".png", ".html"):
        raise ReportError(f"--output {output}: give a .png or .html file name")
    runs = [read_run(d) for d in run_dirs]
    names = [run.name for run in runs]
    for index, run in enumerate(runs):  # same basename in two places: use the parent too
        if names.count(run.name) > 1:
            run.name = f"{Path(run_dirs[index]).resolve().parent.name}/{run.name}"
    fig = draw(runs)
    from matplotlib import pyplot as plt  # lazy: matplotlib, only for `tessera report`

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".png":
            fig.savefig(output, dpi=110)
        else:
            output.write_text(report_html(runs, fig))
    except OSError as e:  # matplotlib's open() fails inside the library: name the path here
        raise ReportError(f"--output {output}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return output


def report_html(runs: list[Run], fig) -> str:
    """The summary table and the figure as one HTML page (the figure embedded as a PNG)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    image = base64.b64encode(buffer.getvalue()).decode()
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Tessera report</title>"
        f"<style>{style}</style></head><body><h1>Tessera report</h1>{summary_html(runs)}"
        f"<p><img alt='loss and throughput curves' src='data:image/png;base64,{image}'></p>"
        f"</body></html>\n"
    )


def report_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tessera report",
        usage="tessera report RUN_DIR [RUN_DIR ...] --output FILE.png|FILE.html",
    )
    parser.add_argument("runs", nargs="+", help="run directories (several are overlaid)")
    parser.add_argument("--output", "-o", required=True, help="FILE.png or FILE.html")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        path = write_report(args.runs, args.output)
    except ReportError as e:
        print(f"tessera report: error: {e}", file=sys.stderr)
        return 2
    print(f"tessera: wrote {path}")
    return 0
