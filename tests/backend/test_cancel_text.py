"""A cancel reaches a run while its class text is encoded: 250 classes of synonyms encode for minutes on a
CPU, and the server's cancel (and its SIGTERM) waited for all of them before the first crop asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.engine.errors import CancelledError
from backend.engine.models import load_model
from backend.engine.options import SegmentOptions
from backend.engine.segment import segment_raster
from backend.engine.text import TextEmbedder

SAMPLE = Path(__file__).resolve().parents[2] / "resources" / "sample" / "naip_2020_5m_crop.tif"
CLASSES = [f"class number {i}, synonym {i}" for i in range(40)]  # 80 queries


class CancelAfter:
    """should_cancel() that says yes from its `calls`-th question on, and counts the questions."""

    def __init__(self, calls: int):
        self.calls, self.asked = calls, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked >= self.calls


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(str(tiny_model), device="cpu")


def test_segment_stops_between_queries_and_writes_nothing(loaded, tmp_path):
    classes = [line.replace("number", tmp_path.name) for line in CLASSES]  # never encoded before
    cancel = CancelAfter(5)
    options = SegmentOptions(raster=SAMPLE, class_lines=classes, out=tmp_path / "o.gpkg",
                             class_raster=tmp_path / "o.tif")
    with pytest.raises(CancelledError, match="cancelled; nothing was written"):
        segment_raster(options, loaded, should_cancel=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # Asked before each query: four of the 80 were encoded (and kept in the text cache), then it stopped.
    queries = [name.strip() for line in classes for name in line.split(",")]
    cached = TextEmbedder(loaded)._cache_file
    assert sum(path.exists() for path in map(cached, queries) if path is not None) == 4


def test_queries_known_already_are_not_a_reason_to_ask(loaded, tmp_path):
    embedder = TextEmbedder(loaded, cache=tmp_path / "text", should_cancel=CancelAfter(10**6))
    embedder.embed(["water", "forest"])
    asked = embedder.should_cancel.asked
    embedder.embed(["water", "forest", "water"])
    assert embedder.should_cancel.asked == asked == 2
