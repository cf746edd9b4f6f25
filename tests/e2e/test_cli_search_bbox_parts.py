"""search and index --bbox use the box's parts, never their envelope: a box across the antimeridian of a world
raster searches and embeds the windows over its two strips, at the raster's west and east edges, not the whole
width between them."""

from __future__ import annotations


import shapely

from cli_rasters import MODEL_ARGS, STRIPS, geometries, run, world



def test_search_and_index_across_the_antimeridian_of_a_world_raster_use_only_its_two_strips(
        tiny_model, tmp_path):
    """search's hits lay anywhere between the strips (the envelope of the box's parts is the whole width), and
    index --bbox embedded every window of that width."""
    path = world(tmp_path)
    out = tmp_path / "hits.gpkg"
    result = run("search", path, "a lake", "--top", 10, "--max-overlap", 1, "--bbox", 170, -10, 190, 10,
                 "--out", out, "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 0, result.output
    hits = geometries(out)
    assert len(hits) > 0
    for hit in hits:
        assert shapely.intersection(hit, STRIPS).area > 0, hit.bounds
    east = [h for h in hits if shapely.intersection(h, shapely.box(170, -10, 180, 10)).area > 0]
    assert east and len(east) < len(hits)  # both strips searched

    from backend.engine.models import load_model
    from backend.engine.search_index import open_index

    with open_index(path, load_model(str(tiny_model), device="cpu")) as index:
        entries = index.entries()  # what search embedded for its bbox
        assert len(entries.level) > 0
        for footprint in entries.footprints:
            assert shapely.intersection(shapely.Polygon(footprint), STRIPS).area > 0, footprint
        # index --bbox over another box across 180 embeds only windows over its strips too.
        index.ensure((175, -80, 185, -70), "EPSG:4326")
        south = shapely.union_all([shapely.box(175, -80, 180, -70), shapely.box(-180, -80, -175, -70)])
        for footprint in index.entries().footprints:
            polygon = shapely.Polygon(footprint)
            assert shapely.intersection(polygon, STRIPS).area > 0 or shapely.intersection(polygon, south).area > 0
