"""Imports point one way: cli -> trainer -> (parallel, data, launch). parallel/, data/ and launch/
import nothing of each other or of trainer/; nothing below the CLI imports the CLI."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> its package, and the packages of ours it may import besides itself
PACKAGES = {"tessera": "tessera", "trainer": "tessera.trainer", "parallel": "tessera.parallel",
            "data": "tessera.data", "launch": "tessera.launch"}
MAY_IMPORT = {
    "tessera": {"tessera.trainer", "tessera.parallel", "tessera.data", "tessera.launch"},
    "tessera.trainer": {"tessera.parallel", "tessera.data", "tessera.launch"},
    "tessera.parallel": set(),
    "tessera.data": set(),
    "tessera.launch": set(),
}


def imported_modules(path: Path, top: str = "tessera") -> list[tuple[int, str]]:
    """(line, module) of every import of package `top` (ours by default) in a file, inside
    functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == top]


def package_of(module: str) -> str | None:
    """The package of ours a dotted name lies in (the umbrella's version is everyone's)."""
    for package in sorted(MAY_IMPORT, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


def wrong_way_edges() -> list[str]:
    edges = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in imported_modules(path):
                target = package_of(module)
                if module in ("tessera", "tessera.__version__") or target in (None, package):
                    continue
                if target not in MAY_IMPORT[package]:
                    edges.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return edges


def test_imports_point_one_way():
    assert wrong_way_edges() == []


def test_the_check_sees_a_wrong_way_edge(tmp_path, monkeypatch):
    """The walk itself: a module of parallel/ importing trainer/ is reported."""
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "bad.py").write_text(
        "def f():\n    from tessera.trainer.config import Config\n")
    for folder in PACKAGES:
        (tmp_path / folder).mkdir(exist_ok=True)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert wrong_way_edges() == [
        "parallel/bad.py:2 imports tessera.trainer.config",
        "parallel/bad.py:2 imports tessera.trainer.config.Config",
    ]


def lazy_imports_without_a_reason() -> list[str]:
    """Imports inside functions, outside the CLI's dispatch, with no `# lazy:` reason (an
    optional dependency, or start-up time) on their lines or the line above."""
    found = []
    for folder in ("trainer", "parallel", "data", "launch"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and "# lazy:" not in \
                            "".join(lines[inner.lineno - 2:inner.end_lineno]):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    return found


def test_imports_inside_functions_say_why():
    assert lazy_imports_without_a_reason() == []


def megatron_imports_outside_mcore() -> list[str]:
    """Imports of megatron itself anywhere but parallel/mcore.py, which imports it without
    loading torch.compile's machinery."""
    paths = [path for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py"))
             if path != ROOT / "parallel" / "mcore.py"]
    return sorted({f"{path.relative_to(ROOT)}:{line}" for path in paths
                   for line, _ in imported_modules(path, "megatron")})


def test_megatron_core_is_imported_in_one_place():
    assert megatron_imports_outside_mcore() == []


def test_no_module_of_ours_calls_a_collective_torch_deprecates():
    """launch.env.quiet_dependencies hides torch's deprecation warnings for these, which
    DeepSpeed's collectives call: a call of ours would be hidden with them."""
    from tessera.launch.env import DEPRECATED_COLLECTIVES

    deprecated = re.compile(rf"\b({'|'.join(DEPRECATED_COLLECTIVES)})\(")
    calls = [f"{path.relative_to(ROOT)}: {match.group(1)}"
             for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py"))
             for match in deprecated.finditer(path.read_text())]
    assert calls == []


def test_a_rank_starts_without_loading_the_compiler():
    """Importing the trainer (what every rank does first) leaves dynamo and inductor unloaded:
    1.5 s of each rank's start-up that megatron-core's fused kernels would otherwise cost."""
    probe = ("import sys, tessera.trainer.train; "
             "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_wheel_lists_every_package():
    """setuptools packages only what pyproject.toml names: a subpackage left out works in the
    editable install of `make test` and fails to import from a wheel (the GPU machine's)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join([package, *init.parent.relative_to(ROOT / folder).parts])
             for folder, package in PACKAGES.items()
             for init in (ROOT / folder).rglob("__init__.py")}
    assert found == listed, f"pyproject.toml's packages: add {sorted(found - listed)}, " \
                            f"remove {sorted(listed - found)}"
