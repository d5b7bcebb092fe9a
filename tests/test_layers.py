"""Architecture rules that keep the library usable without Ray or HTTP."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_LIBRARY = {"ray", "fastapi", "starlette", "uvicorn", "mlflow", "pipelines", "serve"}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_library_never_imports_ray_http_or_upper_layers():
    offenders = {
        str(p.relative_to(REPO)): sorted(_imported_roots(p) & FORBIDDEN_IN_LIBRARY)
        for p in (REPO / "radjepa").rglob("*.py")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"radjepa/ must stay free of Ray/HTTP/upper layers: {offenders}"


def test_library_imports_without_ray_installed_behaviour():
    # importing every library module must not pull ray in transitively
    code = (
        "import importlib, pkgutil, sys, radjepa\n"
        "for m in pkgutil.walk_packages(radjepa.__path__, 'radjepa.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'fastapi'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cli_help_is_instant():
    exe = Path(sys.executable).with_name("radjepa")
    cmd = (
        [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "pipelines.cli", "--help"]
    )
    subprocess.run(cmd, check=True, capture_output=True)  # warm the bytecode cache
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert time.perf_counter() - start < 2.0
    assert "radjepa" in out.stdout.lower()
