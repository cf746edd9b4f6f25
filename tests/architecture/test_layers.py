"""The layering rules of docs/ARCHITECTURE.md, checked over the source's imports (every `import` and
`from ... import`, at any depth, including those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# layer -> top-level names (or dotted prefixes) its modules must never import
FORBIDDEN = {
    "backend/engine": ["typer", "fastapi", "starlette", "uvicorn", "httpx", "requests", "ray", "training",
                       "backend.service", "http", "urllib.request"],
    "training": ["typer", "fastapi", "starlette", "uvicorn", "httpx", "requests", "backend.service", "http"],
    "backend/scale": ["typer", "fastapi", "starlette", "uvicorn", "httpx", "requests", "training",
                      "backend.service", "http", "urllib.request"],
    "backend/service": [],
    "qgis_farslip": ["backend", "training", "torch", "numpy", "rasterio", "open_clip"],
}


def imported_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append((node.lineno, module))
            names += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return names


def violations(layer: str) -> list[str]:
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, name in imported_names(path):
            for banned in FORBIDDEN[layer]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({layer} may not import {banned})")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    assert (ROOT / layer).is_dir(), f"layer folder {layer} is missing"
    assert violations(layer) == []


def test_only_the_service_layer_imports_training() -> None:
    importers = {str(path.relative_to(ROOT)) for layer in ("backend/engine", "backend/scale", "qgis_farslip")
                 for path in (ROOT / layer).rglob("*.py")
                 if any(name == "training" or name.startswith("training.") for _, name in imported_names(path))}
    assert importers == set()


def test_ray_is_imported_only_inside_functions_of_the_scale_layer() -> None:
    """A single-process `segment` must not pay for (or need) Ray: no module-level `import ray` anywhere."""
    top_level = []
    for path in sorted((ROOT / "backend").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            top_level += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "ray"]
    assert top_level == []


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from training import api\n    import typer\n")
    assert [name for _, name in imported_names(bad)] == ["training", "training.api", "typer"]


def test_the_repository_tracks_no_virtual_environment_or_weights() -> None:
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert [p for p in tracked if p.split("/")[0] in (".venv", ".venv-qgis")] == []
    assert [p for p in tracked if p.endswith((".pt", ".pth", ".safetensors", ".ckpt"))] == []
