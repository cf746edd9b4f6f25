"""The real QGIS desktop under Xvfb: the plugin zip in a fresh profile, one segmentation from the dock.

`qgis --code` runs tests/plugin/desktop_session.py inside the application once it has started;
that script drives the dock as a user would and writes a report and a screenshot
(build/desktop-test.png, ignored by git), then quits QGIS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile

from conftest import BACKEND_COMMAND
from plugin_helpers import NAIP, REPO

SCREENSHOT = REPO / "build" / "desktop-test.png"


def fresh_profile(root, plugin_zip, output_folder) -> None:
    """A QGIS profile with the plugin installed from the zip and enabled, as after "Install from ZIP"."""
    profile = root / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(plugin_zip) as archive:
        archive.extractall(plugins)
    settings = profile / "QGIS" / "QGIS3.ini"
    settings.parent.mkdir(parents=True)
    settings.write_text(
        "[PythonPlugins]\nqgis_farslip=true\n\n"
        "[qgis]\ncheckVersion=false\nshowTips=false\nallowCrashReporting=false\n\n"
        f"[farslip]\nbackend_command={BACKEND_COMMAND}\noutput_folder={output_folder}\nauto_start=true\n",
        encoding="utf-8")


def test_one_segmentation_in_the_real_qgis_desktop(plugin_zip, tiny_model, tmp_path):
    assert shutil.which("qgis") and shutil.which("xvfb-run"), "make test installs qgis and xvfb"
    fresh_profile(tmp_path / "qgis", plugin_zip, tmp_path / "results")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    report = tmp_path / "report.json"
    # A copy: the desktop keeps the statistics it computes for the layer's style in NAME.aux.xml beside it.
    raster = shutil.copy(NAIP, tmp_path / NAIP.name)
    env = dict(os.environ, FARSLIP_DESKTOP_REPORT=str(report), FARSLIP_DESKTOP_SCREENSHOT=str(SCREENSHOT),
               FARSLIP_DESKTOP_RASTER=str(raster), FARSLIP_DESKTOP_MODEL=str(tiny_model),
               FARSLIP_DESKTOP_TESTS=str(REPO / "tests" / "plugin"),
               FARSLIP_HOME=str(tmp_path / "farslip-home"), HF_HUB_OFFLINE="1", FARSLIP_DEVICE="cpu",
               HOME=str(tmp_path / "home"))
    env.pop("QT_QPA_PLATFORM", None)  # the real desktop draws on the X server of xvfb-run
    env.pop("PYTHONPATH", None)       # QGIS must load the plugin from the profile, not from the checkout
    completed = subprocess.run(
        ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--profiles-path", str(tmp_path / "qgis"),
         "--profile", "default", "--nologo", "--noversioncheck", "--code",
         str(REPO / "tests" / "plugin" / "desktop_session.py")],
        env=env, capture_output=True, text=True, timeout=420)
    assert report.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(report.read_text())
    assert "exception" not in result, result["exception"]
    assert result["plugin_file"].startswith(str(tmp_path / "qgis" / "profiles" / "default" / "python"))
    assert result["backend"] == "ready"
    assert result["state"] == "done", result["error"]
    assert result["top_group"] == "FarSLIP results"
    assert result["top_is_result"] and result["top_layer"].startswith("water, grass, road ")
    assert result["renderer"] == "categorizedSymbol"
    assert result["categories"] == ["water", "grass", "road"]
    assert all(0 < alpha < 255 for alpha in result["fill_alpha"])
    assert result["features"] > 0
    assert result["screenshot"] and SCREENSHOT.stat().st_size > 20000
