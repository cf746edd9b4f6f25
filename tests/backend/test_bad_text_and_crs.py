"""Input a user can type by mistake that once ended in a traceback: a CRS of EPSG: and no whole number, text
that is not UTF-8 (a Latin-1 terminal, a Latin-1 file name: Python's lone surrogates), and a float raster all
NaN without a nodata tag. Each is one sentence (InputError: exit 2, HTTP 400; EmptyResultError: exit 4)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from tinymodels import make_tiny_clip, save_plain

from backend.engine import raster as raster_module
from backend.engine.errors import EmptyResultError, InputError
from backend.engine.files import check_output_files, check_raster_name, check_vector_source
from backend.engine.models import load_model
from backend.engine.options import check_typed_text
from backend.engine.presets import check_class_line
from backend.engine.raster import open_source, parse_crs
from backend.engine.search import search_raster, sentence_scores
from backend.engine.search_queries import SearchOptions, validate_search_options
from backend.engine.search_index import open_index

LATIN1 = os.fsdecode(b"r\xe9")  # 'r\udce9': the name Python reads from the bytes of a Latin-1 'ré'


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = save_plain(make_tiny_clip(seed=3, vision_width=64), tmp_path_factory.mktemp("model") / "tiny.pt")
    return load_model(str(path), device="cpu")


def float_raster(path: Path, data: np.ndarray, nodata: float | None = None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype="float32", nodata=nodata, crs="EPSG:32633",
                       transform=Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0)) as dst:
        dst.write(data.astype(np.float32))
    return path


# --------------------------------------------------------------------------- a CRS the user typed

@pytest.mark.parametrize("text", ["EPSG:x", "EPSG:4326.5", "EPSG:abc", "EPSG:1e3", "EPSG:" + os.fsdecode(b"\xe9"),
                                  os.fsdecode(b"\xe9"), "+proj=" + os.fsdecode(b"\xe9"), "EPSG:4326\x00"])
@pytest.mark.parametrize("what", ["bbox CRS", "like CRS", "--out-crs"])
def test_a_crs_of_epsg_and_no_whole_number_is_the_sentence_of_any_unknown_crs(text, what):
    with pytest.raises(InputError) as garbage:
        parse_crs("garbage", CRS(), what)
    with pytest.raises(InputError) as typed:
        parse_crs(text, CRS(), what)
    assert str(typed.value) == str(garbage.value).replace("'garbage'", repr(text))
    assert str(typed.value).startswith(f"The {what} ") and "is not a CRS I know" in str(typed.value)


def test_a_crs_that_is_one_is_still_read():
    assert parse_crs("EPSG:4326", CRS()) == CRS.from_epsg(4326)
    assert parse_crs(None, CRS.from_epsg(32633)) == CRS.from_epsg(32633)


@pytest.mark.parametrize(("typed", "meant"), [(26914, "EPSG:26914"), ("26914", "EPSG:26914"), (" 4326 ", "EPSG:4326"),
                                              ("CRS84", "OGC:CRS84"), ("crs84", "OGC:CRS84"),
                                              ("OGC:CRS84", "OGC:CRS84"), ("EPSG:7405", "EPSG:7405")])
def test_an_epsg_code_alone_and_crs84_are_crss(typed, meant):
    """An EPSG code alone (as a number from JSON, or digits) and CRS84 were 'not a CRS I know'; a compound CRS
    (British National Grid + ODN height) has a horizontal part and stays one."""
    assert parse_crs(typed, CRS()) == CRS.from_user_input(meant)


@pytest.mark.parametrize(("text", "kind"), [("EPSG:5703", "a vertical CRS"), ("EPSG:4978", "a geocentric CRS"),
                                            (5703, "a vertical CRS")])
@pytest.mark.parametrize("what", ["bbox CRS", "like CRS", "--out-crs"])
def test_a_crs_without_horizontal_coordinates_is_refused_as_such(text, kind, what):
    """A vertical or geocentric CRS was read, and the bbox then 'did not overlap the raster'."""
    with pytest.raises(InputError) as refused:
        parse_crs(text, CRS.from_epsg(26914), what)
    said = str(refused.value)
    assert said.startswith(f"The {what} {str(text)!r} is {kind} (") and "not a horizontal 2-D CRS" in said
    assert "overlap" not in said


# --------------------------------------------------------------------------- text that is not UTF-8

@pytest.mark.parametrize("text, byte", [(os.fsdecode(b"eau\xe9"), "the byte 0xe9 is not UTF-8"),
                                        ("lake \ud800", "the lone surrogate U+D800")])
def test_text_that_is_not_utf8_is_refused_by_the_rules_of_typed_text(text, byte):
    with pytest.raises(InputError) as refused:
        check_typed_text(text, "The search sentence", 2000)
    said = str(refused.value)
    assert said.startswith(f"The search sentence {text!r} is not valid UTF-8 text (") and byte in said
    assert "set it to UTF-8" in said
    said.encode("utf-8")  # the sentence itself prints and travels as JSON (the text is quoted by repr)
    with pytest.raises(InputError, match="is not valid UTF-8 text"):
        check_class_line(f"water, {text}")
    with pytest.raises(InputError, match=r"^--keywords .* is not valid UTF-8 text"):
        validate_search_options(SearchOptions(["a lake"], keywords=[text]))
    with pytest.raises(InputError, match=r"^The search sentence .* is not valid UTF-8 text"):
        validate_search_options(SearchOptions([text]))


def test_accented_text_in_utf8_is_still_text():
    check_typed_text("água, forêt, 湖", "The class line", 200)


def test_a_raster_really_named_in_latin1_is_one_sentence(tmp_path):
    """rasterio/GDAL take no such name (UnicodeEncodeError in rasterio.open): refused before, by name."""
    path = tmp_path / f"{LATIN1}.tif"
    os.rename(float_raster(tmp_path / "r.tif", np.ones((3, 8, 8))), path)  # GDAL cannot write it under that name
    assert path.exists()  # Python reaches the file; GDAL cannot
    with pytest.raises(InputError) as refused:
        check_raster_name(str(path))
    said = str(refused.value)
    assert said.startswith(f"The raster path {str(path)!r} is not valid UTF-8 text (the byte 0xe9 is not UTF-8): "
                           "GDAL opens only files named in UTF-8.")
    with pytest.raises(InputError, match="is not valid UTF-8 text"):
        open_source(str(path))
    with pytest.raises(InputError, match=r"^The labels file path .* is not valid UTF-8 text"):
        check_vector_source(tmp_path / f"{LATIN1}.gpkg", "labels")


def test_an_output_named_in_latin1_is_one_sentence(tmp_path):
    with pytest.raises(InputError) as refused:
        check_output_files({"polygon output": tmp_path / f"{LATIN1}.gpkg"})
    assert str(refused.value).startswith(f"The polygon output path {str(tmp_path / f'{LATIN1}.gpkg')!r} is not "
                                         "valid UTF-8 text (the byte 0xe9 is not UTF-8)")
    assert not list(tmp_path.iterdir())


def test_a_relative_name_in_a_working_folder_named_in_latin1_is_one_sentence(tmp_path, monkeypatch):
    folder = tmp_path / LATIN1
    (tmp_path / "r").mkdir()
    float_raster(tmp_path / "r" / "a.tif", np.ones((3, 8, 8)))
    os.rename(tmp_path / "r", folder)
    monkeypatch.chdir(folder)
    with pytest.raises(InputError, match=r"^The working folder .* where the raster 'a.tif' is, is not valid UTF-8"):
        check_raster_name("a.tif")
    with pytest.raises(InputError, match=r"^The working folder .* where the polygon output 'o.gpkg' is, is not valid"):
        check_output_files({"polygon output": "o.gpkg"})


# --------------------------------------------------------------------------- a float raster of NaN only

@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_a_float_raster_of_nan_without_a_nodata_tag_has_nothing_to_index(fill, tmp_path):
    """NaN is never a valid pixel: the sample of the whole raster (read for the stretch) says so whether or not
    a nodata value is set. (With segment's --value-range the raster is not sampled; its reads refuse it.)"""
    path = float_raster(tmp_path / "allnan.tif", np.full((3, 64, 64), fill))
    with pytest.raises(EmptyResultError) as empty:
        open_source(str(path), task="index or search")
    assert str(empty.value).startswith(f"{path} holds only nodata or masked pixels (or NaN): there is nothing to "
                                       "index or search.")


def test_a_float_raster_with_some_nan_is_read_with_its_nan_masked(tmp_path):
    data = np.random.default_rng(0).random((3, 64, 64)) * 100
    data[:, :, :40] = np.nan
    path = float_raster(tmp_path / "somenan.tif", data)
    with open_source(str(path)) as source:
        assert source.value_range is not None and all(np.isfinite(v).all() for v in source.value_range)


def test_search_and_index_of_a_nan_raster_exit_4_not_a_traceback_or_an_empty_file(loaded, tmp_path):
    path = float_raster(tmp_path / "allnan.tif", np.full((3, 300, 300), np.nan))
    for use_keywords in (True, False):  # with the keyword rule (a reshape of no window), without (an empty file)
        with pytest.raises(EmptyResultError, match="nothing to index or search"):
            with open_index(path, loaded) as index:
                search_raster(index, SearchOptions(["a lake"], use_keywords=use_keywords), tmp_path / "hits.gpkg")
    assert not (tmp_path / "hits.gpkg").exists()


def test_an_index_whose_windows_all_hold_no_valid_pixel_is_refused(loaded, tmp_path, monkeypatch):
    """The sample can see a valid pixel that no window holds: the build itself then says there is nothing."""
    path = float_raster(tmp_path / "allnan.tif", np.full((3, 300, 300), np.nan))
    monkeypatch.setattr(raster_module, "_sample", lambda ds, bands, values=True: (
        None if not values else np.ones((len(set(bands)), 8, 8), np.float32), np.ones((8, 8), bool)))
    with open_index(path, loaded) as index:
        with pytest.raises(EmptyResultError, match="nothing to index or search"):
            index.ensure()
        with pytest.raises(EmptyResultError, match="nothing to index or search"):  # the empty rows, read again
            index.ensure()
        with pytest.raises(EmptyResultError, match="nothing to index or search"):
            search_raster(index, SearchOptions(["a lake"]), tmp_path / "hits.gpkg")
    assert not (tmp_path / "hits.gpkg").exists()


def test_keyword_scores_of_no_window_are_no_scores():
    scores = sentence_scores(np.zeros((0, 6, 8), np.float32), np.ones(8, np.float32), np.ones((2, 8), np.float32))
    assert scores.shape == (0,)
