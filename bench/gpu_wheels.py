"""`make gpu-wheels`: a folder of wheels that lets an offline GPU machine run `make gpu-check`.

A GPU machine may hold only torch, for another Python (3.12 by default), with no network. This
folder carries what it lacks, at the versions of this checkout's .venv:
- deepspeed, built here as a pure-Python wheel with no ops compiled (DS_BUILD_OPS=0; Tessera
  uses none of them: torch's fused AdamW, our own checkpoint writer)
- megatron-core (a binary wheel for the target Python), webdataset, omegaconf, submitit
- what those need that the GPU image lacks: hjson, pydantic (+ pydantic-core, annotated-types,
  typing-inspection), braceexpand
- the project itself (for a machine given the folder without the source; `make gpu-check` run
  from a checkout installs the checkout instead, so edits since this folder count)
Everything else they need (numpy, packaging, psutil, tqdm, einops, msgpack, ninja, py-cpuinfo,
pyyaml, cloudpickle, typing_extensions, transformers, tokenizers, safetensors) is in the image.

  python bench/gpu_wheels.py [--output .gpu-wheels] [--python-version 3.12]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Downloaded as wheels for the target platform, at the version installed in this environment.
DOWNLOADED = ("megatron-core", "webdataset", "omegaconf", "submitit", "hjson", "pydantic",
              "pydantic-core", "annotated-types", "typing-inspection", "braceexpand")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
MAX_FOLDER_BYTES = 48 * 2**20  # what travels to the GPU machine with the source


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, env=env)


def download(output: Path, python_version: str) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in DOWNLOADED]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
        "--implementation", "cp", *platforms, "-d", str(output), *pins)


def build_deepspeed(output: Path) -> None:
    """A pure wheel of the installed version, built against this environment's torch (build
    isolation would download another torch), with every op left to load on demand."""
    version = importlib.metadata.version("deepspeed")
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-binary", "deepspeed",
        "-w", str(output), f"deepspeed=={version}", env=env)


def build_project(output: Path) -> None:
    for old in output.glob("tessera-*.whl"):
        old.unlink()
    # setuptools copies the sources into build/lib and reuses that copy: a module deleted since
    # the last build would still be packed
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(output), str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / ".gpu-wheels"))
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    download(output, args.python_version)
    if not list(output.glob("deepspeed-*.whl")):
        build_deepspeed(output)
    build_project(output)
    wheels = sorted(output.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    print(f"gpu-wheels: {len(wheels)} wheels, {total / 2**20:.1f} MiB in {output}")
    if total > MAX_FOLDER_BYTES:
        print(f"gpu-wheels: over the {MAX_FOLDER_BYTES // 2**20} MiB a GPU machine is sent; "
              f"remove old versions from {output}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
