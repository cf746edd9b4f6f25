"""Image-text retrieval evaluation on the RSICD / RSITMD release layout (the figures MPS-CLIP and FarSLIP publish).

Layout: a folder with the dataset's caption JSON (`dataset_rsicd.json`, `dataset_RSITMD.json`: a
top-level "images" list whose entries have "filename", "split" and "sentences" with "raw" text)
and the images, in the folder itself or in a subfolder (RSICD_images/, images/, ...).

Protocol (as the published tables): images resized so the short side is the model's input size
(bicubic), centre-cropped, CLIP-normalised; each caption encoded as written; cosine similarity.
Image -> text R@K: the share of images with at least one of their own captions among the K most
similar captions. Text -> image R@K: the share of captions whose image is among the K most similar
images. mR is the mean of the six recalls (K = 1, 5, 10 both ways), in percent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dense import normalize_pixels
from .errors import CancelledError, InputError
from .models import LoadedModel
from .options import check_batch_size
from .text import encode_tokens

RECALL_KS = (1, 5, 10)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass
class CaptionSet:
    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # (T,) index of each caption's image


def _json_problem(path: Path, error: Exception) -> str:
    """Why a .json file could not be read, with the place of a syntax or encoding error."""
    if isinstance(error, json.JSONDecodeError):
        return f"{path.name} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
    if isinstance(error, UnicodeDecodeError):
        return (f"{path.name} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at position {error.start}); "
                "save it as UTF-8")
    if isinstance(error, OSError):
        return f"{path.name} cannot be read ({error.strerror or error})"
    return f"{path.name} cannot be read ({error})"


def find_caption_file(folder: Path) -> Path:
    candidates = sorted(p for p in folder.glob("*.json") if p.is_file())
    problems: list[str] = []
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.append(_json_problem(path, error))
            continue
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            return path
    if problems:
        raise InputError(f"{folder} holds no readable caption JSON of the RSICD/RSITMD release: "
                         f"{'; '.join(problems)}. Fix the file, or put the release's dataset_*.json there.")
    raise InputError(f"{folder} holds no caption JSON of the RSICD/RSITMD release (a .json file with an "
                     "'images' list, e.g. dataset_rsicd.json).")


def _image_path(folder: Path, filename: str) -> Path | None:
    direct = folder / filename
    if direct.is_file():
        return direct
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / filename).is_file():
            return sub / filename
    return None


def load_caption_set(folder: str | Path, split: str = "test") -> CaptionSet:
    """The images and captions of one split ('all' for every entry) of a dataset folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"The dataset folder {folder} does not exist.")
    caption_file = find_caption_file(folder)
    entries = json.loads(caption_file.read_text(encoding="utf-8"))["images"]
    images: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    missing: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict) or (split != "all" and entry.get("split") != split):
            continue
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            raise InputError(f"In {caption_file.name}, an image entry (imgid {entry.get('imgid')}) has "
                             f"\"filename\": {json.dumps(filename)[:40]}; give every image its file name.")
        path = _image_path(folder, filename)
        if path is None:
            missing.append(str(entry.get("filename")))
            continue
        sentences = entry.get("sentences", [])
        if not isinstance(sentences, list):
            raise InputError(f"In {caption_file.name}, the 'sentences' of image {entry.get('filename')} are not a "
                             "list; each image needs a list of {\"raw\": \"caption text\"} entries.")
        texts = []
        for sentence in sentences:
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise InputError(f"In {caption_file.name}, a caption of image {entry.get('filename')} has no \"raw\" "
                                 "text; give every caption its text (or remove the caption).")
            raw = sentence["raw"]
            if not isinstance(raw, str):
                raise InputError(f"In {caption_file.name}, a caption of image {entry.get('filename')} has "
                                 f"\"raw\": {json.dumps(raw)[:40]}, not text; give every caption its text (or "
                                 "remove the caption).")
            if raw.strip():
                texts.append(raw.strip())
        if not texts:
            continue
        for text in texts:
            captions.append(text)
            owner.append(len(images))
        images.append(path)
    if missing:
        raise InputError(f"{len(missing)} image(s) named in {caption_file.name} are not in {folder} or its "
                         f"subfolders, e.g. {missing[0]}.")
    if not images:
        splits = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
        raise InputError(f"{caption_file.name} has no captioned image in the split {split!r}; its splits are "
                         f"{', '.join(splits)} (or use --split all).")
    return CaptionSet(images, captions, np.asarray(owner))


def retrieval_recalls(similarity: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """R@1/5/10 both ways and mR, in percent, from an (images x captions) similarity matrix."""
    n_images = similarity.shape[0]
    results: dict[str, float] = {}
    # Rank of the best own caption for each image (0 = first).
    order = np.argsort(-similarity, axis=1, kind="stable")
    own = caption_image[order] == np.arange(n_images)[:, None]
    first_own = own.argmax(axis=1)
    # Rank of each caption's image among all images.
    image_order = np.argsort(-similarity.T, axis=1, kind="stable")
    image_rank = (image_order == caption_image[:, None]).argmax(axis=1)
    for k in RECALL_KS:
        results[f"i2t_R@{k}"] = 100.0 * float((first_own < k).mean())
    for k in RECALL_KS:
        results[f"t2i_R@{k}"] = 100.0 * float((image_rank < k).mean())
    results["mR"] = float(np.mean(list(results.values())))
    return results


def _load_image(path: Path, side: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as exc:
        raise InputError(f"The image {path} cannot be read ({exc}).") from exc
    width, height = rgb.size
    factor = side / min(width, height)
    rgb = rgb.resize((max(side, round(width * factor)), max(side, round(height * factor))), Image.Resampling.BICUBIC)
    left, top = (rgb.size[0] - side) // 2, (rgb.size[1] - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1)


@torch.inference_mode()
def embed_images(loaded: LoadedModel, paths: list[Path], batch_size: int = 32, progress=None,
                 should_cancel=None) -> np.ndarray:
    size = loaded.model.visual.image_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    out = []
    for start in range(0, len(paths), batch_size):
        if should_cancel is not None and should_cancel():
            raise CancelledError("The evaluation was cancelled.")
        pixels = torch.stack([_load_image(p, side) for p in paths[start:start + batch_size]]).to(loaded.device)
        out.append(F.normalize(loaded.model.encode_image(normalize_pixels(pixels)).float(), dim=-1).cpu())
        if progress is not None:
            progress(min(start + batch_size, len(paths)), len(paths))
    return torch.cat(out).numpy()


@torch.inference_mode()
def embed_captions(loaded: LoadedModel, captions: list[str], batch_size: int = 64) -> np.ndarray:
    out = []
    for start in range(0, len(captions), batch_size):
        tokens = loaded.tokenizer(captions[start:start + batch_size]).to(loaded.device)
        out.append(F.normalize(encode_tokens(loaded.model, tokens).float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def evaluate_retrieval(folder: str | Path, loaded: LoadedModel, split: str = "test", batch_size: int = 32,
                       progress: Callable[[int, int], None] | None = None, should_cancel=None) -> dict:
    batch_size = check_batch_size(batch_size)
    captions = load_caption_set(folder, split)
    image_vectors = embed_images(loaded, captions.images, batch_size, progress, should_cancel)
    caption_vectors = embed_captions(loaded, captions.captions)
    recalls = retrieval_recalls(image_vectors @ caption_vectors.T, captions.caption_image)
    return {"dataset": str(Path(folder).resolve()), "split": split, "images": len(captions.images),
            "captions": len(captions.captions), "model": loaded.name, "recalls": recalls}
