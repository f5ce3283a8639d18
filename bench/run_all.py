"""`make bench`: every benchmark, one table of ratios, written to bench/results/.

Runs each benchmark script in its own process, one after the other (each measures side by side
within its own run), gathers the ratios they print and writes the table, the machine it ran on
(CPU model, cores, load, torch and DeepSpeed versions) and every script's full figures to
bench/results/results.md and results.json. The other issues' benchmarks (pipeline bubble,
activation memory, checkpoint I/O, data throughput) are run as they are; their ratios are read
from what they print (their JSON, or their table lines).

Run: .venv/bin/python bench/run_all.py [--only trainer_overhead tp_traffic ...] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
OURS = ("trainer_overhead", "tp_traffic", "zero_memory", "speed_levers", "resilience_overhead",
        "startup")
THEIRS = ("pipeline_bubble", "activation_memory", "checkpoint_io", "data_throughput")
QUICK_ARGS = {
    "trainer_overhead": ["--steps", "4", "--warmup", "1"],
    "zero_memory": ["--dp", "2"],
    "pipeline_bubble": ["--mode", "sleep", "--steps", "2"],
    "activation_memory": ["--layers", "4", "--seq", "512", "--batch", "4"],
    "speed_levers": ["--steps", "3"],
    "resilience_overhead": ["--steps", "6", "--warmup", "1"],
    "checkpoint_io": ["--hidden", "256", "--layers", "2", "--repeats", "1"],
    "data_throughput": ["--rounds", "1", "--demo-steps", "2"],
}


def run_script(name: str, args: list[str], json_path: Path | None) -> dict:
    argv = [sys.executable, str(BENCH_DIR / f"{name}.py"), *args]
    if json_path is not None:
        argv += ["--json", str(json_path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=BENCH_DIR.parent,
                          check=False)
    elapsed = time.perf_counter() - started
    result = {"name": name, "argv": args, "returncode": proc.returncode,
              "seconds": round(elapsed, 1), "stdout": _clean(proc.stdout)}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr.splitlines()[-15:]
    if json_path is not None and json_path.exists():
        result["data"] = json.loads(json_path.read_text())
    return result


def _clean(text: str) -> str:
    """A script's output without dependency noise (warnings, DeepSpeed notices, launchers)."""
    noise = re.compile(r"warn|^\s*return func|^DeepSpeed|^\[rank\d|^[WIE]\d{4} |^USDT|^/",
                       re.IGNORECASE)
    return "\n".join(line for line in text.splitlines() if not noise.search(line))


# ---------------------------------------------------------------------------------------------
# Ratios out of each script's result: rows of (figure, value, target, note)


def rows_trainer_overhead(result: dict) -> list[tuple]:
    rows = []
    for r in result.get("data", []):
        detail = (f"tokens/s {r['tessera_tokens_per_s']:.0f} vs {r['baseline_tokens_per_s']:.0f}; "
                  f"each build order {'/'.join(f'{x:.3f}' for x in r['ratio_each_order'])}; "
                  f"CPU-time ratio {r['cpu_time_ratio']:.3f}; loss rel. diff "
                  f"{r['max_loss_rel_diff']:.1e}")
        if "bound_without_overlap" in r:
            detail += (f"; at most {r['bound_without_overlap']:.3f} with its collectives not "
                       f"overlapped (bare gloo)")
        rows.append((r["name"], r["ratio"], f">= {r['target']}", detail))
    return rows


def rows_tp_traffic(result: dict) -> list[tuple]:
    data = result.get("data")
    if not data:
        return []
    rows = [(f"TP all-reduce bytes/step, {r['term']}", r["ratio"], "= 1",
             (f"{r['calls']} calls, {r['bytes']} B (theory {r['theory_calls']}, "
             f"{r['theory_bytes']} B)")) for r in data["rows"]]
    blocks = [r for r in data["rows"] if r["term"].startswith("block")]
    measured, theory = sum(r["bytes"] for r in blocks), sum(r["theory_bytes"] for r in blocks)
    return [("TP all-reduce bytes/step, blocks (2 fwd + 2 bwd of b*s*h per block)",
             measured / theory, "= 1", f"{measured} B measured, {theory} B theory"), *rows]


def rows_zero_memory(result: dict) -> list[tuple]:
    return [(f"ZeRO-{r['stage']} {r['precision']} dp={r['dp']} bytes/param", r["ratio"],
             "within 10%", (f"{r['total_per_psi']:.2f} measured vs {r['formula_per_psi']:.2f} "
             f"formula (params {r['params_per_psi']:.2f}, grads {r['grads_per_psi']:.2f}, "
             f"optimizer {r['optimizer_per_psi']:.2f}); step peak {r['step_peak_per_psi']:.2f}"))
            for r in result.get("data", [])]


def rows_speed_levers(result: dict) -> list[tuple]:
    data = result.get("data")
    if not data:
        return []
    c, loss = data["compile"], data["loss"]
    return [
        ("train.compile: steady tokens/s, compiled / eager", c["speedup_ratio"], "> 1",
         f"compile cost {c['compile_cost_s']:.1f} s (first step); losses within "
         f"{c['max_loss_rel_diff']:.1e}"),
        (f"train.loss_chunk_tokens={loss['chunk_tokens']}: peak step memory, chunked / whole "
         f"({loss['vocab_size']} vocabulary)", loss["memory_ratio"], "< 1",
         f"{loss['chunked_mb']:.0f} vs {loss['whole_mb']:.0f} MB; step time ratio "
         f"{loss['step_time_ratio']:.2f}; losses within {loss['loss_rel_diff']:.1e}"),
        *_masking_rows(data.get("document_masking")),
    ]


def rows_resilience_overhead(result: dict) -> list[tuple]:
    data = result.get("data")
    if not data:
        return []
    return [("resilience: step time without / with the watchdog and straggler all-gather "
             "(demo shape, tp=2, log every 10 steps)", data["ratio"], f">= {data['target']}",
             f"median step {data['with_s'] * 1000:.1f} ms with, {data['without_s'] * 1000:.1f} "
             f"ms without, {data['steps']} steps each; all-gather every step: "
             f"{data['ratio_every_step']:.3f}")]


def rows_startup(result: dict) -> list[tuple]:
    """Seconds a person waits (the ratio: target over measured, >= 1 meets it)."""
    return [(f"start-up: {r['figure'].replace('_', ' ')} (s: {r['seconds']})", r["ratio"], ">= 1",
             f"{r['seconds']} s against a target under {r['target_s']} s")
            for r in result.get("data") or []]


def _masking_rows(masking: dict | None) -> list[tuple]:
    if not masking:
        return []
    steady = masking["steady_step_s"]
    return [("data.document_masking: tokens/s, masked / causal attention (CPU, SDPA math)",
             masking["throughput_ratio"], ">= 0.8",
             f"steady step {steady['masked']:.3f} vs {steady['causal']:.3f} s, "
             f"{masking['tokens_per_step']} tokens/step")]


def rows_pipeline_bubble(result: dict) -> list[tuple]:
    """The issue's target is in points of idle fraction, so the figure is the difference."""
    rows = []
    pattern = re.compile(r"^(sleep|real)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)")
    for line in result["stdout"].splitlines():
        match = pattern.match(line)
        if match:
            mode, p, m, theory, idle = match.groups()
            points = 100 * (float(idle) - float(theory))
            rows.append((f"pipeline bubble {mode} pp={p} m={m}: idle - (p-1)/(m+p-1), points",
                         points, "within 5" if mode == "sleep" else "(CPU contention)",
                         f"idle {idle} vs theory {theory}"))
    return rows


def rows_from_json_ratios(result: dict) -> list[tuple]:
    """Every number whose key says `ratio` in the JSON objects a script printed."""
    rows = []
    for obj in _json_objects(result["stdout"]):
        for path, value in _ratio_leaves(obj, ""):
            rows.append((f"{result['name']}: {path}", value, "", ""))
    return rows


def rows_activation_memory(result: dict) -> list[tuple]:
    match = re.search(r"ratio full/none ([\d.]+)", result["stdout"])
    equal = re.search(r"equal: (\w+)", result["stdout"])
    if not match:
        return []
    return [("activation memory, checkpointing full / none", float(match.group(1)), "< 1",
             f"losses and gradients equal: {equal.group(1) if equal else '?'}")]


def _json_objects(text: str):
    decoder = json.JSONDecoder()
    index = 0
    while (start := text.find("{", index)) != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        yield obj
        index = end


def _ratio_leaves(obj, path: str):
    if isinstance(obj, dict):
        for key, value in obj.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    "ratio" in child.lower():
                yield child, float(value)
            else:
                yield from _ratio_leaves(value, child)


EXTRACT = {
    "trainer_overhead": rows_trainer_overhead,
    "tp_traffic": rows_tp_traffic,
    "zero_memory": rows_zero_memory,
    "speed_levers": rows_speed_levers,
    "resilience_overhead": rows_resilience_overhead,
    "startup": rows_startup,
    "pipeline_bubble": rows_pipeline_bubble,
    "activation_memory": rows_activation_memory,
    "checkpoint_io": rows_from_json_ratios,
    "data_throughput": rows_from_json_ratios,
}


# ---------------------------------------------------------------------------------------------
# Report


def target_lines(stdout: str) -> list[str]:
    """A script's own verdict lines (those naming a target or a bound), kept verbatim."""
    return [line.strip() for line in stdout.splitlines()
            if re.search(r"target|>=|<=", line, re.IGNORECASE) and not line.startswith("{")]


def markdown(results: list[dict], info: dict) -> str:
    lines = [f"# Benchmark results ({info['date']})", "",
             (f"Machine: {info['machine']['cpu_model']}, {info['machine']['cores']} cores, "
             f"Python {info['machine']['python']}, torch {info['machine']['torch']}, "
             f"DeepSpeed {info['machine']['deepspeed']}, GPU: {info['machine']['cuda'] or 'none'}. "
             f"Load average (1 min) {info['machine']['load_avg_1min_at_start']} at the start, "
             f"{info['load_avg_1min_at_end']} at the end (a load above the core count means "
             f"other jobs shared the machine: wall-time ratios are then noisy)."), "",
             "| benchmark | figure | value | target | detail |", "|---|---|---|---|---|"]
    for result in results:
        rows = EXTRACT[result["name"]](result) if result["returncode"] == 0 else []
        if result["returncode"] != 0:
            lines.append(f"| {result['name']} | FAILED (exit {result['returncode']}) | | | "
                         f"{' / '.join(result.get('stderr_tail', [])[-2:])} |")
        for figure, value, target, detail in rows:
            lines.append(f"| {result['name']} | {figure} | {value:.3f} | {target} | {detail} |")
    lines += ["", "## The other benchmarks' verdict lines, as printed", ""]
    for result in results:
        verdicts = target_lines(result["stdout"]) if result["name"] not in OURS else []
        if verdicts:
            lines.append(f"**{result['name']}** ({result['seconds']} s)")
            lines += ["```", *verdicts, "```"]
    lines += ["", "## Full output", ""]
    for result in results:
        lines += [(f"### {result['name']} ({' '.join(result['argv']) or 'defaults'}, "
                  f"{result['seconds']} s)"), "```", result["stdout"].strip(), "```", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=OURS + THEIRS)
    parser.add_argument("--quick", action="store_true", help="smaller settings (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for results.md/json")
    args = parser.parse_args()
    names = args.only or OURS + THEIRS
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "quick": args.quick}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if not (BENCH_DIR / f"{name}.py").exists():
                print(f"{name}: not there yet, skipped", flush=True)
                continue
            print(f"running bench/{name}.py ...", flush=True)
            json_path = Path(tmp) / f"{name}.json" if name in OURS else None
            result = run_script(name, QUICK_ARGS.get(name, []) if args.quick else [], json_path)
            results.append(result)
            print(f"  done in {result['seconds']} s (exit {result['returncode']})", flush=True)
    info["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    report = markdown(results, info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({**info, "results": results}, indent=1) + "\n")
    table_end = report.index("\n## ")
    print(report[:table_end])
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
