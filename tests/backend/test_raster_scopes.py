"""A segment run identifies its raster (hashes its files) once for both of its feature-cache scopes, the
dense crops' and the region checks', and keys them exactly as before: features kept on disk stay valid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from tinymodels import make_tiny_clip, save_plain

from backend.engine import feature_cache
from backend.engine.feature_cache import (FeatureCache, engine_digest, identity_digest, library_versions,
                                          model_identity, raster_identity, raster_scope, raster_scopes)
from backend.engine.models import load_model
from backend.engine.options import SegmentOptions
from backend.engine.quality import REGION_SCOPE
from backend.engine.raster import open_source
from backend.engine.segment import segment_raster


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(save_plain(make_tiny_clip(16), tmp_path_factory.mktemp("m") / "tiny.pt")))


def write_raster(path: Path, size: int = 300) -> Path:
    rgb = np.random.default_rng(0).integers(0, 255, (3, size, size), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 2.0, 2.0)) as ds:
        ds.write(rgb)
    return path


def keyed_as_ever(source, model, attention: str, encoder: str) -> str:
    """A scope as feature_cache writes it (the engine's source since IDENTITY_VERSION 3; its libraries' versions
    and the device since 8 Dec 2026): a change here orphans every cache on disk."""
    return identity_digest({"engine": engine_digest(), "libraries": library_versions(), "device": "cpu",
        "raster": raster_identity(source.path, source.dataset),
        "grid": [source.height, source.width], "scale": source.scale_record, "bands": list(source.bands),
        "value_range": [list(r) for r in source.value_range] if source.value_range else None,
        "palette": getattr(source, "palette", None) is not None, "model": model_identity(model),
        "attention": attention, "encoder": encoder})[:32]


class Recording(FeatureCache):
    """A FeatureCache that remembers the scopes it is asked about."""

    def __init__(self):
        super().__init__()
        self.scopes: set[str] = set()

    def get(self, scope, crop, ndim=None, shape=None, unit=False):
        self.scopes.add(scope)
        return super().get(scope, crop, ndim, shape, unit)

    def put(self, scope, crop, features):
        self.scopes.add(scope)
        super().put(scope, crop, features)


def test_scopes_of_one_identity_are_the_scopes_raster_scope_gives(loaded, tmp_path):
    raster = write_raster(tmp_path / "t.tif")
    variants = [("segearth", "torch"), (REGION_SCOPE, "torch"), ("clearclip", "openvino")]
    with open_source(raster, scale=0.5) as source:
        scopes = raster_scopes(source, loaded, variants)
        assert scopes == [raster_scope(source, loaded, *variant) for variant in variants]
        assert scopes == [keyed_as_ever(source, loaded, *variant) for variant in variants]
        assert len(set(scopes)) == 3
    assert raster_identity(_Remote.path) is None
    assert raster_scopes(_Remote(), loaded, variants) == [""] * 3


class _Remote:
    """A source read through GDAL virtual paths over no file on this machine: nothing is cached."""

    path = "/vsicurl/http://127.0.0.1:9/t.tif"
    dataset = None


def test_a_run_hashes_its_raster_once_and_uses_the_scopes_raster_scope_gives(loaded, tmp_path, monkeypatch):
    raster = write_raster(tmp_path / "t.tif")
    hashed: list[list[Path]] = []
    real = feature_cache.files_sha256
    monkeypatch.setattr(feature_cache, "files_sha256", lambda files: hashed.append(list(files)) or real(files))
    cache = Recording()
    options = SegmentOptions(raster=raster, class_lines=["water", "road"], runtime="torch", out=tmp_path / "r.gpkg")
    result = segment_raster(options, loaded, feature_cache=cache)
    assert hashed == [[raster.resolve()]]
    with open_source(raster) as source:
        dense = raster_scope(source, loaded, "segearth", "torch")
        region = raster_scope(source, loaded, REGION_SCOPE, "torch")
    assert dense in cache.scopes and cache.scopes <= {dense, region}
    assert result.features["encoded"] == result.tiles


def test_region_embeddings_that_torch_computed_for_a_compiled_runtime_are_kept_as_torchs(loaded, tmp_path,
                                                                                          monkeypatch):
    """A compiled runtime whose global path could not be exported runs the region checks on torch; their
    embeddings were kept under that runtime's scope, where a later run whose global path did export found them
    (up to 1e-4 off what it computes itself)."""
    from backend.engine import runtimes

    real = runtimes.BUILDERS["onnxruntime"]

    def dense_only(tower, example, folder, stem="encoder"):
        if stem != "encoder":
            raise RuntimeError("unsupported operator Foo")
        return real(tower, example, folder, stem)

    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(runtimes.BUILDERS, "onnxruntime", dense_only)
    raster = write_raster(tmp_path / "t.tif")
    cache = Recording()
    options = SegmentOptions(raster=raster, class_lines=["water", "road"], runtime="onnxruntime",
                             out=tmp_path / "r.gpkg")
    result = segment_raster(options, loaded, feature_cache=cache)
    assert result.report["encoder"] == "onnxruntime" and result.report["quality"]["region_checks"] > 0
    with open_source(raster) as source:
        dense = raster_scope(source, loaded, "segearth", "onnxruntime")
        regions = {name: raster_scope(source, loaded, REGION_SCOPE, name) for name in ("torch", "onnxruntime")}
    assert cache.scopes == {dense, regions["torch"]}
