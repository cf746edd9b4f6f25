"""One colour rule: the plugin's layer styles and the backend's class rasters give a class list the same colours."""

from __future__ import annotations

import json
import subprocess

from plugin_helpers import BACKEND_PYTHON, REPO


def backend_colours(class_lists: list[list[str]]) -> list[list[str]]:
    """'#rrggbb' per class as the backend colours its class raster (its own Python: QGIS's has no torch)."""
    code = ("import json, sys; from backend.engine.colours import class_colour_codes; "
            "print(json.dumps([class_colour_codes(names) for names in json.load(sys.stdin)]))")
    run = subprocess.run([str(BACKEND_PYTHON), "-c", code], input=json.dumps(class_lists), capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_plugin_and_backend_colour_every_preset_and_clashing_names_alike(farslip):
    from qgis_farslip.classes import bundled_presets, class_name
    from qgis_farslip.results import class_colours

    class_lists = [[class_name(line) for line in lines] for lines in bundled_presets().values()]
    class_lists += [
        ["water", "lake", "river", "Sea", "pond"],  # one keyword group: later ones move on through the palette
        ["building", "Building roof", "tree", "bare soil", "car", "other"],
        [f"class {i}" for i in range(25)],  # more names than palette colours
        ["Straße", "水体", "forêt"],
    ]
    assert len(class_lists) > 10
    plugin = [[colour.name() for colour in class_colours(names).values()] for names in class_lists]
    assert plugin == backend_colours(class_lists)
    water, lake = plugin[-4][:2]
    assert water == "#1f78b4" and lake != water
