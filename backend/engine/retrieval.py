"""Image-text retrieval evaluation on the RSICD / RSITMD release layout, counted as FarSLIP's evaluation
(protocol "farslip") or as MPS-CLIP's (protocol "mpsclip").

Layout: a folder with the dataset's caption JSON (`dataset_rsicd.json`, `dataset_RSITMD.json`: a
top-level "images" list whose entries have "filename", "split" and "sentences" with "raw" text)
and the images, in the folder itself or in a subfolder (RSICD_images/, images/, ...). The caption JSON
itself may be given instead of its folder; in a folder with other .json files, the one whose entries have
the release's layout (or is named dataset_*.json) is taken, and a choice left open is refused.

Both protocols: images preprocessed as open_clip's validation transform (the short side resized to the
model's input size, bicubic, the long side truncated; centre crop with the offset rounded; RGB;
CLIP-normalised); cosine similarity; mR the mean of the six recalls (K = 1, 5, 10 both ways), in percent.

farslip (NJU-LHRS/FarSLIP tests/test_retrieval.py): "a satellite image. " before every caption; each
distinct image file and each distinct caption text once. Text -> image R@K: the share of distinct texts
with any image that has this text among the K most similar images; image -> text R@K: the share of
images with any of their texts among the K most similar texts. Equal scores: the image whose path sorts
first, the text that sorts first (code point order), ranks first.

mpsclip (MPS-CLIP's itm_eval): every caption as written, scored on its own against the one image whose
entry lists it (a caption repeated on several images is several captions). Image -> text R@K: the share of
images with one of their own captions among the K most similar captions; text -> image R@K: the share of
captions whose image is among the K most similar images. Equal scores: the one earlier in the caption
JSON ranks first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
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
PROTOCOLS = ("farslip", "mpsclip")
DEFAULT_PROTOCOL = "farslip"
FARSLIP_CAPTION_PREFIX = "a satellite image. "  # FarSLIP's evaluation writes it before RSICD/RSITMD/UCM captions
PROTOCOL_SUMMARY = {
    "farslip": "FarSLIP's evaluation: 'a satellite image. ' before each caption; each distinct image and caption "
               "text once; a hit is any image with that text, or any of the image's texts",
    "mpsclip": "MPS-CLIP's evaluation: each caption as written, scored on its own against its one image",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass
class CaptionSet:
    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # (T,) index of each caption's image
    caption_file: Path
    left_out: list[str] = field(default_factory=list)  # file names of the split's images with no caption text


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
    left_out: list[str] = []
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
            left_out.append(filename)
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
        if left_out:  # the split's images are there, each with an empty or blank 'sentences' list
            raise InputError(f"The {len(left_out)} image(s) of {caption_file.name} in the split {split!r} have no "
                             "caption: their 'sentences' lists are empty (or hold only blank text); give each "
                             "image its captions as {\"raw\": \"caption text\"} entries.")
        raise InputError(f"{caption_file.name} has no captioned image in the split {split!r}; "
                         + (f"its splits are {', '.join(splits)}" if splits else "its images name no split")
                         + " (or use --split all).")
    return CaptionSet(images, captions, np.asarray(owner), caption_file, left_out)


def check_protocol(protocol: str) -> str:
    """The protocol name, or a refusal naming the two."""
    if protocol not in PROTOCOLS:
        raise InputError(f"The retrieval protocol must be farslip (FarSLIP's evaluation) or mpsclip (MPS-CLIP's); "
                         f"got {protocol!r}.")
    return protocol


def left_out_notice(captions: CaptionSet, split: str) -> str | None:
    """A notice naming the images of the split left out because none of their captions has any text."""
    if not captions.left_out:
        return None
    shown = ", ".join(captions.left_out[:5]) + (f" and {len(captions.left_out) - 5} more"
                                                if len(captions.left_out) > 5 else "")
    return (f"{len(captions.left_out)} image(s) of the {split!r} split in {captions.caption_file.name} have no "
            f"caption text and are left out of the recalls: {shown}.")


@dataclass
class DistinctPairs:
    """FarSLIP's ground truth: distinct image files, distinct caption texts, and which image has which text."""
    images: list[Path]
    texts: list[str]
    pairs: np.ndarray  # (P, 2): (image index, text index), each pair once


def distinct_pairs(captions: CaptionSet, prefix: str = FARSLIP_CAPTION_PREFIX) -> DistinctPairs:
    """Distinct image files (sorted by path) and distinct caption texts (`prefix` + caption, sorted), as FarSLIP
    groups its image-caption table by file path and by caption."""
    texts = [prefix + caption for caption in captions.captions]
    image_paths = [captions.images[i] for i in captions.caption_image]
    images = sorted(set(image_paths), key=str)
    distinct_texts = sorted(set(texts))
    image_index = {path: i for i, path in enumerate(images)}
    text_index = {text: i for i, text in enumerate(distinct_texts)}
    pairs = sorted({(image_index[path], text_index[text]) for path, text in zip(image_paths, texts)})
    return DistinctPairs(images, distinct_texts, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))


def farslip_recalls(similarity: np.ndarray, pairs: np.ndarray) -> dict[str, float]:
    """R@1/5/10 both ways and mR, in percent, as FarSLIP counts them, from an (images x texts) similarity matrix
    and the (image, text) pairs of the ground truth: a text's hit at K is any of its images in its top K, an
    image's any of its texts. Equal scores: the lower index (earlier image, earlier text) ranks first."""
    truth = np.zeros(similarity.shape, dtype=bool)
    truth[pairs[:, 0], pairs[:, 1]] = True
    text_order = np.argsort(-similarity, axis=1, kind="stable")
    first_text = np.take_along_axis(truth, text_order, axis=1).argmax(axis=1)
    image_order = np.argsort(-similarity.T, axis=1, kind="stable")
    first_image = np.take_along_axis(truth.T, image_order, axis=1).argmax(axis=1)
    results: dict[str, float] = {}
    for k in RECALL_KS:
        results[f"i2t_R@{k}"] = 100.0 * float((first_text < k).mean())
    for k in RECALL_KS:
        results[f"t2i_R@{k}"] = 100.0 * float((first_image < k).mean())
    results["mR"] = float(np.mean(list(results.values())))
    return results


def retrieval_recalls(similarity: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """R@1/5/10 both ways and mR, in percent, as MPS-CLIP counts them, from an (images x captions) similarity
    matrix: each caption against its one image. Equal scores: the lower index (earlier in the JSON) ranks first."""
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
    """open_clip's validation preprocess, step by step (torchvision's Resize(side) bicubic: the short side to
    `side`, the long side int(side * long / short); CenterCrop(side): offsets int(round((size - side) / 2));
    then RGB), as 0..255 floats for normalize_pixels."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as image:
            if image.mode not in EIGHT_BIT_MODES:  # 16-bit or float: convert("RGB") clips it to white
                raise InputError(f"The image {path} is not 8-bit (PIL mode {image.mode}): the RSICD/RSITMD images "
                                 "are 8-bit RGB, as the protocol reads them. Convert it (e.g. gdal_translate -ot "
                                 "Byte -scale) or leave it out.")
            image.load()
            resized = TF.resize(image, side, interpolation=InterpolationMode.BICUBIC)
            rgb = TF.center_crop(resized, side).convert("RGB")
    except OSError as exc:
        raise InputError(f"The image {path} cannot be read ({exc}).") from exc
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
                       progress: Callable[[int, int], None] | None = None, should_cancel=None,
                       protocol: str = DEFAULT_PROTOCOL) -> dict:
    """Recalls of `loaded` on a dataset folder (or its caption JSON) counted by `protocol` (PROTOCOLS); the
    caption file used, the images left out for want of a caption, and the notices."""
    batch_size = check_batch_size(batch_size)
    check_protocol(protocol)
    captions = load_caption_set(dataset, split)
    if protocol == "farslip":
        distinct = distinct_pairs(captions)
        images, texts = distinct.images, distinct.texts
    else:
        images, texts = captions.images, captions.captions
    image_vectors = embed_images(loaded, images, batch_size, progress, should_cancel)
    caption_vectors = embed_captions(loaded, texts)
    similarity = image_vectors @ caption_vectors.T
    if protocol == "farslip":
        recalls = farslip_recalls(similarity, distinct.pairs)
    else:
        recalls = retrieval_recalls(similarity, captions.caption_image)
    notices = [notice for notice in [left_out_notice(captions, split)] if notice]
    return {"dataset": str(captions.caption_file.parent.resolve()), "caption_file": str(captions.caption_file),
            "split": split, "protocol": protocol, "protocol_summary": PROTOCOL_SUMMARY[protocol],
            "caption_prefix": FARSLIP_CAPTION_PREFIX if protocol == "farslip" else "",
            "images": len(images), "captions": len(captions.captions), "distinct_captions": len(set(texts)),
            "texts_scored": len(texts), "left_out_images": list(captions.left_out), "model": loaded.name,
            "recalls": recalls, "notices": notices + cut_captions_notices(loaded, texts)}
