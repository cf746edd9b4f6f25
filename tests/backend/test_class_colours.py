"""Class colours follow resources/palette.json (the plugin reads the same file; tests/plugin pins that they agree)."""

from backend.engine.colours import class_colormap, class_colors, class_colour_codes
from backend.engine.presets import list_presets
from backend.engine.presets import parse_class_lines


def test_common_land_cover_words_get_their_expected_colours_in_any_position():
    assert class_colour_codes(["water", "Forest", "building"]) == ["#1f78b4", "#1b7837", "#d7301f"]
    assert class_colour_codes(["road", "lake"]) == ["#737373", "#1f78b4"]


def test_a_name_keeps_its_colour_across_runs_and_clashing_names_move_on():
    assert class_colour_codes(["harbour crane"]) == class_colour_codes(["harbour crane", "water"])[:1]
    clashing = class_colour_codes(["water", "lake", "river"])
    assert clashing[0] == "#1f78b4" and len(set(clashing)) == 3


def test_every_preset_gets_distinct_colours():
    for name, lines in list_presets().items():
        codes = class_colour_codes([spec.name for spec in parse_class_lines(lines)])
        assert len(set(codes)) == len(codes), name


def test_colour_table_has_the_class_colours_grey_unclassified_and_transparent_rest():
    colormap = class_colormap(["water", "cropland"], unclassified_value=254)
    assert colormap[0] == (*class_colors(["water"])[0], 255) == (31, 120, 180, 255)
    assert colormap[1][3] == 255 and colormap[254] == (128, 128, 128, 255)
    assert colormap[2] == colormap[255] == (0, 0, 0, 0) and len(colormap) == 256
