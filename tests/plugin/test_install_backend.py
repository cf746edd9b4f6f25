"""'Install backend...': a venv of its own from the wheel inside the plugin zip, then the backend starts.

Runs the real dialog code path into a temporary HOME: python -m venv, pip install of the
backend wheel (--no-deps: the test borrows the dependencies of the dev venv through a .pth
file instead of downloading PyTorch), the check step, and the start of the installed backend.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from plugin_helpers import BACKEND_PYTHON, REPO, wait_until

sys.path.insert(0, str(REPO / "scripts"))


def dev_venv_base_python() -> str:
    """The interpreter the dev venv was made from (same version, so its packages can be borrowed)."""
    config = dict(line.split(" = ", 1) for line in (REPO / ".venv" / "pyvenv.cfg").read_text().splitlines()
                  if " = " in line)
    version = ".".join(config["version"].split(".")[:2])
    return str(Path(config["home"]) / f"python{version}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([str(BACKEND_PYTHON), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(folder), str(REPO)], check=True, cwd=REPO)
    return next(folder.glob("farslip_qgis-*.whl"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_make_plugin_ships_the_backend_wheel_inside_the_zip(wheel, tmp_path):
    import build_plugin

    zip_path = build_plugin.build(tmp_path / "qgis_farslip.zip", wheel=wheel)
    names = zipfile.ZipFile(zip_path).namelist()
    assert f"qgis_farslip/wheels/{wheel.name}" in names
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "plugins")
    code = "import qgis_farslip.installer as i; print(i.bundled_wheel())"
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "plugins", capture_output=True,
                           text=True, check=True).stdout.strip()
    assert found == str(tmp_path / "plugins" / "qgis_farslip" / "wheels" / wheel.name)


def test_pythons_found_are_recent_and_the_cpu_build_uses_the_cpu_index(farslip):
    from qgis_farslip.installer import CPU, InstallPlan, find_pythons

    pythons = find_pythons()
    assert pythons and all(version >= (3, 10) for _, version in pythons)
    plan = InstallPlan(python="python3", venv="/v", wheel="/w.whl", torch_build=CPU)
    install = plan.steps()[1][2]
    assert install[install.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert install[-1] == "/w.whl"


def test_install_backend_creates_the_venv_in_home_installs_the_wheel_and_starts_it(
        farslip, wheel, home, plugin_settings, backend_home, qgis_iface):
    from qgis_farslip.backend_manager import BackendManager
    from qgis_farslip.installer_dialog import InstallerDialog

    dialog = InstallerDialog(wheel=str(wheel))
    assert dialog.folderWidget.filePath() == str(home / ".farslip" / "venv")
    dialog.pythonCombo.setEditText(dev_venv_base_python())
    dialog.pythonCombo.setCurrentIndex(-1)
    dialog.pythonCombo.setEditText(dev_venv_base_python())
    dialog.pip_args = ["--no-deps"]
    states = []
    dialog.finishedWith.connect(states.append)
    dialog.start()
    wait_until(lambda: states, 240, "the installation to finish")
    log = dialog.logView.toPlainText()
    assert states == ["done"], log
    venv = home / ".farslip" / "venv"
    assert dialog.installed_command == str(venv / "bin" / "farslip")
    assert (venv / "bin" / "farslip").is_file()
    assert "Creating the environment" in log and "FarSLIP backend 0." in log
    assert dialog.progressBar.value() == dialog.progressBar.maximum()

    # Borrow the dev venv's packages (instead of downloading PyTorch), then start the installed backend.
    site = next((venv / "lib").glob("python3.*/site-packages"))
    dev_site = next((REPO / ".venv" / "lib").glob("python3.*/site-packages"))
    (site / "borrowed-deps.pth").write_text(str(dev_site.resolve()) + "\n")
    plugin_settings(backend_command=dialog.installed_command)
    manager = BackendManager(connection_file=str(home / "backend.json"))
    try:
        manager.ensure()
        wait_until(lambda: manager.state in ("ready", "failed"), 150, "the installed backend to start")
        assert manager.state == "ready", manager.message
        assert manager.process.program() == dialog.installed_command
    finally:
        manager.stop()


def test_cancel_stops_the_install_and_removes_the_half_made_venv(farslip, wheel, home):
    from qgis_farslip.installer_dialog import InstallerDialog

    dialog = InstallerDialog(wheel=str(wheel))
    states = []
    dialog.finishedWith.connect(states.append)
    dialog.start()
    assert dialog.state == "running" and dialog.cancelButton.isEnabled()
    dialog.cancel()
    assert states == ["cancelled"]
    assert not (home / ".farslip" / "venv").exists()
    assert "Cancelled" in dialog.statusLabel.text()
    assert dialog.installButton.isEnabled()


def test_a_non_empty_folder_is_refused_with_a_sentence(farslip, wheel, home):
    from qgis_farslip.installer_dialog import InstallerDialog

    (home / "busy").mkdir()
    (home / "busy" / "file.txt").write_text("x")
    dialog = InstallerDialog(wheel=str(wheel))
    dialog.folderWidget.setFilePath(str(home / "busy"))
    dialog.start()
    assert dialog.state == "" and "is not empty" in dialog.statusLabel.text()
