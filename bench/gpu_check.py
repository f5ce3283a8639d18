"""`make gpu-check`: the whole GPU verification in one command, for whenever a GPU is at hand.

On a machine with a CUDA GPU, within about 8 minutes:
1. installs the wheels of `make gpu-wheels` (when the folder is there) and this checkout into a
   private folder, offline; the machine may hold only torch, for another Python
2. a bf16 matrix product, for the device's achievable peak
3. the gpu-marked tests (tests/gpu): nccl and bf16 on one rank, bitwise resume, CUDA async
   checkpoints, to-hf from a bf16 GPU checkpoint, generate on CUDA, SDPA's flash kernel read off
   the profiler, host syncs per micro-batch, bf16 against fp32 over 50 steps, compiled blocks
   and the chunked loss, tp=2 with sequence parallelism on two processes sharing the GPU
4. bench/mfu.py on configs/llama-1b-1gpu.yaml at 4k and 2k tokens: Tessera eager, with the
   chunked loss, compiled, and a plain PyTorch loop, side by side
and writes bench/results/gpu-<device>.md and .json. Each part runs in its own process with a
time limit, so one that fails or hangs still leaves the others' figures.

Without CUDA it prints one line and exits with status 2, having run nothing.
`--rehearse-on-cpu` runs the same parts on a CPU instead (the tests' logic through
TESSERA_GPU_TESTS_ON_CPU, bench/mfu.py's smoke model), so that no GPU minute is spent on a
mistake the CPU could have shown.

  python bench/gpu_check.py [--wheels .gpu-wheels] [--only tests,mfu-4k] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(tempfile.gettempdir()) / "tessera-gpu-site"
NO_CUDA_EXIT = 2
# (name, seconds at most, command); {python}, {report} and {results} are filled in.
PARTS = (
    ("matmul", 60, ["{python}", "-c", "import sys; sys.path.insert(0, 'bench'); "
                    "import gpu_check; gpu_check.matmul_peak('{report}/matmul.json')"]),
    ("tests", 240, ["{python}", "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-m", "gpu",
                    "tests/gpu", "--junitxml={report}/junit.xml"]),
    # 32k tokens a step in two micro-batches of 16k, without activation checkpointing
    ("mfu-4k", 150, ["{python}", "bench/mfu.py", "--json", "{report}/mfu-4k.json",
                     "model.seq_len=4096", "train.micro_batch_size=4",
                     "train.global_batch_size=8"]),
    ("mfu-2k", 150, ["{python}", "bench/mfu.py", "--json", "{report}/mfu-2k.json",
                     "model.seq_len=2048", "train.micro_batch_size=8",
                     "train.global_batch_size=16"]),
)


def matmul_peak(out: str, size: int = 8192, repeats: int = 20) -> None:
    """bf16 size^3 matrix products: the TFLOP/s this device reaches in practice."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    Path(out).write_text(json.dumps({"size": size, "tflops": 2 * size**3 / seconds / 1e12}))


def rehearsal(name: str, command: list[str]) -> list[str] | None:
    """A part's command for a CPU: mfu.py's smoke model; no matrix product peak."""
    if name == "matmul":
        return None
    if name.startswith("mfu"):
        return [*command[:command.index("--json") + 2], "--smoke"]
    return command


def cuda_device(rehearse_on_cpu: bool = False) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if rehearse_on_cpu:
        return {"name": "cpu rehearsal", "memory_gib": 0, "torch": torch.__version__,
                "cuda": None, "python": sys.version.split()[0]}
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}


def install(wheels: Path, log) -> dict:
    """This checkout and the folder's wheels into SITE; the environment the parts run in."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    found = sorted(w for w in wheels.glob("*.whl") if not w.name.startswith("tessera-"))
    if not found:
        log(f"gpu-check: no wheels in {wheels}: using the installed packages")
        return env
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--upgrade", "--target", str(SITE)]
    subprocess.run([*pip, *map(str, found)], check=True)
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools would reuse its stale copies
    subprocess.run([*pip, "--no-build-isolation", str(ROOT)], check=True)
    # The checkout's tessera/ folder must not shadow the installed package, whose subpackages
    # map to trainer/, parallel/, ... (PYTHONSAFEPATH: neither the current directory nor a
    # script's own on sys.path; bench/ is named instead, for the benchmarks' shared module).
    paths = [str(SITE), str(ROOT / "bench"), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONSAFEPATH="1")
    log(f"gpu-check: installed {len(found)} wheels and this checkout into {SITE}")
    return env


def run_part(name: str, limit_s: float, command: list[str], env: dict, log) -> dict:
    started = time.perf_counter()
    log(f"\n===== {name} (at most {limit_s:.0f} s): {' '.join(command)}")
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit_s)
        output, status = done.stdout + done.stderr, "passed" if done.returncode == 0 else "failed"
        code = done.returncode
    except subprocess.TimeoutExpired as e:
        output = b"".join(x or b"" for x in (e.stdout, e.stderr)).decode(errors="replace")
        status, code = "timed out", None
    seconds = time.perf_counter() - started
    log(output)
    log(f"===== {name}: {status} in {seconds:.0f} s")
    return {"status": status, "exit_code": code, "seconds": round(seconds, 1),
            "tail": output.strip().splitlines()[-15:]}


def test_outcomes(junit: Path) -> list[dict]:
    if not junit.is_file():
        return []
    outcomes = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = ((child.get("message") or "").splitlines() or [""])[0][:300]
        outcomes.append({"test": case.get("name"), "outcome": outcome,
                         "seconds": round(float(case.get("time", 0)), 1), "message": message})
    return outcomes


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def collect(report_dir: Path, device: dict, parts: dict, earlier: dict | None) -> dict:
    """This run's results; with `earlier` (a run of other parts, `--only`), merged into it."""
    figures = {p.stem: read_json(p) for p in sorted(report_dir.glob("*.json"))}
    tests = test_outcomes(report_dir / "junit.xml")
    if earlier:
        parts = {**earlier["parts"], **parts}
        figures = {**earlier["figures"], **figures}
        rerun = {t["test"] for t in tests}  # a rerun of some tests (PYTEST_ADDOPTS="-k ...")
        tests = [t for t in earlier["tests"] if t["test"] not in rerun] + tests
    return {"device": device, "parts": parts, "tests": tests, "figures": figures}


def markdown(result: dict) -> str:
    d = result["device"]
    lines = [f"# GPU check: {d['name']}", "",
             f"{d['name']} ({d['memory_gib']} GiB), torch {d['torch']}, CUDA {d['cuda']}, "
             f"Python {d['python']}; `make gpu-check`, {time.strftime('%Y-%m-%d')}.", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p['seconds']} |" for name, p in result["parts"].items()]
    figures = result["figures"]
    if figures.get("matmul"):
        lines += ["", f"bf16 8192^3 matrix product: {figures['matmul']['tflops']:.0f} TFLOP/s "
                      f"(the MFU below counts against the 989 TFLOP/s spec peak)."]
    if result["tests"]:
        lines += ["", "## Tests (tests/gpu)", "", "| test | outcome | seconds | message |",
                  "|---|---|---|---|"]
        lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']} | {t['message']} |"
                  for t in result["tests"]]
    for key in ("mfu-4k", "mfu-2k"):
        mfu = figures.get(key)
        if mfu:
            lines += ["", f"## MFU, Llama-3.2-1B shape, {mfu['model']['seq_len']} tokens "
                          f"(bench/mfu.py, {key})", "",
                      f"micro-batch {mfu['train']['micro_batch_size']}, "
                      f"{mfu['train']['global_batch_size']} sequences per step, ZeRO "
                      f"{mfu['zero_stage']}, SDPA {mfu['sdpa']}, chunked loss "
                      f"{mfu['loss_chunk_tokens']} tokens", "",
                      "| variant | tokens/s | TFLOP/s | MFU | vs plain | peak GiB | loss |",
                      "|---|---|---|---|---|---|---|"]
            for name, row in mfu["variants"].items():
                mfu_pct = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "n/a"
                ratio = row.get("tokens_per_s_vs_plain")
                lines.append(f"| {name} | {row['tokens_per_s']:.0f} | {row['tflops']:.1f} | "
                             f"{mfu_pct} | {f'{ratio:.3f}' if ratio else 'n/a'} | "
                             f"{row['max_memory_gib'] or 0:.1f} | {row['last_loss']:.3f} |")
    for key in sorted(set(figures) - {"matmul", "mfu-4k", "mfu-2k"}):
        lines += ["", f"## {key}", "", "```json", _short_json(figures[key]), "```"]
    return "\n".join(lines) + "\n"


def _short_json(value) -> str:
    """JSON with float lists rounded, so curves stay readable."""
    def rounded(v):
        if isinstance(v, float):
            return round(v, 5)
        if isinstance(v, list):
            return [rounded(x) for x in v]
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return v
    text = json.dumps(rounded(value), indent=1)
    # a list of numbers on one line
    return re.sub(r"\[\s*([-0-9.e,\s]+?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--only", help=f"comma-separated parts of {[p[0] for p in PARTS]}; "
                        "the report keeps the other parts' earlier results")
    parser.add_argument("--budget-s", type=float, default=480, help="all parts together")
    parser.add_argument("--log", help="also write the full output here")
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="run every part on the CPU (small models) to check the check")
    args = parser.parse_args()
    device = cuda_device(args.rehearse_on_cpu)
    if device is None:
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is false or torch is "
              "missing); nothing was run")
        return NO_CUDA_EXIT
    log_file = open(args.log, "w") if args.log else None  # noqa: SIM115 - closed at the end

    def log(text: str) -> None:
        print(text, flush=True)
        if log_file:
            log_file.write(text + "\n")
            log_file.flush()

    deadline = time.perf_counter() + args.budget_s
    env = install(Path(args.wheels), log)
    report_dir = Path(tempfile.mkdtemp(prefix="tessera-gpu-report-"))
    env["TESSERA_GPU_REPORT_DIR"] = str(report_dir)
    if args.rehearse_on_cpu:
        env["TESSERA_GPU_TESTS_ON_CPU"] = "1"
    wanted = args.only.split(",") if args.only else [p[0] for p in PARTS]
    parts = {}
    for name, limit_s, template in PARTS:
        if name not in wanted:
            continue
        remaining = deadline - time.perf_counter()
        if remaining < 20:
            parts[name] = {"status": "not run (budget spent)", "exit_code": None, "seconds": 0}
            continue
        command = [a.format(python=sys.executable, report=report_dir) for a in template]
        if args.rehearse_on_cpu:
            command = rehearsal(name, command)
            if command is None:
                continue
        parts[name] = run_part(name, min(limit_s, remaining), command, env, log)
    slug = re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    earlier = read_json(results / f"gpu-{slug}.json") if args.only else None
    result = collect(report_dir, device, parts, earlier)
    (results / f"gpu-{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / f"gpu-{slug}.md").write_text(markdown(result))
    log(f"\ngpu-check: wrote {results / f'gpu-{slug}.md'} and .json")
    for name, part in parts.items():
        log(f"  {name:<8} {part['status']} ({part['seconds']} s)")
    if log_file:
        log_file.close()
    return 0 if all(p["status"] == "passed" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
