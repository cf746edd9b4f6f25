"""Packaging: one version everywhere, shipped code needs only declared dependencies, the zip ships its data."""

from __future__ import annotations

import configparser
import importlib.metadata
import re
import sys
import tomllib
import zipfile
from pathlib import Path

from test_layers import imported_names
from typer.testing import CliRunner

from backend import __version__
from backend.service.cli import app

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
sys.path.insert(0, str(ROOT / "scripts"))
import build_plugin  # noqa: E402 - scripts/ is not a package

SHIPPED = ("backend", "training")  # the wheel's Python packages (resources/ is data)
OWN = {"backend", "training", "resources"}


def distribution_name(requirement: str) -> str:
    """'open_clip_torch>=2.24,<4' -> 'open-clip-torch' (PEP 503 normalised)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_version_is_written_once_and_the_package_the_cli_and_the_plugin_agree(tmp_path):
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "backend.__version__"}
    assert importlib.metadata.version("farslip-qgis") == __version__, "reinstall: pip install -e '.[dev]'"
    assert CliRunner().invoke(app, ["version"]).output.strip() == __version__
    assert not re.search(r"^version\s*=", (ROOT / "metadata.txt").read_text(encoding="utf-8"), re.MULTILINE)
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(zipfile.ZipFile(build_plugin.build(tmp_path / "plugin.zip"))
                         .read("qgis_farslip/metadata.txt").decode("utf-8"))
    assert metadata["general"]["version"] == __version__
    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_shipped_code_imports_only_runtime_dependencies_or_feature_extras():
    runtime = {distribution_name(requirement) for requirement in PYPROJECT["project"]["dependencies"]}
    extras = {distribution_name(requirement)
              for extra, requirements in PYPROJECT["project"].get("optional-dependencies", {}).items()
              if extra != "dev" for requirement in requirements}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for package in SHIPPED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, name in imported_names(path):
                top = name.split(".")[0]
                if not top or top in OWN or top in sys.stdlib_module_names:
                    continue
                provided_by = {distribution_name(dist) for dist in distributions.get(top, [top])}
                if not provided_by & (runtime | extras):
                    undeclared.append(f"{path.relative_to(ROOT)}:{line} imports {top} ({', '.join(provided_by)})")
    assert not undeclared, "declare these in pyproject.toml:\n" + "\n".join(sorted(set(undeclared)))


def test_no_packaged_or_zipped_folder_is_missing():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["resources"]
    for pattern in [*patterns, *build_plugin.RESOURCE_PATTERNS]:
        assert list((ROOT / "resources").glob(pattern)), f"{pattern} matches nothing in resources/"


def test_the_plugin_zip_ships_the_colour_palette_the_backend_reads(tmp_path):
    archive = zipfile.ZipFile(build_plugin.build(tmp_path / "plugin.zip"))
    assert archive.read("qgis_farslip/resources/palette.json") == (ROOT / "resources" / "palette.json").read_bytes()


def test_every_resource_the_backend_reads_ships_in_the_wheel():
    import fnmatch

    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["resources"]
    files = [p.relative_to(ROOT / "resources").as_posix() for p in (ROOT / "resources").rglob("*")
             if p.is_file() and p.suffix != ".md"]
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert missing == [], f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"
