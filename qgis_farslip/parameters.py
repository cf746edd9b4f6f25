"""The parameters of one segmentation, shared by the dock and the Processing algorithm.

Both fill a SegmentParameters from their own widgets or parameters; the request
body and the result layer's name come from here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .classes import class_name
from .filenames import safe_file_stem, unused_stem


# The backend takes a threshold below 1 (at 1 no pixel could be classified); the dock's spin box shows two
# decimals, so 0.99 is the largest both offer.
MAX_THRESHOLD = 0.99


def safe_name(text: str) -> str:
    """A layer name as a file name stem (any script kept, safe on every system)."""
    return safe_file_stem(text, fallback="raster")


@dataclass
class SegmentParameters:
    class_lines: list[str]
    out: str
    raster: str | None = None         # None until a non-file layer has been copied to a GeoTIFF
    model: str | None = None          # a registry name, a checkpoint file or a fine-tuned model folder
    threshold: float = 0.0
    bbox: list[float] | None = None
    bbox_crs: str | None = None
    class_raster: str | None = None
    prob_raster: str | None = None
    overwrite: bool = False
    preset: str | None = None         # only names the result; the class lines are what is sent
    refine: str = "none"              # refine outlines: none, edges or sam
    region_checks: bool = True        # the quality estimate's region checks (a model pass per new polygon)
    bands: list[int] | None = None    # red, green, blue (or one grey band) as the layer shows them
    extra: dict[str, Any] = field(default_factory=dict)

    def request(self) -> dict[str, Any]:
        """The POST /v1/segment body."""
        body: dict[str, Any] = {"class_lines": list(self.class_lines), "model": self.model,
                                "threshold": float(self.threshold), "out": self.out,
                                "class_raster": self.class_raster, "prob_raster": self.prob_raster}
        if self.raster is not None:
            body["raster"] = self.raster
        if self.bbox is not None:
            body["bbox"], body["bbox_crs"] = list(self.bbox), self.bbox_crs
        if self.overwrite:
            body["overwrite"] = True
        if self.refine != "none":
            body["refine"] = self.refine
        if not self.region_checks:
            body["region_checks"] = False
        if self.bands:
            body["bands"] = list(self.bands)
        body.update(self.extra)
        return body

    def class_names(self) -> list[str]:
        return [class_name(line) for line in self.class_lines]


REFINE_CHOICES = ("none", "edges", "sam")


def output_stem(folder: str, layer_name: str, stamp: str) -> str:
    """The path (without extension) of one run's outputs: the raster's name and the time, numbered
    when an earlier run already wrote under that name (two runs in the same second)."""
    return unused_stem(folder, f"{safe_name(layer_name)}_{stamp}")
