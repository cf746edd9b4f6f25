"""`farslip models`: the registry, fine-tuned and SAM models as a plain-text table."""

from __future__ import annotations

from backend.engine import paths
from backend.engine.models import list_models, unusable_finetuned
from backend.engine.registry import DEFAULT_MODEL
from backend.engine.weights import hf_cache_dir


def format_models_table(models: list[dict] | None = None) -> str:
    """Plain-text table for `farslip models`."""
    models = list_models() if models is None else models
    rows = [("name", "arch", "ctx", "present", "licence", "weights")]
    for m in models:
        name = m["name"] + (" *" if m["name"] == DEFAULT_MODEL else "") + (" (multilingual)" if m.get("multilingual")
                                                                           else "")
        if m["present"]:
            where = m["path"]
        else:
            where = f"missing: put {m['hf_repo']}/{m['hf_file']} at {m['expected_path']}"
        rows.append((name, m["arch"], str(m["context_length"]), "yes" if m["present"] else "no",
                     m["licence"], where))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    lines.append("")
    lines.append(f"* default model. Weights directory: {paths.weights_dir()} (set FARSLIP_WEIGHTS to change); "
                 f"Hugging Face cache: {hf_cache_dir()}; fine-tuned models: {paths.models_dir()}.")
    for folder, reason in unusable_finetuned():  # a folder that is there but offers no model: why, not silence
        lines.append(f"Not offered: fine-tuned model folder {folder.name}: {reason}")
    return "\n".join(lines)
