"""The figures a training is judged by: metrics on the validation strip, through `segment`'s own code path."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from backend.engine.models import LoadedModel
from backend.engine.text import TextEmbedder

from .evaluate import predict_classes, score, segmenter_for

if TYPE_CHECKING:
    from open_clip.model import CLIP


class Validation:
    """Scores a vision model (the one being trained, or the base model) on `data`'s validation strip.

    On a GPU that runs out of memory in a batch, the strip runs again with half the batch (predict_classes), and
    the batch that fitted is kept for the later validations; `notice` (default: stderr) hears each retry."""

    def __init__(self, loaded: LoadedModel, data, embedder: TextEmbedder, attention: str, batch_size: int,
                 notice: Callable[[str], None] | None = None):
        self.loaded = loaded
        self.data = data
        self.embedder = embedder
        self.attention = attention
        self.batch_size = batch_size
        self.notice = notice

    def run(self, model: CLIP, should_cancel: Callable[[], bool] | None = None) -> dict:
        segmenter = segmenter_for(self.loaded, self.data.grid.class_lines, model=model, embedder=self.embedder,
                                  attention=self.attention, batch_size=self.batch_size)
        predicted = predict_classes(segmenter, self.data.source, self.data.validation_window, should_cancel,
                                    notice=self.notice)
        self.batch_size = segmenter.batch_size  # the batch that fitted, if a smaller one had to
        return score(self.data.validation_labels, predicted, self.data.grid.class_names)
