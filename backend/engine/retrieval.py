"""Image-text retrieval evaluation on the RSICD / RSITMD release layout (the figures MPS-CLIP and FarSLIP publish).

Layout: a folder with the dataset's caption JSON (`dataset_rsicd.json`, `dataset_RSITMD.json`: a
top-level "images" list whose entries have "filename", "split" and "sentences" with "raw" text)
and the images, in the folder itself or in a subfolder (RSICD_images/, images/, ...). The caption JSON
itself may be given instead of its folder; in a folder with other .json files, the one whose entries have
the release's layout (or is named dataset_*.json) is taken, and a choice left open is refused.

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
from .search import fit_to_context
from .text import encode_tokens

RECALL_KS = (1, 5, 10)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass
class CaptionSet:
    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # (T,) index of each caption's image
    caption_file: Path


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


def _is_release_layout(data: dict) -> bool:
    """Whether a caption JSON's image entries look like the release's: a "filename" and "sentences" each."""
    return any(isinstance(entry, dict) and "filename" in entry and "sentences" in entry for entry in data["images"])


def _caption_file_and_data(path: Path) -> tuple[Path, dict]:
    """The caption JSON of a dataset and its content: `path` itself when it is a file; in a folder, the .json
    file with an "images" list, or among several, the one whose entries have the release's layout, or among
    several of those, the one named dataset_*.json. More than one left is refused naming them."""
    if not path.exists():
        raise InputError(f"The dataset folder or caption JSON {path} does not exist.")
    readable: list[tuple[Path, dict]] = []
    problems: list[str] = []
    for candidate in [path] if path.is_file() else sorted(p for p in path.glob("*.json") if p.is_file()):
        try:
            data = json.loads(candidate.read_text(encoding="utf-8-sig"))  # a BOM, as Windows editors write
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.append(_json_problem(candidate, error))
            continue
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            readable.append((candidate, data))
    if path.is_file() and not readable:
        raise InputError(f"{problems[0] if problems else f'{path.name} has no images list'}: it is not a caption "
                         "JSON of the RSICD/RSITMD release (an 'images' list of entries with 'filename', 'split' "
                         "and 'sentences'). Fix the file, or give the release's dataset_*.json.")
    if not readable and problems:
        raise InputError(f"{path} holds no readable caption JSON of the RSICD/RSITMD release: "
                         f"{'; '.join(problems)}. Fix the file, or put the release's dataset_*.json there.")
    if not readable:
        raise InputError(f"{path} holds no caption JSON of the RSICD/RSITMD release (a .json file with an "
                         "'images' list, e.g. dataset_rsicd.json).")
    release = [item for item in readable if _is_release_layout(item[1])] or readable
    named = [item for item in release if item[0].name.lower().startswith("dataset_")]
    chosen = named if len(release) > 1 and named else release
    if len(chosen) > 1:
        names = ", ".join(item[0].name for item in chosen)
        raise InputError(f"{path} holds {len(chosen)} caption JSON files of the RSICD/RSITMD layout ({names}); "
                         f"give the one to evaluate instead of the folder, e.g. {chosen[0][0]}.")
    return chosen[0]


def find_caption_file(path: Path) -> Path:
    """The caption JSON a dataset folder (or the file itself) is evaluated with (_caption_file_and_data)."""
    return _caption_file_and_data(Path(path))[0]


def _image_path(folder: Path, filename: str) -> Path | None:
    direct = folder / filename
    if direct.is_file():
        return direct
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / filename).is_file():
            return sub / filename
    return None


def dataset_files(dataset: str | Path) -> list[Path]:
    """The caption JSON and every image it names (any split) that is there: the files a run's outputs must not
    replace."""
    caption_file, data = _caption_file_and_data(Path(dataset))
    names = {entry.get("filename") for entry in data["images"] if isinstance(entry, dict)}
    found = [_image_path(caption_file.parent, name) for name in sorted(n for n in names if isinstance(n, str) and n)]
    return [caption_file, *(path for path in found if path is not None)]


def load_caption_set(dataset: str | Path, split: str = "test") -> CaptionSet:
    """The images and captions of one split ('all' for every entry) of a dataset folder or its caption JSON;
    the images lie beside the caption JSON or in a subfolder of its folder."""
    caption_file, data = _caption_file_and_data(Path(dataset))
    folder = caption_file.parent
    entries = data["images"]
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
        splits = sorted({e["split"] for e in entries if isinstance(e, dict) and isinstance(e.get("split"), str)})
        if not entries:
            raise InputError(f"{caption_file.name} lists no image: its 'images' list is empty.")
        if split == "all":
            raise InputError(f"{caption_file.name} has no image with a caption.")
        raise InputError(f"{caption_file.name} has no captioned image in the split {split!r}; "
                         + (f"its splits are {', '.join(splits)}" if splits else "its images name no split")
                         + " (or use --split all).")
    return CaptionSet(images, captions, np.asarray(owner), caption_file)


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


EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _load_image(path: Path, side: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in EIGHT_BIT_MODES:  # 16-bit or float: convert("RGB") clips it to white
                raise InputError(f"The image {path} is not 8-bit (PIL mode {image.mode}): the RSICD/RSITMD images "
                                 "are 8-bit RGB, as the protocol reads them. Convert it (e.g. gdal_translate -ot "
                                 "Byte -scale) or leave it out.")
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


def cut_captions_notices(loaded: LoadedModel, captions: list[str]) -> list[str]:
    """Search's notice (search.fit_to_context) for the first caption longer than the model reads, and how
    many more are: the tokenizer reads only their beginning, as the published protocol does."""
    cut = [notice for notice in (fit_to_context(caption, loaded, "caption")[1] for caption in captions) if notice]
    if len(cut) > 1:
        cut[1:] = [f"{len(cut) - 1} more of the {len(captions)} captions are longer than model {loaded.name} "
                   "reads; only their beginning was used."]
    return cut


def evaluate_retrieval(dataset: str | Path, loaded: LoadedModel, split: str = "test", batch_size: int = 32,
                       progress: Callable[[int, int], None] | None = None, should_cancel=None) -> dict:
    """Recalls of `loaded` on a dataset folder (or its caption JSON); the caption file used and the notices."""
    batch_size = check_batch_size(batch_size)
    captions = load_caption_set(dataset, split)
    image_vectors = embed_images(loaded, captions.images, batch_size, progress, should_cancel)
    caption_vectors = embed_captions(loaded, captions.captions)
    recalls = retrieval_recalls(image_vectors @ caption_vectors.T, captions.caption_image)
    return {"dataset": str(captions.caption_file.parent.resolve()), "caption_file": str(captions.caption_file),
            "split": split, "images": len(captions.images), "captions": len(captions.captions),
            "model": loaded.name, "recalls": recalls, "notices": cut_captions_notices(loaded, captions.captions)}
