"""An index or search job says which model it loads as a segment job does: given weights (a checkpoint, a
fine-tuned folder) it names them. Before, it said "Loading the model default." while it loaded the weights."""

from __future__ import annotations

import pytest

from backend.service.search_jobs import run_index, run_search


class Loaded(Exception):
    """Raised by the model cache: the job stops once it has said what it loads."""


class Control:
    def __init__(self):
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)

    def should_cancel(self) -> bool:
        return False

    def progress(self, done: int, total: int) -> None:
        pass


class Models:
    def __init__(self):
        self.asked: list[tuple] = []

    def get(self, model, weights=None, *rest):
        self.asked.append((model, weights))
        raise Loaded


@pytest.mark.parametrize("runner", [run_index, run_search], ids=["index", "search"])
@pytest.mark.parametrize(("model", "weights", "said"), [
    (None, "/data/tiny.safetensors", "/data/tiny.safetensors"),
    (None, "/data/my-model", "/data/my-model"),
    ("ViT-B-16", "/data/vit.safetensors", "ViT-B-16"),  # a registry model with its weights file: as segment
    ("farslip2-vit-b-16", None, "farslip2-vit-b-16"),
    (None, None, "default"),
])
def test_the_loading_message_names_the_model_the_job_loads(runner, model, weights, said):
    control, models = Control(), Models()
    request = {"raster": "/data/a.tif", "model": model, "weights": weights, "sentences": ["a lake"],
               "out": "/data/hits.gpkg"}
    with pytest.raises(Loaded):
        runner(request, control, models)
    assert models.asked == [(model, weights)]
    assert control.messages == [f"Loading the model {said}."]
