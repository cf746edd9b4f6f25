"""`farslip bench --null-encoder` as a user runs it: the table and the figures of the JSON it writes
(the figures' sizes are not checked: timings belong in benchmarks, not in tests)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tinymodels import make_tiny_clip, save_plain
from typer.testing import CliRunner

from backend.engine.models import load_model
from backend.engine.options import check_language
from backend.engine.sliding import Segmenter
from backend.engine.text import TextEmbedder
from backend.engine.presets import parse_class_lines
from backend.service.bench import bench_runtimes, type_classes
from backend.service.cli import app
from backend.service.host_bench import median_run


def test_null_encoder_bench_writes_the_host_figure_each_stage_and_the_cpu_time(tmp_path):
    out = tmp_path / "host.json"
    result = CliRunner().invoke(app, ["bench", "--null-encoder", "--size", "448", "--rss-sizes", "",
                                      "--runs", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text(encoding="utf-8"))
    # Two runs, each timed; the figures are those of the median one (of two: the faster).
    assert len(figures["runs"]) == 2 and "2 runs, each in a fresh process" in result.output
    assert figures["seconds"] == min(run["seconds"] for run in figures["runs"])
    assert figures["pixels"] == 448 * 448 and figures["tiles"] == 9
    assert figures["batch_size"] == 8  # no --batch-size: what segment picks on a CPU
    assert figures["host_mpx_per_s"] > 0 and figures["host_mpx_per_s"] == figures["pixels"] / figures["seconds"] / 1e6
    assert figures["polygons"] >= 1
    assert figures["host_cpu_s"] > 0 and figures["cores"] >= 1
    assert figures["cores_busy"] == figures["host_cpu_s"] / figures["seconds"]
    shares = figures["stage_share"]
    assert {"encode_s", "blend_s", "finish_s", "finish_wait_s", "polygon_wait_s", "quality_s"} <= set(shares)
    assert all(0 <= share <= 1 for share in shares.values())
    # The main thread's rows and "everything else" make up the wall time; the background threads' rows run beside.
    assert sum(share for key, share in shares.items() if key not in ("read_s", "finish_s")) == pytest.approx(1.0)
    assert "**total**" in result.output and "Mpx/s" in result.output
    assert "run beside the others, so the shares add up past 100 %" in result.output  # the overlap is said
    assert "CPU time of the run" in result.output
    assert "memory" not in figures  # --rss-sizes '' skips the peak-memory runs
    assert shares["other_s"] > 0 and "everything else (text, setup, Python)" in result.output  # the table's row too


def test_the_whole_bench_runs_and_pairs_the_runtime_with_the_reference_loop(tmp_path, monkeypatch):
    """`farslip bench` as a user runs it, on a tiny architecture registered with open_clip: every table
    comes out, and the runtime's ratio to the reference loop is the median of back-to-back pairs, each
    given in the table and the JSON."""
    import statistics

    import open_clip

    from backend.service.bench import REFERENCE_PAIRS

    tiny = {"embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 128, "layers": 2, "head_width": 64},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "farslip-tiny-bench", tiny)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--arch", "farslip-tiny-bench", "--size", "448", "--rss-sizes", "",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text(encoding="utf-8"))
    pairs = figures["auto_no_region_checks_vs_reference"]
    assert len(pairs["ratios"]) == REFERENCE_PAIRS >= 3
    assert pairs["median"] == statistics.median(pairs["ratios"]) and all(r > 0 for r in pairs["ratios"])
    assert f"{REFERENCE_PAIRS} pairs back to back" in result.output
    assert f"median {pairs['median']:.2f}x the reference loop" in result.output
    for row in ("bare dense image encoder", "reference loop (section 4", "re-run, 3 new classes",
                "truncated to longest prompt", "the templates' shared beginnings run once"):
        assert row in result.output
    assert figures["text"]["shared_beginnings_max_abs_diff"] < 1e-4
    assert figures["cached_output_identical"] is True
    # The zoomed-in re-run finds the first run's features under the runtime the first run exported.
    assert "zoomed-in re-run, a 300x300 part" in result.output and "uncached on torch" in result.output
    assert figures["zoom_features"]["encoded"] == 0 and figures["zoom_features"]["cached"] > 0
    assert figures["zoom_encoder"] == figures["auto_runtime"]


def test_the_compiled_runtimes_are_compared_on_the_cpu_only():
    """`farslip bench --device cuda` stopped with a traceback: the compiled runtimes' reference features
    were computed from crops on the CPU with the GPU's model. They run on the CPU only, so on any other
    device there is nothing to compare and nothing runs (a model on the meta device stands for a GPU's)."""
    loaded = SimpleNamespace(model=make_tiny_clip().to("meta"), device=torch.device("meta"))
    assert bench_runtimes(loaded, batch_size=2, batches=1, torch_rate=1.0) == {}


def test_the_host_figures_are_those_of_the_median_run():
    runs = [{"seconds": 3.1}, {"seconds": 2.7}, {"seconds": 4.9}]
    assert median_run(runs)["seconds"] == 3.1
    assert median_run(runs[:2])["seconds"] == 2.7 and median_run(runs[:1])["seconds"] == 3.1


def test_classes_typed_before_are_cached_as_the_run_asks_for_them(tmp_path, monkeypatch):
    """The benches' "classes typed before" are embedded query by query, as a segment run asks for them
    (one line, several synonyms): the run then encodes no text at all."""
    loaded = load_model(str(save_plain(make_tiny_clip(), tmp_path / "tiny.pt")))
    lines = ["quarry pit, spoil heap", "hedgerow"]
    type_classes(loaded, lines)

    def encoded_again(self, query):
        raise AssertionError(f"{query!r} was encoded again")

    monkeypatch.setattr(TextEmbedder, "_encode", encoded_again)
    embedder = TextEmbedder(loaded, language=check_language(None))  # as segment_raster makes it
    segmenter = Segmenter(loaded, parse_class_lines(lines), embedder=embedder)
    assert segmenter.num_queries == 3


def test_a_figures_file_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    """It was a traceback after minutes of measuring."""
    result = CliRunner().invoke(app, ["bench", "--json", str(tmp_path / "nowhere" / "bench.json")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"Error: The output folder {tmp_path / 'nowhere'} does not exist; create it or " \
                                    "choose another."


@pytest.mark.parametrize("args, said", [
    (["--rss-sizes", "abc"], "Error: --rss-sizes takes raster sides in pixels, each from 224 to 32768, separated by "
                             "commas (e.g. 2000,10000), or '' for none; got 'abc'."),
    (["--search", "--search-sides", "3000,x"], "Error: --search-sides takes raster sides in pixels"),
    (["--rss-sizes", "100"], "Error: --rss-sizes takes raster sides in pixels, each from 224 to 32768"),
    # Sizes past any raster a benchmark can write (an overflow traceback, or a 120 GB raster), and sides twice.
    (["--rss-sizes", "99999999999999999999"], "Error: --rss-sizes takes raster sides in pixels, each from 224 to "
                                              "32768"),
    (["--null-encoder", "--size", "99999999999999999999"], "Invalid value for '--size'"),
    (["--null-encoder", "--batch-size", "1000000"], "Invalid value for '--batch-size'"),
    (["--rss-sizes", "300,300"], "Error: --rss-sizes names the side 300 twice; give each side once."),
    (["--search", "--search-sides", ""], "Error: --search-sides takes raster sides in pixels, each from 224 to 32768, "
                                         "separated by commas (e.g. 2000,10000); got ''."),
    # Architectures open_clip knows whose towers the benchmarks cannot run (tracebacks after the check).
    (["--arch", "RN50"], "Error: The image tower of RN50 is a ResNet, not open_clip's Vision Transformer, which the "
                         "dense pass runs; benchmark a ViT architecture (e.g. ViT-B-16, ViT-B-32, ViT-L-14)."),
    (["--null-encoder", "--arch", "ViT-B-16-SigLIP"], "Error: The image tower of ViT-B-16-SigLIP is a timm model "
                                                      "(vit_base_patch16_siglip_224), not open_clip's Vision"),
    (["--train", "--arch", "xlm-roberta-base-ViT-B-32"], "Error: The text tower of xlm-roberta-base-ViT-B-32 comes "
                                                         "from Hugging Face (xlm-roberta-base)"),
    (["--arch", "ViT-L-14-CLIPA"], "Error: The text tower of ViT-L-14-CLIPA comes from Hugging Face"),
    (["--arch", "coca_ViT-B-32"], "Error: coca_ViT-B-32 is not a CLIP model as FarSLIP's (a captioning tower, or "
                                  "another tokenizer's vocabulary), which the benchmarks build"),
    # --overwrite with nothing to overwrite was ignored; an empty --json name was "." is a folder.
    (["--overwrite"], "Error: --overwrite applies only with --json (it lets the figures replace that file); add "
                      "--json FILE, or leave --overwrite out."),
    (["--json", ""], "Error: --json takes the name of the file to write the figures to; give one, or leave --json "
                     "out."),
    (["--arch", "nope"], "Error: Unknown open_clip architecture 'nope'; e.g. ViT-B-16, ViT-B-32, ViT-L-14."),
    (["--size", "-5"], "Invalid value for '--size'"),
    (["--size", "0"], "Invalid value for '--size'"),
    # Options a benchmark would ignore, and two benchmarks at once (one of them quietly ran).
    (["--runs", "2"], "Error: --runs applies only with --null-encoder; add --null-encoder, or leave --runs out."),
    (["--search", "--train"], "Error: --train and --search are different benchmarks; run them one at a time."),
    (["--sam-model", "sam-vit-b"], "Error: --sam-model applies only with --refine; add --refine"),
    (["--data-dir", "/tmp"], "Error: --data-dir applies only with --refine; add --refine"),
    (["--null-encoder", "--search-sides", "3000"], "Error: --search-sides applies only with --search, not with "
                                                   "--null-encoder; leave --search-sides out."),
    (["--search", "--rss-sizes", ""], "Error: --rss-sizes applies only with --null-encoder or without a benchmark "
                                      "flag, not with --search; leave --rss-sizes out."),
])
def test_bad_benchmark_options_are_one_sentence_before_measuring(args, said):
    """They were tracebacks (--rss-sizes abc, --size -5 after minutes of measuring), exit 1 (--arch), or a
    silent default (--size 0)."""
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2 and said in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def fake_host_bench(then):
    """A run_host_bench that measures nothing and calls `then()` (what happens while a benchmark runs)."""
    def run(*args, **kwargs):
        then()
        return {"host_mpx_per_s": 1.0}

    return run


def test_a_figures_file_made_while_measuring_is_kept_and_the_figures_said(tmp_path, monkeypatch):
    """The file was checked only before minutes of measuring, then replaced without --overwrite."""
    from backend.service import host_bench

    made = tmp_path / "bench.json"
    monkeypatch.setattr(host_bench, "run_host_bench", fake_host_bench(lambda: made.write_text("precious")))
    result = CliRunner().invoke(app, ["bench", "--null-encoder", "--json", str(made)])
    assert result.exit_code == 2, result.output
    assert "already exists; choose another name or allow overwriting (--overwrite). The figures were not written; " \
           "they are printed above." in result.output
    assert made.read_text() == "precious"
    result = CliRunner().invoke(app, ["bench", "--null-encoder", "--json", str(made), "--overwrite"])
    assert result.exit_code == 0 and json.loads(made.read_text()) == {"host_mpx_per_s": 1.0}


def test_a_figures_file_whose_folder_went_while_measuring_is_one_sentence(tmp_path, monkeypatch):
    """It was a traceback (FileNotFoundError, or No space left on device) after the whole run."""
    import shutil

    from backend.service import host_bench

    folder = tmp_path / "figures"
    folder.mkdir()
    monkeypatch.setattr(host_bench, "run_host_bench", fake_host_bench(lambda: shutil.rmtree(folder)))
    result = CliRunner().invoke(app, ["bench", "--null-encoder", "--json", str(folder / "bench.json")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(f"Error: The output folder {folder} does not exist")
    assert result.output.strip().endswith("The figures were not written; they are printed above.")
    assert not folder.exists()


def test_the_training_bench_runs_the_batch_asked_for_and_names_its_architecture(tmp_path, monkeypatch):
    """--train quietly ran batch 4 whatever --batch-size said, and its figures never named the architecture."""
    from backend.service import training_bench

    asked: list[int] = []

    def measure(loaded, batch_size, steps):
        asked.append(batch_size)
        return {"batch_size": batch_size}

    monkeypatch.setattr(training_bench, "measure_training", measure)
    monkeypatch.setattr(training_bench, "format_training", lambda results: "table")
    out = tmp_path / "train.json"
    for args in ([], ["--batch-size", "8"]):
        result = CliRunner().invoke(app, ["bench", "--train", "--arch", "ViT-S-32", *args, "--json", str(out),
                                          "--overwrite"])
        assert result.exit_code == 0, result.output
        assert "# farslip bench --train: ViT-S-32" in result.output
        assert json.loads(out.read_text())["arch"] == "ViT-S-32"
    assert asked == [4, 8]


def test_an_existing_figures_file_is_kept_unless_overwrite(tmp_path):
    kept = tmp_path / "bench.json"
    kept.write_text("precious")
    result = CliRunner().invoke(app, ["bench", "--train", "--json", str(kept)])
    assert result.exit_code == 2 and "already exists; choose another name or allow overwriting (--overwrite)" in \
        result.output
    assert kept.read_text() == "precious"
