"""Install the FarSLIP backend from the wheel shipped in the plugin zip into a venv of its own.

QGIS's Python is never touched: a suitable Python found on the computer makes a
fresh virtual environment (default ~/.farslip/venv, where the plugin looks for
the backend), pip installs the bundled wheel there, and PyTorch comes from the
package index in its CPU or CUDA build.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

MIN_PYTHON = (3, 10)
PYTHON_NAMES = ("python3.13", "python3.12", "python3.11", "python3.10", "python3", "python")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu124"  # Linux's PyPI torch has CUDA already
CPU, CUDA = "cpu", "cuda"
# Variables QGIS sets for its own Python, GDAL and PROJ; the backend's venv brings its own.
FOREIGN_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PROJ_LIB", "PROJ_DATA", "GDAL_DATA",
               "GDAL_DRIVER_PATH", "QGIS_PREFIX_PATH")
# ... and those that would make venv or pip act on another environment than the one being made.
INSTALL_FOREIGN_ENV = (*FOREIGN_ENV, "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
# A console program started from QGIS (a GUI program) on Windows opens a console window unless told not to.
CREATE_NO_WINDOW = 0x08000000  # subprocess.CREATE_NO_WINDOW, which exists on Windows only


def install_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The environment of every program the installer runs (the Python probe and the install steps): QGIS's
    own Python, GDAL and PROJ variables and any active venv's removed (Windows spells names in any case)."""
    def key(name: str) -> str:
        return name.upper() if sys.platform == "win32" else name

    foreign = {key(name) for name in INSTALL_FOREIGN_ENV}
    cleaned = {name: value for name, value in environment.items() if key(name) not in foreign}
    cleaned["PYTHONUNBUFFERED"] = "1"
    return cleaned


def default_venv() -> str:
    return os.path.join(os.path.expanduser("~"), ".farslip", "venv")


def venv_bin(venv: str, name: str) -> str:
    folder = os.path.join(venv, "Scripts" if sys.platform == "win32" else "bin")
    return os.path.join(folder, name + (".exe" if sys.platform == "win32" else ""))


def bundled_wheel() -> str | None:
    """The backend wheel inside the installed plugin (qgis_farslip/wheels/), newest name last."""
    here = os.path.dirname(os.path.realpath(__file__))
    found = sorted(glob.glob(os.path.join(here, "wheels", "farslip_qgis-*.whl")))
    return found[-1] if found else None


def qgis_python_prefixes() -> set[str]:
    """Where QGIS's own Python lives: a venv made from it could see QGIS's packages on some systems."""
    return {os.path.realpath(prefix) for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix)}


def python_version(path: str) -> tuple[int, int] | None:
    """(major, minor) of an interpreter that has venv and ensurepip, else None."""
    try:
        output = subprocess.run(
            [path, "-c", "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=20, check=True, env=install_environment(os.environ),
            creationflags=CREATE_NO_WINDOW if sys.platform == "win32" else 0).stdout.strip()
        major, minor = output.split(".")
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def find_pythons() -> list[tuple[str, tuple[int, int]]]:
    """Interpreters (>= 3.10, with venv) on this computer, newest first, QGIS's own one last."""
    seen, found = set(), []
    for name in PYTHON_NAMES:
        path = shutil.which(name)
        if not path or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        version = python_version(path)
        if version and version >= MIN_PYTHON:
            found.append((path, version))
    qgis_prefixes = qgis_python_prefixes()

    def rank(item):
        is_qgis = any(os.path.realpath(item[0]).startswith(prefix + os.sep) for prefix in qgis_prefixes)
        return (is_qgis, tuple(-part for part in item[1]))

    return sorted(found, key=rank)


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


@dataclass
class InstallPlan:
    python: str
    venv: str
    wheel: str
    torch_build: str = CPU
    pip_args: list[str] = field(default_factory=list)  # e.g. --no-deps, --find-links for offline installs

    def torch_index_args(self) -> list[str]:
        if self.torch_build == CPU:
            # The CPU index's '2.x+cpu' wheels satisfy the wheel's 'torch==2.x' and sort above PyPI's.
            return ["--extra-index-url", TORCH_CPU_INDEX]
        return ["--extra-index-url", TORCH_CUDA_INDEX] if sys.platform == "win32" else []

    def steps(self) -> list[tuple[str, str, list[str]]]:
        """(what the user reads, program, arguments) in order."""
        python = venv_bin(self.venv, "python")
        return [
            (f"Creating the environment {self.venv}", self.python, ["-m", "venv", self.venv]),
            ("Installing the FarSLIP backend and its packages (PyTorch is large: this can take minutes)",
             python, ["-m", "pip", "install", "--disable-pip-version-check", *self.torch_index_args(),
                      *self.pip_args, self.wheel]),
            ("Checking the installed backend", python,
             ["-c", "import backend, sys; print('FarSLIP backend', backend.__version__, 'in', sys.prefix)"]),
        ]

    def backend_command(self) -> str:
        return venv_bin(self.venv, "farslip")
