"""Build dist/qgis_farslip.zip, installable with QGIS's "Install from ZIP".

The zip holds one folder, qgis_farslip/, with the plugin's Python and .ui files,
metadata.txt (its version written from backend/__init__.py, the project's one version
source), LICENSE, resources/ (icons, class presets, the class colour palette) and, with
--wheel (as `make plugin` does), the backend's wheel in wheels/ for the plugin's
"Install backend..." dialog. Standard library only, so it works with any python3.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "qgis_farslip"
RESOURCE_PATTERNS = ("palette.json", "icons/*.svg", "icons/*.png", "presets/*.txt")
METADATA = f"{PACKAGE}/metadata.txt"
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                     "repository", "tracker", "homepage", "category", "icon", "tags", "experimental", "license")


def project_version(root: Path = ROOT) -> str:
    """`__version__` of backend/__init__.py, read without importing the backend (it needs torch)."""
    module = ast.parse((root / "backend" / "__init__.py").read_text(encoding="utf-8"))
    for node in module.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("backend/__init__.py does not set __version__")


def plugin_files(root: Path = ROOT) -> dict[str, Path]:
    """Archive name -> file on disk (metadata.txt is written, not copied: see plugin_metadata)."""
    files: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".ui"):
            files[f"{PACKAGE}/{path.relative_to(root / PACKAGE).as_posix()}"] = path
    for pattern in RESOURCE_PATTERNS:
        for path in sorted((root / "resources").glob(pattern)):
            files[f"{PACKAGE}/resources/{path.relative_to(root / 'resources').as_posix()}"] = path
    files[f"{PACKAGE}/LICENSE"] = root / "LICENSE"
    return files


def plugin_metadata(root: Path = ROOT) -> str:
    """metadata.txt with `version=` set to the project's version."""
    lines = (root / "metadata.txt").read_text(encoding="utf-8").splitlines()
    if any(line.startswith("version=") for line in lines):
        raise SystemExit("metadata.txt sets version=; remove it, the version comes from backend/__init__.py")
    general = lines.index("[general]")
    lines.insert(general + 1, f"version={project_version(root)}")
    return "\n".join(lines) + "\n"


def check_metadata(metadata: str, files: dict[str, Path]) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive (qgisMinimumVersion)
    parser.read_string(metadata)
    missing = [key for key in REQUIRED_METADATA if not parser.get("general", key, fallback="").strip()]
    if missing:
        raise SystemExit(f"metadata.txt lacks {', '.join(missing)}")
    icon = f"{PACKAGE}/{parser.get('general', 'icon')}"
    if icon not in files:
        raise SystemExit(f"metadata.txt names the icon {icon}, which is not in the zip")


def build(out: Path, root: Path = ROOT, wheel: Path | None = None) -> Path:
    files = plugin_files(root)
    if wheel is not None:
        if not wheel.is_file() or wheel.suffix != ".whl":
            raise SystemExit(f"{wheel} is not a wheel file")
        files[f"{PACKAGE}/wheels/{wheel.name}"] = wheel
    metadata = plugin_metadata(root)
    check_metadata(metadata, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".zip.part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in files.items():
            archive.write(path, name)
        archive.writestr(METADATA, metadata)
    partial.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / f"{PACKAGE}.zip")
    parser.add_argument("--wheel", type=Path, help="the backend wheel to ship inside the plugin")
    args = parser.parse_args()
    out = build(args.out, wheel=args.wheel)
    print(f"{out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
