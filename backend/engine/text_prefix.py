"""A query's prompts through a causal text tower, with the templates' shared beginnings run once.

Every prompt of a query is a template with the query put in: "a photo of a {}." The text tower is
causal, so the hidden states of "a photo of a" at every layer do not depend on what follows: they are
the same for every query. `PrefixCache` runs the beginnings of a template list once per model and keeps,
per layer, their attention keys and values; `encode_with_prefixes` then runs only the rest of each
prompt (the query, the template's end, end-of-text), attending to the kept keys and values. Only the
tokens after the shared beginning go through the layers: with the 80 OpenAI templates and a one-word
class that is about a third of them.

The result is the same function as `text.encode_tokens` (differences at float rounding, ~1e-6): a prompt
whose tokens do not begin with its template's beginning (a tokenizer that merges across the join) uses
the common part only, down to the start-of-text token. Towers this does not know (Hugging Face
encoders, custom blocks, cross-attention) are not eligible and go the plain way.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class _Prefixes:
    tokens: torch.Tensor  # (T, P) token ids of each template's beginning (0 after its end)
    lengths: torch.Tensor  # (T,) real tokens of each beginning, start-of-text included
    keys: list[torch.Tensor]  # per layer (T, heads, P, head_dim)
    values: list[torch.Tensor]


def eligible(model) -> bool:
    """Whether `model` is an open_clip CLIP whose text blocks this module can run itself."""
    try:
        from open_clip.transformer import ResidualAttentionBlock
    except ImportError:  # pragma: no cover - open_clip is a backend dependency
        return False
    transformer = getattr(model, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or getattr(model, "attn_mask", None) is None:
        return False
    if getattr(model, "text_pool_type", "argmax") != "argmax" or not hasattr(model, "token_embedding"):
        return False
    for block in blocks:
        attn = getattr(block, "attn", None)
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return False
        if attn.bias_k is not None or attn.add_zero_attn or attn.in_proj_bias is None:
            return False
    return True


def _text_parameters(model) -> list[torch.Tensor]:
    return [model.token_embedding.weight, model.positional_embedding, model.text_projection,
            *model.transformer.parameters(), *model.ln_final.parameters()]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _keys_values(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (batch, heads, length, head_dim) of a block's attention for input `x`."""
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return _heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads)


def _block_rest(block, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = attended.shape
    attended = block.attn.out_proj(attended.transpose(1, 2).reshape(batch, length, heads * head_dim))
    x = x + block.ls_1(attended)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class PrefixCache:
    """Per model (weakly held) and template list: the templates' beginnings, run through the tower once."""

    def __init__(self) -> None:
        self._models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model, tokenizer, templates: Sequence[str]) -> _Prefixes:
        per_model = self._models.setdefault(model, {})
        projection = model.text_projection
        # In-place changes of the weights (an optimizer step, load_state_dict) bump the tensors' versions.
        version = sum(parameter._version for parameter in _text_parameters(model))
        key = (tuple(templates), str(projection.device), str(projection.dtype), version)
        if key not in per_model:
            per_model.clear()  # one template list per model at a time (a language switch recomputes, ~20 ms)
            per_model[key] = self._compute(model, tokenizer, templates)
        return per_model[key]

    @staticmethod
    @torch.inference_mode()
    def _compute(model, tokenizer, templates: Sequence[str]) -> _Prefixes:
        device = model.text_projection.device
        heads = [template.split("{}")[0].rstrip() for template in templates]
        tokens = tokenizer(heads).to(device)
        # The tokenizer ends each beginning with end-of-text (the highest id): not part of a prompt's start.
        lengths = torch.clamp((tokens != 0).sum(dim=1) - 1, min=1)
        width = int(lengths.max())
        tokens = tokens[:, :width] * (torch.arange(width, device=device)[None] < lengths[:, None])
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:width].to(cast)
        mask = model.attn_mask[:width, :width]
        keys, values = [], []
        for block in model.transformer.resblocks:
            _, k, v = _keys_values(block, x)
            keys.append(k)
            values.append(v)
            x = block(x, attn_mask=mask)
        return _Prefixes(tokens, lengths, keys, values)


PREFIXES = PrefixCache()


@torch.inference_mode()
def encode_with_prefixes(model, tokenizer, templates: Sequence[str], query: str) -> torch.Tensor:
    """(len(templates), embed_dim) end-of-text features of each template filled with `query`
    (the same as `text.encode_tokens` on the tokenized prompts, before normalisation)."""
    prefixes = PREFIXES.get(model, tokenizer, templates)
    device = model.text_projection.device
    tokens = tokenizer([template.format(query) for template in templates]).to(device)
    width = prefixes.tokens.shape[1]
    span = min(width, tokens.shape[1])
    # How many leading tokens of each prompt are its template's beginning (start-of-text at least).
    same = (tokens[:, :span] == prefixes.tokens[:, :span]) & (
        torch.arange(span, device=device)[None] < prefixes.lengths[:, None])
    ends = tokens.argmax(dim=-1)  # end-of-text: the highest id
    shared = torch.minimum(torch.clamp(torch.cumprod(same.int(), dim=1).sum(dim=1), min=1), ends)
    rest = ends - shared + 1  # tokens each prompt still runs, end-of-text included
    cast = model.transformer.get_cast_dtype()
    out = torch.empty(len(templates), model.text_projection.shape[1], dtype=model.text_projection.dtype,
                      device=device)
    # Prompts with as many remaining tokens run together: no padding, one causal mask per group.
    for length in torch.unique(rest).tolist():
        rows = torch.nonzero(rest == length).flatten()
        positions = shared[rows, None] + torch.arange(length, device=device)[None]
        x = model.token_embedding(tokens[rows].gather(1, positions))
        x = x.to(cast) + model.positional_embedding[positions].to(cast)
        seen_prefix = torch.arange(width, device=device)[None, :] < shared[rows, None]  # (R, P)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = torch.cat([seen_prefix[:, None, None, :].expand(-1, 1, length, width),
                          causal[None, None].expand(len(rows), 1, length, length)], dim=-1)
        for block, prefix_k, prefix_v in zip(model.transformer.resblocks, prefixes.keys, prefixes.values):
            q, k, v = _keys_values(block, x)
            k = torch.cat([prefix_k[rows], k], dim=2)
            v = torch.cat([prefix_v[rows], v], dim=2)
            x = _block_rest(block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        x = model.ln_final(x[:, -1])
        out[rows] = (x @ model.text_projection).to(out.dtype)
    return out
