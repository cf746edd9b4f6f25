"""The templates' shared beginnings run once (text_prefix.py): the same embeddings as whole prompts."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from backend.engine.languages import ENGLISH_TEMPLATES
from backend.engine.models import LoadedModel
from backend.engine.text import TextEmbedder, encode_tokens
from backend.engine.text_prefix import PREFIXES, eligible, encode_with_prefixes
from tests.tinymodels import make_tiny_clip

QUERIES = ["river", "greenhouse", "a baseball field next to a parking lot", "", "Ölfeld 水田",
           "x " * 90]  # the last is cut at the context length


def whole_prompts(model, tokenizer, templates, query):
    return encode_tokens(model, tokenizer([template.format(query) for template in templates]))


@pytest.mark.parametrize("context_length", [77, 248])
def test_same_features_as_whole_prompts(context_length):
    model = make_tiny_clip(context_length=context_length, seed=3)
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)
    assert eligible(model)
    with torch.inference_mode():
        for query in QUERIES:
            got = encode_with_prefixes(model, tokenizer, ENGLISH_TEMPLATES, query)
            want = whole_prompts(model, tokenizer, ENGLISH_TEMPLATES, query)
            assert got.shape == want.shape == (len(ENGLISH_TEMPLATES), 64)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            # And the reference: open_clip's own encode_text over the whole context.
            full = model.encode_text(tokenizer([t.format(query) for t in ENGLISH_TEMPLATES]))
            torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-5)


def test_templates_that_do_not_share_their_beginning_and_one_template():
    """A template whose beginning is not a token prefix of its prompts ("{}" inside a word) and a
    template that starts with the query use only the common part; one template alone works."""
    model = make_tiny_clip(seed=4)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    odd = ("satellite{} image.", "{} seen from above.", "a photo of a {}.", "{}")
    with torch.inference_mode():
        for templates in (odd, ("{}",), ("an aerial image of {}",)):
            for query in ("lake", "parking lot"):
                torch.testing.assert_close(encode_with_prefixes(model, tokenizer, templates, query),
                                           whole_prompts(model, tokenizer, templates, query), atol=2e-5, rtol=1e-5)


def test_weights_changed_in_place_are_not_served_from_old_beginnings():
    model = make_tiny_clip(seed=5)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with torch.inference_mode():
        before = encode_with_prefixes(model, tokenizer, ENGLISH_TEMPLATES, "lake")
    other = make_tiny_clip(seed=6)
    model.load_state_dict(other.state_dict())  # copies in place: the same model object, new weights
    with torch.inference_mode():
        after = encode_with_prefixes(model, tokenizer, ENGLISH_TEMPLATES, "lake")
        want = whole_prompts(other, tokenizer, ENGLISH_TEMPLATES, "lake")
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, want, atol=2e-5, rtol=1e-5)


def test_text_embedder_uses_it_and_matches_the_plain_mean(tmp_path):
    model = make_tiny_clip(seed=7)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    loaded = LoadedModel(model=model, name="tiny", tokenizer=tokenizer, context_length=77,
                         weights_id="tiny-prefix-test")
    PREFIXES._models.pop(model, None)
    embedder = TextEmbedder(loaded, cache=tmp_path)
    assert embedder.prefixes
    got = embedder.embed(["water", "cropland"])
    assert model in PREFIXES._models  # the shared beginnings were run and kept for the model
    with torch.inference_mode():
        for row, query in zip(got, ["water", "cropland"]):
            plain = F.normalize(model.encode_text(tokenizer([t.format(query) for t in ENGLISH_TEMPLATES])), dim=-1)
            torch.testing.assert_close(row, F.normalize(plain.mean(dim=0), dim=0), atol=1e-5, rtol=1e-5)


def test_towers_it_does_not_know_are_not_eligible():
    model = make_tiny_clip(seed=8)
    block = model.transformer.resblocks[0]
    block.ln_1_kv = torch.nn.LayerNorm(64)  # a cross-attention block
    assert not eligible(model)
    assert not eligible(torch.nn.Linear(2, 2))
