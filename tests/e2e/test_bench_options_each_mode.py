"""`farslip bench`'s options in each benchmark: --refine without --size measured nothing (TypeError: Integer width
and height are required), a --data-dir that is not the solaris folder was ignored without a word, and --size,
--batch-size and --arch were ignored by the benchmarks that do not read them. The benchmarks themselves are
replaced by stand-ins that record what they were given: only the options are tested here."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from backend.service.cli import app


@pytest.fixture(autouse=True)
def no_benchmark_runs(monkeypatch):
    """Every benchmark but --refine's (see refine_given) is a stand-in that measures nothing."""
    import backend.service.bench as bench
    import backend.service.cli as cli
    import backend.service.ray_bench as ray_bench
    import backend.service.search_bench as search_bench
    import backend.service.training_bench as training_bench

    monkeypatch.setattr(cli, "_bench_server", lambda *args, **kwargs: {})
    monkeypatch.setattr(search_bench, "run_search_bench", lambda *args, **kwargs: {})
    monkeypatch.setattr(ray_bench, "run_ray_bench", lambda *args, **kwargs: {})
    monkeypatch.setattr(bench, "random_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(training_bench, "measure_training", lambda *args, **kwargs: {})
    monkeypatch.setattr(training_bench, "format_training", lambda *args, **kwargs: "")


@pytest.fixture
def refine_given(monkeypatch):
    """The arguments `bench --refine` hands its benchmark (which is not run)."""
    import backend.service.refine_bench as refine_bench

    given: dict = {}

    def recorded(arch, batch_size, size, device, data_dir, sam_model, echo=print):
        given.update(arch=arch, batch_size=batch_size, size=size, device=device, data_dir=data_dir)
        return {}

    monkeypatch.setattr(refine_bench, "run_refine_bench", recorded)
    return given


def test_refine_without_size_measures_the_default_raster_side(refine_given):
    result = CliRunner().invoke(app, ["bench", "--refine", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert refine_given["size"] == 1024


def test_refine_with_a_size_measures_that_side(refine_given):
    result = CliRunner().invoke(app, ["bench", "--refine", "--device", "cpu", "--size", "512"])
    assert result.exit_code == 0, result.output
    assert refine_given["size"] == 512


def test_a_data_dir_holding_the_solaris_files_is_read(refine_given, tmp_path):
    for name in ("solaris_sample_geotiff.tif", "solaris_geotiff_labels.geojson"):
        (tmp_path / name).write_text("stand-in")
    result = CliRunner().invoke(app, ["bench", "--refine", "--device", "cpu", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert refine_given["data_dir"] == tmp_path


@pytest.mark.parametrize("where, said", [
    ("missing", "does not exist"),
    ("file", "is a file, not a folder"),
    ("empty", "holds no solaris_sample_geotiff.tif and no solaris_geotiff_labels.geojson"),
])
def test_a_data_dir_that_is_not_the_solaris_folder_is_refused(refine_given, tmp_path, where, said):
    folder = tmp_path / where
    if where == "file":
        folder.write_text("x")
    elif where == "empty":
        folder.mkdir()
    result = CliRunner().invoke(app, ["bench", "--refine", "--device", "cpu", "--data-dir", str(folder)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"Error: --data-dir {folder} {said}; give the folder holding solaris_sample_geotiff.tif and "
        "solaris_geotiff_labels.geojson, or leave --data-dir out.")
    assert not refine_given  # refused before measuring


@pytest.mark.parametrize("args, said", [
    (["--server", "--size", "512"], "Error: --size applies only with --null-encoder or --refine or --ray or without "
                                    "a benchmark flag, not with --server; leave --size out."),
    (["--search", "--size", "512"], "not with --search; leave --size out."),
    (["--train", "--size", "512"], "not with --train; leave --size out."),
    (["--server", "--batch-size", "2"], "Error: --batch-size applies only with --null-encoder or --refine or --train "
                                        "or without a benchmark flag, not with --server; leave --batch-size out."),
    (["--search", "--batch-size", "2"], "not with --search; leave --batch-size out."),
    (["--ray", "--batch-size", "2"], "not with --ray; leave --batch-size out."),
    (["--server", "--arch", "ViT-B-32"], "Error: --arch applies only with --null-encoder or --refine or --ray or "
                                         "--search or --train or without a benchmark flag, not with --server; leave "
                                         "--arch out."),
])
def test_an_option_the_chosen_benchmark_does_not_read_is_refused(args, said):
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *args])
    assert result.exit_code == 2 and said in result.output, result.output
