"""Build dist/qgis_farslip.zip, installable with QGIS's "Install from ZIP".

The zip holds one folder, qgis_farslip/, with the plugin's Python and .ui files,
metadata.txt, LICENSE, resources/ (icons, class presets, QML styles) and, with
--wheel (as `make plugin` does), the backend's wheel in wheels/ for the plugin's
"Install backend..." dialog. Standard library only, so it works with any python3.
"""

from __future__ import annotations

import argparse
import configparser
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "qgis_farslip"
RESOURCE_PATTERNS = ("icons/*.svg", "icons/*.png", "presets/*.txt", "styles/*.qml")
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                     "repository", "tracker", "homepage", "category", "icon", "tags", "experimental", "license")


def plugin_files(root: Path = ROOT) -> dict[str, Path]:
    """Archive name -> file on disk."""
    files: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".ui"):
            files[f"{PACKAGE}/{path.relative_to(root / PACKAGE).as_posix()}"] = path
    for pattern in RESOURCE_PATTERNS:
        for path in sorted((root / "resources").glob(pattern)):
            files[f"{PACKAGE}/resources/{path.relative_to(root / 'resources').as_posix()}"] = path
    files[f"{PACKAGE}/metadata.txt"] = root / "metadata.txt"
    files[f"{PACKAGE}/LICENSE"] = root / "LICENSE"
    return files


def check_metadata(files: dict[str, Path]) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive (qgisMinimumVersion)
    parser.read(files[f"{PACKAGE}/metadata.txt"], encoding="utf-8")
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
    check_metadata(files)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".zip.part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in files.items():
            archive.write(path, name)
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
