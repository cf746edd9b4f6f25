"""Class lines -> text embeddings (FARSLIP_METHOD.md section 2).

Each class line is one class; commas separate synonyms, each a query. A
query's embedding is the normalised mean of the 80 OpenAI prompt templates.
The text tower is causal, so running it only up to the longest real token
sequence of a batch gives the same end-of-text features as the full 77/248
context, several times faster on CPU, and the templates' shared beginnings
need running only once per model (text_prefix.py). Embeddings are cached on
disk per (weights, templates, query).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_output
from .errors import CancelledError, shown
from .feature_cache import read_cached_array
from .hf_text import encode_hf_tokens, is_hf_text_model
from .languages import ENGLISH_TEMPLATES, query_language, templates_for
from .models import LoadedModel
from .paths import cache_dir
# The class lines are parsed without torch (presets.py): the CLI refuses a bad list before the model's imports.
from .presets import ClassSpec, parse_class_lines, same_name_key
from .text_prefix import eligible as prefixes_eligible
from .text_prefix import encode_with_prefixes

if TYPE_CHECKING:
    from open_clip.model import CLIP

LOGIT_SCALE = 50.0
MAX_LOGIT_SCALE = 100.0  # image-level scoring: the model's learned scale, at most this
PROMPT_TEMPLATES: tuple[str, ...] = ENGLISH_TEMPLATES


def logit_scale(loaded: LoadedModel) -> float:
    """The model's own learned logit scale (image-level scoring), capped as CLIP caps it in training."""
    scale = getattr(loaded.model, "logit_scale", None)
    return float(min(scale.exp().item(), MAX_LOGIT_SCALE)) if scale is not None else MAX_LOGIT_SCALE


def class_probabilities(image: np.ndarray, text: np.ndarray, owner: np.ndarray, n_classes: int,
                        scale: float) -> np.ndarray:
    """(B, n_classes): softmax over all queries of the scaled cosines, then the max over each class's
    synonyms. `image` (B, D) and `text` (Q, D) are L2-normalised; owner[q] is query q's class."""
    p = torch.softmax(torch.from_numpy(image @ text.T * scale), dim=1).numpy()
    return np.stack([p[:, owner == c].max(axis=1) for c in range(n_classes)], axis=1)


def query_index(classes: list[ClassSpec]) -> tuple[list[str], list[int]]:
    """All queries in order, and for each query the index of its class."""
    queries, owner = [], []
    for class_id, spec in enumerate(classes):
        for query in spec.queries:
            queries.append(query)
            owner.append(class_id)
    return queries, owner


def encode_tokens(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP.encode_text, run only up to the longest real sequence of the batch.

    Exact because the causal mask keeps every position from seeing later ones,
    and pooling takes the end-of-text token (the highest id of each row).
    Hugging Face towers (bidirectional) go through `hf_text.encode_hf_tokens`.
    """
    if is_hf_text_model(model):
        return encode_hf_tokens(model, tokens)
    length = int((tokens != 0).sum(dim=1).max().item())
    length = max(length, 1)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    return x @ model.text_projection


def embedding_width(loaded: LoadedModel) -> int | None:
    """The length of the model's image and text embeddings (None where the model does not say)."""
    width = getattr(getattr(loaded.model, "visual", None), "output_dim", None)
    return int(width) if isinstance(width, int) else None


def is_multilingual(loaded: LoadedModel) -> bool:
    """Whether the model reads other languages than English (registry `languages`, or its text tower)."""
    metadata = getattr(loaded, "metadata", None) or {}
    return len(metadata.get("languages") or ["en"]) > 1


def model_variant(loaded: LoadedModel) -> str:
    """What besides the weights changes the embeddings: the activation and fp16 (cache keys)."""
    activation = (getattr(loaded, "metadata", None) or {}).get("activation", "quickgelu")
    projection = getattr(loaded.model, "text_projection", None)
    half = isinstance(projection, torch.Tensor) and projection.dtype == torch.float16
    return activation + ("-fp16" if half else "")


class TextEmbedder:
    """Embeds queries with a loaded model; remembers them in memory and on disk.

    Prompt templates: `templates` when given; otherwise, for a multilingual model, those of each
    query's language (`language` forces one, see languages.py), and English for the others.
    """

    def __init__(self, loaded: LoadedModel, cache: Path | None = None, templates: tuple[str, ...] | None = None,
                 use_disk_cache: bool = True, language: str | None = None,
                 should_cancel: Callable[[], bool] | None = None):
        self.loaded = loaded
        # Asked before each query `embed` encodes: 250 classes of synonyms encode for minutes on a CPU.
        self.should_cancel = should_cancel
        self.fixed_templates = templates
        self.language = language
        self.multilingual = is_multilingual(loaded)
        # The templates' shared beginnings run once per model (text_prefix.py); other towers run whole prompts.
        self.prefixes = prefixes_eligible(loaded.model)
        root = cache if cache is not None else cache_dir() / "text"
        self.cache_base = root if use_disk_cache else None
        self._memory: dict[str, torch.Tensor] = {}

    def templates_for(self, query: str) -> tuple[str, ...]:
        if self.fixed_templates is not None:
            return self.fixed_templates
        if not self.multilingual:
            return PROMPT_TEMPLATES
        return templates_for(query_language(query, self.language))

    def _cache_file(self, query: str) -> Path | None:
        if self.cache_base is None:
            return None
        digest = hashlib.sha256("\n".join(self.templates_for(query)).encode()).hexdigest()[:12]
        folder = self.cache_base / f"{self.loaded.weights_id[:24]}-{model_variant(self.loaded)}-{digest}"
        return folder / (hashlib.sha256(query.encode()).hexdigest()[:32] + ".npy")

    @torch.inference_mode()
    def _encode(self, query: str) -> torch.Tensor:
        templates = self.templates_for(query)
        if self.prefixes:
            raw = encode_with_prefixes(self.loaded.model, self.loaded.tokenizer, templates, query)
        else:
            tokens = self.loaded.tokenizer([template.format(query) for template in templates])
            raw = encode_tokens(self.loaded.model, tokens.to(self.loaded.device))
        features = F.normalize(raw.float(), dim=-1)
        return F.normalize(features.mean(dim=0), dim=0).cpu()

    def embed_one(self, query: str) -> torch.Tensor:
        if query in self._memory:
            return self._memory[query]
        path = self._cache_file(query)
        if path is not None and path.exists():
            # A damaged file, or one of another width or not of unit length, is computed again.
            stored = read_cached_array(path, shape=(embedding_width(self.loaded),), unit=True)
            if stored is not None:
                embedding = torch.from_numpy(stored)
                self._memory[query] = embedding
                return embedding
        embedding = self._encode(query)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(path, durable=False) as staged:
                    np.save(staged, embedding.numpy())
            except OSError:
                pass  # a read-only cache only costs speed
        self._memory[query] = embedding
        return embedding

    def embed(self, queries: list[str]) -> torch.Tensor:
        """(Q, D) L2-normalised embeddings, one row per query."""
        rows = []
        for query in queries:
            if self.should_cancel is not None and query not in self._memory and self.should_cancel():
                raise CancelledError("The run was cancelled; nothing was written.")
            rows.append(self.embed_one(query))
        return torch.stack(rows)


def token_ids(loaded: LoadedModel, text: str) -> tuple[list[int], Callable[[list[int]], str]] | None:
    """The tokens the model's tokenizer makes of `text` (no start or end token) and how to decode some back;
    None for a tokenizer this cannot see into. CLIP's BPE encodes itself; open_clip's Hugging Face wrapper
    holds the tokenizer inside."""
    inner = loaded.tokenizer if hasattr(loaded.tokenizer, "encode") else getattr(loaded.tokenizer, "tokenizer", None)
    if inner is None:
        return None
    tokens = inner.encode(text) if inner is loaded.tokenizer else inner.encode(text, add_special_tokens=False)
    return list(tokens), inner.decode


def cut_names_warning(loaded: LoadedModel, classes: list[ClassSpec], language: str | None = None) -> list[str]:
    """One sentence naming the class names the text tower reads only in part: a prompt made of the name
    ('a satellite photo of a {}.') is longer than its context, and the tokenizer cuts the rest."""
    limit = loaded.context_length - 2  # start and end tokens
    embedder = TextEmbedder(loaded, use_disk_cache=False, language=language)
    cut = []
    for query in (q for spec in classes for q in spec.queries):
        longest = max((template.format(query) for template in embedder.templates_for(query)), key=len)
        counted = token_ids(loaded, longest)
        if counted is not None and len(counted[0]) > limit:
            cut.append(query)
    if not cut:
        return []
    return [f"Model {loaded.name} reads at most {limit} tokens of each prompt made of a class name, so only the "
            f"beginning of {_some_names(cut)} counts; use shorter class names."]


def _some_names(names: list[str]) -> str:
    """The first three names a warning is about, each cut to 40 characters (errors.shown), " ..." for more."""
    return ", ".join(shown(name, 40) for name in names[:3]) + (" ..." if len(names) > 3 else "")


def language_warnings(loaded: LoadedModel, classes: list[ClassSpec]) -> list[str]:
    """One sentence when an English-only model is given class names that are clearly not English (names a
    fine-tuned model was trained on excepted: it has learnt them)."""
    if is_multilingual(loaded):
        return []
    from .languages import non_english

    learnt = ({same_name_key(q) for spec in parse_class_lines(loaded.class_lines) for q in spec.queries}
              if loaded.class_lines else set())
    foreign = [q for q in non_english([q for spec in classes for q in spec.queries]) if same_name_key(q) not in learnt]
    if not foreign:
        return []
    return [f"Model '{loaded.name}' reads English only, but {_some_names(foreign)} "
            f"{'is' if len(foreign) == 1 else 'are'} not English: the result may be poor. "
            "Use a multilingual model (e.g. rs-m-clip) or English class names."]
