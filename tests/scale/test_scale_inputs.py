"""The inputs of `segment --workers`: files, folders, globs, .txt lists and STAC JSON, expanded in order."""

from __future__ import annotations

import json

import pytest

from backend.engine.errors import InputError
from backend.scale.inputs import expand_inputs


@pytest.fixture
def rasters(tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("b.tif", "a.tif", "c.vrt", "notes.md"):
        (folder / name).write_bytes(b"")
    return folder


def test_a_folder_and_a_glob_give_their_rasters_sorted_and_each_once(rasters):
    assert expand_inputs([rasters]) == [str(rasters / n) for n in ("a.tif", "b.tif", "c.vrt")]
    assert expand_inputs([rasters / "*.tif", rasters / "a.tif"]) == [str(rasters / "a.tif"), str(rasters / "b.tif")]


def test_a_text_list_names_rasters_beside_it_remote_hrefs_become_gdal_paths(rasters, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# my tiles\ntiles/b.tif\n\ns3://bucket/key/x.tif\nhttps://host.example/y.tif\n")
    assert expand_inputs([listing]) == [str(tmp_path / "tiles" / "b.tif"), "/vsis3/bucket/key/x.tif",
                                        "/vsicurl/https://host.example/y.tif"]


def test_stac_items_collections_and_links_give_their_image_assets(rasters, tmp_path):
    item = {"type": "Feature", "id": "one", "assets": {"visual": {"href": "tiles/a.tif"},
                                                      "thumbnail": {"href": "thumb.png"}}}
    (tmp_path / "one.json").write_text(json.dumps(item))
    other = {"type": "Feature", "id": "two",
             "assets": {"B": {"href": "s3://bucket/two.tif", "type": "image/tiff; application=geotiff"}}}
    collection = {"type": "FeatureCollection", "features": [item, other]}
    (tmp_path / "items.json").write_text(json.dumps(collection))
    (tmp_path / "collection.json").write_text(json.dumps(
        {"type": "Collection", "links": [{"rel": "item", "href": "one.json"}, {"rel": "self", "href": "x"}]}))
    a = str(tmp_path / "tiles" / "a.tif")
    assert expand_inputs([tmp_path / "one.json"]) == [a]
    assert expand_inputs([tmp_path / "items.json"]) == [a, "/vsis3/bucket/two.tif"]
    assert expand_inputs([tmp_path / "collection.json"]) == [a]


@pytest.mark.parametrize("given, words", [("missing.tif", "does not exist"), ("empty", "holds no raster"),
                                          ("*.nothing", "matches no raster"), ("bad.json", "not a STAC")])
def test_unusable_inputs_are_named_in_one_sentence(tmp_path, monkeypatch, given, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text(json.dumps({"type": "Catalog"}))
    with pytest.raises(InputError, match=words):
        expand_inputs([given])


def test_a_text_list_saved_with_a_byte_order_mark_names_its_first_raster(rasters, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufefftiles/a.tif\r\ntiles/b.tif\r\n".encode())  # as Windows Notepad saves "UTF-8"
    assert expand_inputs([listing]) == [str(tmp_path / "tiles" / "a.tif"), str(tmp_path / "tiles" / "b.tif")]


def test_one_raster_named_twice_by_a_folder_a_glob_and_another_spelling_is_segmented_once(rasters, monkeypatch):
    monkeypatch.chdir(rasters.parent)
    (rasters.parent / "link.tif").symlink_to(rasters / "a.tif")
    found = expand_inputs(["tiles", "./tiles/*.tif", str(rasters / "a.tif"), "tiles/../tiles/b.tif", "link.tif",
                           "/vsis3/b/k.tif", "/vsis3/b//k.tif"])
    assert found == ["tiles/a.tif", "tiles/b.tif", "tiles/c.vrt", "/vsis3/b/k.tif"]


def test_a_name_with_brackets_or_a_star_that_exists_is_that_file_or_folder(tmp_path):
    folder = tmp_path / "survey [2020]"
    folder.mkdir()
    for name in ("tile [2020].tif", "tile *.tif", "tile 2.tif"):
        (folder / name).write_bytes(b"")
    assert expand_inputs([folder / "tile [2020].tif", folder / "tile *.tif"]) == [
        str(folder / "tile [2020].tif"), str(folder / "tile *.tif")]
    assert len(expand_inputs([folder])) == 3


def test_a_folder_leaves_out_farslips_own_outputs_and_hidden_files(rasters):
    """A class VRT beside its _rasters folder, and what a farslip report there names, are results, not imagery;
    named on their own they are inputs like any file."""
    (rasters / "c_rasters" / "west").mkdir(parents=True)
    (rasters / "c_rasters" / "west" / "a.tif").write_bytes(b"")
    (rasters / "classes.tif").write_bytes(b"")
    (rasters / ".a.tif.farslip-1-x.tmp.tif").write_bytes(b"")
    (rasters / "run.report.json").write_text(json.dumps(  # outputs recorded at their full paths
        {"farslip_version": "1", "outputs": {"vector": str(rasters / "run.gpkg"),
                                             "class_raster": str(rasters / "classes.tif")}}))
    left_out: list[str] = []
    assert expand_inputs([rasters], left_out) == [str(rasters / "a.tif"), str(rasters / "b.tif")]
    assert left_out == [str(rasters / "c.vrt"), str(rasters / "classes.tif")]
    assert expand_inputs([rasters / "*"]) == [str(rasters / "a.tif"), str(rasters / "b.tif")]
    assert expand_inputs([rasters / "**" / "*.tif"]) == [str(rasters / "a.tif"), str(rasters / "b.tif")]
    assert expand_inputs([rasters / "c.vrt"]) == [str(rasters / "c.vrt")]
