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


def test_plugin_and_backend_read_class_lines_alike(farslip):
    """The dock's class names (legend, colours, Review) are the backend's: the same separators (full-width
    and ideographic commas too) and the same white space, or the layer's classes would not match."""
    from qgis_farslip.classes import class_name, parse_class_text

    text = ("water;lake\n\u6e56\u6cca\uff0c\u6c34\u4f53\n\u5efa\u7269\u3001\u623f\u5c4b # buildings\n"
            "deep\u00a0 forest ,  woods\n\u0645\u0627\u0621\u060c \u0628\u062d\u064a\u0631\u0629\n")
    lines = parse_class_text(text)
    code = ("import json, sys; from backend.engine.presets import parse_class_lines; "
            "print(json.dumps([[c.name, *c.queries] for c in parse_class_lines(json.load(sys.stdin))]))")
    run = subprocess.run([str(BACKEND_PYTHON), "-c", code], input=json.dumps(lines), capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    backend = json.loads(run.stdout)
    assert [class_name(line) for line in lines] == [entry[0] for entry in backend]
    assert [line.split(", ") for line in lines] == [entry[1:] for entry in backend]
    assert [entry[0] for entry in backend] == ["water", "\u6e56\u6cca", "\u5efa\u7269", "deep forest",
                                               "\u0645\u0627\u0621"]
