"""A mistyped file name or class list is said before the model's libraries load. `farslip segment nosuch.tif`
took 7 s to say the file does not exist (torch and open_clip were imported first, for the device and the class
list), `farslip index|search|classify nosuch.tif` loaded the model before they looked at the raster (8-9 s, or
"the weights are not on this computer" instead of the missing file), and a run on Ray imported Ray first.
A mistyped --model took 8-10 s in every command, as long as a run needs to import torch and open_clip.
`train` and `evaluate` took 8-11 s to say a labels file was missing (their checks of the options and outputs lived
in modules that import torch), and said a missing raster only once the model had loaded. Each of these commands
now checks its options, outputs, labels, raster and class list with rasterio and pyogrio alone, then imports the
rest.

The program runs as `farslip` does, and says at its exit whether torch, open_clip or Ray were imported: a
refusal that imports none of them cannot have waited for them (no wall-clock figure is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
NAIP = DATA / "naip_2020_5m.tif"
LABELS = DATA / "solaris_geotiff_labels.geojson"  # its class field: building
HEAVY = ("torch", "open_clip", "ray")

# The console script's own entry point, then which of HEAVY are imported at exit (printed after a marker).
RUN = """
import atexit, json, sys
atexit.register(lambda: print("IMPORTED " + json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr))
sys.argv = ["farslip", *sys.argv[1:]]
from backend.service.launch import main
main()
"""


def farslip(tmp_path: Path, *args: str) -> tuple[int, str, list[str]]:
    env_home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-c", RUN.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FARSLIP_HOME": str(env_home),
                               "FARSLIP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    said, _, imported = done.stderr.rpartition("IMPORTED ")
    assert "Traceback" not in said, said
    return done.returncode, " ".join(said.split()), json.loads(imported)


CASES = {
    "segment, a missing raster": (["segment", "nosuch.tif", "--classes", "building"],
                                  "The raster nosuch.tif does not exist."),
    "segment, a class given twice": (["segment", str(NAIP), "--classes", "road", "--classes", "Road"],
                                     "The class 'Road' is given twice"),
    "segment on Ray, a missing raster": (["segment", "nosuch.tif", "--classes", "building", "--workers", "2"],
                                         "The input nosuch.tif does not exist."),
    "segment on Ray, a class given twice": (["segment", str(NAIP), "--classes", "road", "--classes", "ROAD",
                                             "--workers", "2"], "The class 'ROAD' is given twice"),
    "index, a missing raster": (["index", "nosuch.tif"], "The raster nosuch.tif does not exist."),
    "search, a missing raster": (["search", "nosuch.tif", "a red roof"], "The raster nosuch.tif does not exist."),
    "search, an empty sentence": (["search", str(NAIP), " "], "The search sentence is empty"),
    "search, --keywords without a sentence": (["search", str(NAIP), "--keywords", "roof", "--like", "1", "2"],
                                              "--keywords gives the keywords of the search sentences"),
    "classify, a missing raster": (["classify", "nosuch.tif", "--classes", "field"],
                                   "The raster nosuch.tif does not exist."),
    "classify, a class given twice": (["classify", str(NAIP), "--classes", "field", "--classes", "Field"],
                                      "The class 'Field' is given twice"),
    "train, a missing labels file": (["train", str(NAIP), "nosuch.gpkg", "--class-field", "building", "--out", "m"],
                                     "The labels file nosuch.gpkg does not exist."),
    "train without --out, a missing labels file": (["train", str(NAIP), "nosuch.gpkg", "--class-field", "building"],
                                                   "The labels file nosuch.gpkg does not exist."),
    "train, a missing raster": (["train", "nosuch.tif", str(LABELS), "--class-field", "building", "--out", "m"],
                                "The raster nosuch.tif does not exist."),
    "train, a class field the labels lack": (["train", str(NAIP), str(LABELS), "--class-field", "kind", "--out", "m"],
                                             f"The labels file {LABELS.name} has no field 'kind'"),
    "train, an option out of range": (["train", str(NAIP), str(LABELS), "--class-field", "building", "--out", "m",
                                       "--epochs", "0"], "--epochs must be a whole number from 1 to 10000; got 0."),
    "train, a --json folder that is not there": (["train", str(NAIP), str(LABELS), "--class-field", "building",
                                                  "--out", "m", "--json", "nosuch/r.json"],
                                                 "The output folder nosuch does not exist"),
    "evaluate, a missing labels file": (["evaluate", str(NAIP), "nosuch.gpkg", "--class-field", "building"],
                                        "The labels file nosuch.gpkg does not exist."),
    "evaluate, a missing raster": (["evaluate", "nosuch.tif", str(LABELS), "--class-field", "building"],
                                   "The raster nosuch.tif does not exist."),
    "evaluate, a class field the labels lack": (["evaluate", str(NAIP), str(LABELS), "--class-field", "kind"],
                                                f"The labels file {LABELS.name} has no field 'kind'"),
    "evaluate, a blank --class-name": (["evaluate", str(NAIP), str(LABELS), "--class-field", "building",
                                        "--class-name", "yes="], "--class-name takes VALUE=NAME with both parts"),
    "evaluate, --split validation of a model no training wrote": (
        ["evaluate", str(NAIP), str(LABELS), "--class-field", "building", "--split", "validation", "--model",
         "clip-vit-b-16"], "--split validation scores the held-out strip that farslip train kept aside"),
}
# A mistyped model name or weights file (exit 3, a model error) took 8-10 s to be said by every command.
MODEL_CASES = {
    "segment, a mistyped model name": (["segment", str(NAIP), "-c", "road", "--model", "farslip2-vit-b16"],
                                       "Unknown model 'farslip2-vit-b16'. Known models: farslip2-vit-b-16"),
    "segment on Ray, a mistyped model name": (["segment", str(NAIP), "-c", "road", "--model", "farslip2-vit-b16",
                                               "--workers", "2"], "Unknown model 'farslip2-vit-b16'."),
    "segment, a missing weights file": (["segment", str(NAIP), "-c", "road", "--weights", "/nosuch/w.pt"],
                                        "The weights file /nosuch/w.pt does not exist."),
    "index, a mistyped model name": (["index", str(NAIP), "--model", "clip-vit-b16"], "Unknown model 'clip-vit-b16'."),
    "search, a mistyped model name": (["search", str(NAIP), "a red roof", "--model", "farslip-vit-b16"],
                                      "Unknown model 'farslip-vit-b16'."),
    "search, a missing weights file": (["search", str(NAIP), "a red roof", "--weights", "/nosuch/w.pt"],
                                       "The weights file /nosuch/w.pt does not exist."),
    "classify, a mistyped model name": (["classify", str(NAIP), "-c", "field", "--model", "x"], "Unknown model 'x'."),
    "train, a base model that is not there": (["train", str(NAIP), str(LABELS), "--class-field", "building", "--out",
                                               "m", "--base-model", ""], "--base-model is empty"),
    "evaluate, a mistyped model name": (["evaluate", str(NAIP), str(LABELS), "--class-field", "building", "--model",
                                         "x"], "Unknown model 'x'."),
}


@pytest.mark.parametrize("case", [*CASES, *MODEL_CASES])
def test_a_mistyped_input_is_refused_before_torch_open_clip_or_ray_is_imported(tmp_path, case):
    args, sentence = CASES[case] if case in CASES else MODEL_CASES[case]
    code, said, imported = farslip(tmp_path, *args)
    assert code == (2 if case in CASES else 3), said
    assert said.startswith(f"Error: {sentence}"), said
    assert imported == [], f"{case}: refused only after importing {imported}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused run writes nothing"


def test_a_run_that_passes_the_checks_goes_on_to_the_model(tmp_path):
    """The same program with good inputs and a registry model whose weights are not on this computer (and no
    network): the checks pass, torch and open_clip load and the weights are looked for, so the probe above does
    see the imports a run makes."""
    code, said, imported = farslip(tmp_path, "segment", str(NAIP), "--classes", "road", "--model", "clip-vit-b-16",
                                   "--out", "out.gpkg")
    assert code == 3 and "clip-vit-b-16" in said and "weights" in said, said
    assert {"torch", "open_clip"} <= set(imported), imported
