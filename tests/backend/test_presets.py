"""Class presets and class files."""

from __future__ import annotations

import pytest

from backend.engine.errors import InputError
from backend.engine.presets import list_presets, load_preset, read_class_file

BENCHMARKS = ["openearthmap", "loveda", "potsdam", "vaihingen", "udd5", "vdd", "uavid", "isaid"]


def test_all_eight_benchmark_presets_exist_and_parse():
    presets = list_presets()
    for name in BENCHMARKS:
        assert presets[name], name
        assert all(line and "#" not in line for line in presets[name])
    assert presets["potsdam"] == [
        "road, parking lot",
        "building",
        "low vegetation",
        "tree",
        "car",
        "clutter, background",
    ]
    assert presets["vaihingen"] == [
        "impervious surface",
        "building",
        "low vegetation",
        "tree",
        "car",
        "clutter",
    ]
    assert len(presets["isaid"]) == 16 and presets["isaid"][0] == "background"
    assert len(presets["openearthmap"]) == 9 and presets["openearthmap"][-1] == "building, roof, house"
    assert presets["loveda"][1] == "building, roof, house"
    assert presets["udd5"] == ["vegetation", "building", "road", "vehicle", "background"]
    assert len(presets["vdd"]) == 7 and len(presets["uavid"]) == 7


def test_practical_land_cover_presets_exist():
    presets = list_presets()
    assert presets["landcover"][:2] == ["water", "tree, forest"]
    for name in ("urban", "agriculture", "water-bodies"):
        assert len(presets[name]) >= 3


def test_load_preset_is_case_insensitive():
    assert load_preset("Potsdam") == list_presets()["potsdam"]


def test_unknown_preset_lists_the_known_names():
    with pytest.raises(InputError, match="potsdam") as caught:
        load_preset("potsdamm")
    assert "landcover" in str(caught.value)
    with pytest.raises(InputError):
        load_preset("../presets/potsdam")


def test_class_file_comments_blank_lines_and_synonyms(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\ufeff# my classes\n\nwater,lake \n  tree ,  forest # woods\n,,\nbuilding\n", "utf-8")
    assert read_class_file(path) == ["water, lake", "tree, forest", "building"]


def test_empty_class_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing but a comment\n\n", "utf-8")
    with pytest.raises(InputError, match="no classes"):
        read_class_file(path)


def test_missing_unreadable_and_binary_class_files_are_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_class_file(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="folder"):
        read_class_file(tmp_path)
    binary = tmp_path / "classes.bin"
    binary.write_bytes(b"\xff\xfe\x00\x9c\x80")
    with pytest.raises(InputError, match="UTF-8"):
        read_class_file(binary)


def test_class_file_lines_are_normalised_as_the_plugins_class_box_does(tmp_path):
    """A class file's lines went into reports and a fine-tuned model's classes as typed ("water;lake",
    "road ， street", a no-break space); they read as the plugin's class box reads the same text now."""
    path = tmp_path / "classes.txt"
    path.write_text("water;lake\nroad \uff0c street\nforest  ;; wood\nwater\u00a0body, pond  # ponds too\n, ;\n",
                    encoding="utf-8")
    assert read_class_file(path) == ["water, lake", "road, street", "forest, wood", "water body, pond"]


def test_a_class_file_larger_than_any_class_list_is_refused_before_it_is_read_whole(tmp_path):
    """A 50 MB one-line class file was accepted and its one 'class' sent to the text encoder, whose memory grew
    without bound. It is refused by its size, naming it."""
    path = tmp_path / "huge.txt"
    path.write_text("a" * (3 * 2**20), encoding="utf-8")
    with pytest.raises(InputError, match=rf"^The class file {path} is larger than 1 MiB; a class file holds at "
                                         r"most 250 classes of at most 1000 characters"):
        read_class_file(path)


def test_a_class_file_line_is_bounded_as_a_class_line_given_one_by_one(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("water\n# a comment\n" + "b" * 5000 + "  # too long\nroad\n", encoding="utf-8")
    with pytest.raises(InputError) as refused:
        read_class_file(path)
    assert str(refused.value) == (f"The class line {'b' * 60!r}... (line 3 of the class file {path}) is 5000 "
                                  "characters long; give at most 1000 characters.")
    path.write_text("water\n" + "b" * 1000 + "\n", encoding="utf-8")  # the limit itself is a class line
    assert read_class_file(path) == ["water", "b" * 1000]


def test_a_class_file_with_more_classes_than_one_run_tells_apart_is_refused_naming_it(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("".join(f"class {i}\n" for i in range(251)), encoding="utf-8")
    with pytest.raises(InputError, match=rf"^The class file {path} holds 251 classes; one run tells at most 250"):
        read_class_file(path)


@pytest.mark.parametrize("line, shown", [
    ("\u200b", "The class line '\\u200b' (line 2 of the class file {path}) holds only invisible characters "
               "(U+200B ZERO WIDTH SPACE)"),
    ("\u200e\ufeff", "(U+200E LEFT-TO-RIGHT MARK)"),
    ("\u00ad", "(U+00AD SOFT HYPHEN)"),
    ("road, \u2060", "The class name '\\u2060' in the class line 'road, \\u2060' (line 2 of the class file {path}) "
                     "holds only invisible characters (U+2060 WORD JOINER)"),
], ids=["zero-width space", "marks", "soft hyphen", "invisible synonym"])
def test_a_class_file_line_of_invisible_characters_is_refused_as_no_class(tmp_path, line, shown):
    """Such a line became a class no one could see (in the legend, the report and the output's class field)."""
    path = tmp_path / "classes.txt"
    path.write_text(f"water\n{line}\n", encoding="utf-8")
    with pytest.raises(InputError) as refused:
        read_class_file(path)
    assert shown.format(path=path) in str(refused.value)
    assert str(refused.value).endswith("; type visible text, or leave it out.")


def test_a_control_character_in_a_class_file_line_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("water\tbody\nroad\x00way\n", encoding="utf-8")  # a tab is white space, a NUL is not
    with pytest.raises(InputError, match=rf"^The class line 'road\\x00way' \(line 2 of the class file {path}\) "
                                         r"contains the control character '\\x00'"):
        read_class_file(path)
