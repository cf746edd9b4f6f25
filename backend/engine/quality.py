"""How good is this result? A label-free quality estimate per polygon and per run (RS-SQA row).

Signals of a polygon, all in [0, 1] or close to it, computed during `segment`:
- `score_mean`: mean top-1 class probability of its pixels (already a polygon field);
- `margin`: mean difference between the top two class probabilities;
- `entropy`: mean entropy of the class probabilities, divided by log(number of classes);
- `sharpness`: mean gradient magnitude of the top-1 probability on the polygon's outline pixels
  (a confident object has a steep edge; a blob cut out of a flat, uncertain field has none; a border with
  nodata or the raster's edge is no edge: the gradient there is one-sided);
- `region_agr` (region agreement): the polygon's bounding box with context, read from the raster and
  run through the image tower's global (CLS) path, scored against all class lines like `classify`;
  the probability of the polygon's own class. FarSLIP is trained for exactly this region-category
  alignment, so it is an independent second opinion on the patch-level decision.
The first four are summed per region while the class raster is polygonised (vectorize.py), over
every pixel of the region; region crops run in batches.

`quality` = a logistic model over those signals (QualityModel). The default coefficients were set by
the team from the construction of the signals (each pushes in the direction that means "more
likely right") and checked on test scenes with known truth; `farslip evaluate --calibrate-quality`
fits them on the user's labelled tiles and stores the calibration with the model. The run-level
estimate of mIoU is the mean over classes of the area-weighted mean quality of their polygons.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.transform import Affine

from .atomic import finite_json, write_text_atomically
from .dense import normalize_pixels
from .encoders import autocast_enabled
from .errors import CancelledError, InputError
from .feature_cache import FeatureCache
from .models import LoadedModel
from .options import finite_number
from .raster import PixelSource, PixelWindow, RasterSource
from .text import class_probabilities, embedding_width, logit_scale
from .presets import parse_class_lines

SIGNALS = ("score_mean", "margin", "entropy", "sharpness", "region_agr")
FIELDS = ("quality", "margin", "entropy", "sharpness", "region_agr")
CALIBRATION_FORMAT = "farslip-quality/1"
CONTEXT = 0.5  # region crops: the bounding box grown by this fraction of its size on each side
MIN_CROP = 32  # pixels
REGION_BATCH = 16
MIN_REGION_PIXELS = 256  # one 16-px patch: smaller polygons get no region check (their fill value)
REGION_SHARE = 0.125  # at most one region crop per 8 crops of the dense pass (largest polygons first)
OVERVIEW_PIXELS = 4_000_000  # the lattice large region crops are sampled from (RegionPixels): 48 MB at most
STRIP_PIXELS = 4_000_000  # source pixels per read while the lattice is read
# What the region embeddings in the feature cache depend on besides the model: how crops are sampled.
REGION_SCOPE = "global/lattice-1"
MIN_CALIBRATION_TILES = 12


def top_two(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best, best_ids, runner_up) per pixel of class probabilities (C, h, w) in one pass per plane.

    best_ids is uint8 and names the first class on a tie (as argmax does); a NaN plane keeps the
    pixel's best and runner-up NaN. Cheaper than a max with indices followed by a masked second max:
    the runner-up is the larger of itself and the smaller of (best, next plane).
    """
    best = probs[0].clone()
    ids = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    runner_up = torch.full_like(best, float("-inf"))
    if probs.shape[0] == 1:
        return best, ids, runner_up
    smaller = torch.empty_like(best)
    above = torch.empty(best.shape, dtype=torch.bool, device=best.device)
    step = torch.empty_like(ids)
    for c in range(1, probs.shape[0]):
        plane = probs[c]
        # ids = c where the plane is above the best so far: ids += above * (c - ids), in uint8 (modulo
        # 256, so exact); a masked fill branches on every pixel and took ten times longer on the CPU.
        torch.gt(plane, best, out=above)
        torch.sub(c, ids, out=step).mul_(above.view(torch.uint8))
        ids.add_(step)
        torch.minimum(best, plane, out=smaller)
        torch.maximum(runner_up, smaller, out=runner_up)
        torch.maximum(best, plane, out=best)
    return best, ids, runner_up


def signal_planes(probs: torch.Tensor, best: torch.Tensor | None = None,
                  runner_up: torch.Tensor | None = None) -> torch.Tensor:
    """(2, h, w) margin and normalised entropy per pixel from class probabilities (C, h, w), on their
    device; NaN stays NaN. `best`/`runner_up`: from `top_two`, when the caller has them already.

    The engine computes this for every block, so it avoids passes over the C planes: the entropy of
    p = q / T is log T - sum(q log q) / T, with q log q taken as 0 at q = 0.
    """
    n = probs.shape[0]
    out = torch.empty((2, *probs.shape[1:]), dtype=torch.float32, device=probs.device)
    if n == 1:
        out[0] = probs[0]
        out[1] = 0.0
        return out
    if best is None or runner_up is None:
        best, _, runner_up = top_two(probs)
    torch.sub(best, runner_up, out=out[0])
    total = probs.sum(dim=0)
    tiny = torch.finfo(probs.dtype).tiny
    spread = probs.clamp(min=tiny).log_().mul_(probs).sum(dim=0).div_(total)
    entropy = torch.log(total, out=out[1]).sub_(spread).div_(math.log(n))
    if torch.count_nonzero(total).item() < total.numel():  # rare (never after a softmax): no masked pass
        entropy.masked_fill_(total == 0, 0.0)
    return out


def pixel_signals(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(margin, normalised entropy) per pixel from class probabilities (C, h, w); NaN stays NaN."""
    planes = signal_planes(torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))).numpy()
    return planes[0], planes[1]


@dataclass
class PolygonSignals:
    """One value per polygon and signal (NaN where a signal could not be computed)."""

    values: dict[str, np.ndarray]

    def matrix(self) -> np.ndarray:
        return np.stack([self.values[name] for name in SIGNALS], axis=1)


@dataclass
class QualityModel:
    """quality = sigmoid(intercept + sum(coef * signal)); a missing signal takes its `fill` value."""

    coef: list[float] = field(default_factory=lambda: [2.0, 3.0, -2.0, 2.0, 2.5])
    intercept: float = -2.5
    fill: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.5, 0.1, 0.5])
    source: str = "default"
    weights_sha256: str | None = None
    class_lines: list[str] | None = None
    metrics: dict = field(default_factory=dict)

    def predict(self, signals: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(signals), np.asarray(self.fill), signals)
        z = self.intercept + x @ np.asarray(self.coef)
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: Path) -> Path:
        data = {"format": CALIBRATION_FORMAT, "signals": list(SIGNALS), **asdict(self)}
        # A figure of its metrics that could not be measured (NaN) is null: the file stays JSON any reader takes.
        return write_text_atomically(path, json.dumps(finite_json(data), indent=1, ensure_ascii=False,
                                                      allow_nan=False))

    @classmethod
    def load(cls, path: Path, weights_sha256: str | None = None,
             class_lines: Sequence[str] | None = None) -> QualityModel:
        """A stored calibration; refused when it was made for another model or class list."""
        try:  # utf-8-sig: an editor's "UTF-8" may put a byte order mark first
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise InputError(f"The quality calibration {path} is unreadable ({exc}).") from exc
        if (not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT
                or data.get("signals") != list(SIGNALS)):
            raise InputError(f"{path} is not a FarSLIP quality calibration (format {CALIBRATION_FORMAT}).")
        _check_calibration_values(path, data)
        model = cls(**{k: data[k] for k in ("coef", "intercept", "fill", "source", "weights_sha256",
                                            "class_lines", "metrics") if k in data})
        if weights_sha256 and model.weights_sha256 and model.weights_sha256 != weights_sha256:
            raise InputError(f"The quality calibration {path} was made for another model (weights "
                             f"{model.weights_sha256[:12]}, this model {weights_sha256[:12]}); calibrate "
                             "again with this model.")
        if class_lines is not None and model.class_lines is not None and not same_classes(class_lines,
                                                                                          model.class_lines):
            raise InputError(f"The quality calibration {path} was made for the classes "
                             f"{'; '.join(model.class_lines)}, not {'; '.join(class_lines) or 'none'}; calibrate "
                             "again with this class list.")
        return model


def same_classes(lines: Sequence[str], others: Sequence[str]) -> bool:
    """Whether two class lists name the same classes: each class by its synonyms as the model reads them (letter
    case, spaces around a comma and the order of the classes aside; the signals do not depend on them)."""
    def classes(given: Sequence[str]) -> list[tuple[str, ...]]:
        return sorted(tuple(unicodedata.normalize("NFKC", query).casefold() for query in spec.queries)
                      for spec in parse_class_lines(list(given)))

    try:
        return classes(lines) == classes(others)
    except InputError:  # a list that does not parse is no match
        return False


def _check_calibration_values(path: Path, data: dict) -> None:
    """Each value a calibration holds has the type and size `predict` needs: a hand-edited or damaged file is
    refused in one sentence, never a traceback halfway through a run, or NULL qualities without a word."""
    def wrong(key: str, wanted: str) -> InputError:
        return InputError(f"The quality calibration {path} is not usable: its {key!r} must be {wanted}; got "
                          f"{json.dumps(data[key])[:100]}. Calibrate again (farslip evaluate --calibrate-quality).")

    missing = [key for key in ("coef", "intercept", "fill") if key not in data]
    if missing:  # completed from the built-in values, it would be another estimate under this file's name
        raise InputError(f"The quality calibration {path} is not usable: it has no {' or '.join(map(repr, missing))}. "
                         "Calibrate again (farslip evaluate --calibrate-quality).")
    for key in ("coef", "fill"):
        if key in data and not (isinstance(data[key], list) and len(data[key]) == len(SIGNALS)
                                and all(finite_number(v) for v in data[key])):
            raise wrong(key, f"{len(SIGNALS)} finite numbers, one per signal ({', '.join(SIGNALS)})")
    if "intercept" in data and not finite_number(data["intercept"]):
        raise wrong("intercept", "a finite number")
    for key in ("weights_sha256", "source"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise wrong(key, "a text")
    if data.get("class_lines") is not None and not (isinstance(data["class_lines"], list)
                                                    and all(isinstance(v, str) for v in data["class_lines"])):
        raise wrong("class_lines", "a list of class lines")
    if data.get("metrics") is not None and not isinstance(data["metrics"], dict):
        raise wrong("metrics", "an object")


def calibration_path_for(model_dir: Path) -> Path:
    return Path(model_dir) / "quality_calibration.json"


def _pixel_box(geometry, transform: Affine, height: int, width: int) -> tuple[int, int, int, int]:
    """Rows/cols [r0, r1) x [c0, c1) of the window raster covering `geometry`, one pixel of margin."""
    xmin, ymin, xmax, ymax = geometry.bounds
    inverse = ~transform
    cols, rows = zip(*(inverse @ (x, y) for x in (xmin, xmax) for y in (ymin, ymax)))
    r0, r1 = max(math.floor(min(rows)) - 1, 0), min(math.ceil(max(rows)) + 1, height)
    c0, c1 = max(math.floor(min(cols)) - 1, 0), min(math.ceil(max(cols)) + 1, width)
    return r0, r1, c0, c1


def region_signals(regions) -> dict[str, np.ndarray]:
    """score_mean, margin, entropy and sharpness of every region (summed when it was polygonised)."""
    return {name: np.array([getattr(region, name) for region in regions], dtype=float).reshape(len(regions))
            for name in ("score_mean", "margin", "entropy", "sharpness")}


def region_crop_window(geometry, transform: Affine, window: PixelWindow, source_shape: tuple[int, int]
                       ) -> PixelWindow:
    """A square window of the processing grid around the polygon's bounding box, with context.

    The side is the next step of a fixed ladder (MIN_CROP times powers of sqrt(2)) and the corner lies
    on a grid of a quarter of the side (the box stays inside: it fills at most half the side), so a
    polygon that comes back in a run with other classes asks for the same window, whose embedding
    the feature cache then already holds.
    """
    height, width = source_shape
    r0, r1, c0, c1 = _pixel_box(geometry, transform, window.height, window.width)
    needed = max(r1 - r0, c1 - c0) * (1 + 2 * CONTEXT)
    steps = math.ceil(2 * math.log2(max(needed, MIN_CROP) / MIN_CROP) - 1e-9)
    side = int(min(math.ceil(MIN_CROP * 2 ** (steps / 2)), height, width))
    grid = max(side // 4, 1)
    row = round((window.row_off + (r0 + r1) / 2 - side / 2) / grid) * grid
    col = round((window.col_off + (c0 + c1) / 2 - side / 2) / grid) * grid
    row, col = min(max(row, 0), height - side), min(max(col, 0), width - side)
    return PixelWindow(row, col, side, side)


def regions_to_check(regions, dense_crops: int) -> list[int]:
    """Which polygons get a region check: those of at least one patch, the largest first, at most
    REGION_SHARE region crops per crop of the dense pass, so the check stays a small share of the run."""
    budget = max(8, int(dense_crops * REGION_SHARE))
    large = [i for i, r in enumerate(regions) if r.pixel_count >= MIN_REGION_PIXELS]
    large.sort(key=lambda i: -regions[i].pixel_count)
    return sorted(large[:budget])


class RegionPixels:
    """The pixels of region crops of `source` as the region checks see them (then resized to `side`).

    A crop up to twice `side` is read at full resolution. A larger one is decimated to side x side
    nearest-neighbour: by GDAL as it reads the window, or, for the largest crops (at least `step` x
    `side`), from one in-memory lattice of every `step`-th row and column of the processing grid:
    the lattice pixel nearest to each of side x side evenly spaced centres. A run over a large raster
    would otherwise read a large share of it again for each of its largest polygons. `step` is fixed
    by the source's size (the lattice stays under OVERVIEW_PIXELS), so a crop's pixels do not depend
    on which other crops a run checks, and region embeddings in the feature cache stay valid.
    """

    def __init__(self, source: PixelSource, side: int):
        self.source, self.side = source, side
        self.step = max(1, math.ceil(math.sqrt(source.height * source.width / OVERVIEW_PIXELS)))
        # Lattice lines inside the raster: pixel index * step + step // 2.
        self._lines = tuple(-(-(n - self.step // 2) // self.step) for n in (source.height, source.width))
        self.decimates = isinstance(source, RasterSource)  # in-memory images are resized whole
        self._lattice: np.ndarray | None = None
        self._origin = (0, 0)  # lattice indices of self._lattice[:, 0, 0]

    def from_lattice(self, crop: PixelWindow) -> bool:
        return self.decimates and crop.height > 2 * self.side and crop.height >= self.side * self.step

    def _indices(self, crop: PixelWindow) -> tuple[np.ndarray, np.ndarray]:
        """Lattice rows and columns nearest to side x side evenly spaced centres of `crop`."""
        picked = []
        for start, length, lines in ((crop.row_off, crop.height, self._lines[0]),
                                     (crop.col_off, crop.width, self._lines[1])):
            centres = start + (np.arange(self.side) + 0.5) * (length / self.side) - 0.5
            picked.append(np.clip(np.rint((centres - self.step // 2) / self.step), 0, lines - 1).astype(np.intp))
        return picked[0], picked[1]

    def prepare(self, crops: Sequence[PixelWindow]) -> None:
        """Read the lattice under every crop that is sampled from it (nothing if none is)."""
        spans = [self._indices(crop) for crop in crops if self.from_lattice(crop)]
        self._lattice = None
        if not spans:
            return
        step, half = self.step, self.step // 2
        i0, i1 = min(int(r[0]) for r, _ in spans), max(int(r[-1]) for r, _ in spans) + 1
        j0, j1 = min(int(c[0]) for _, c in spans), max(int(c[-1]) for _, c in spans) + 1
        lattice = np.zeros((3, i1 - i0, j1 - j0), np.float32)
        col0, col1 = j0 * step + half, (j1 - 1) * step + half + 1
        # Strips of lattice rows, each one read of about STRIP_PIXELS pixels.
        per_strip = max(1, STRIP_PIXELS // ((col1 - col0) * step))
        assert isinstance(self.source, RasterSource), "only a raster on disk is sampled through a lattice"
        for a in range(i0, i1, per_strip):
            b = min(a + per_strip, i1)
            row0, row1 = a * step + half, (b - 1) * step + half + 1
            rgb, _valid = self.source.read(PixelWindow(row0, col0, row1 - row0, col1 - col0), every=step)
            lattice[:, a - i0:b - i0] = rgb
        self._lattice, self._origin = lattice, (i0, j0)

    def read(self, crop: PixelWindow) -> np.ndarray:
        """(3, h, w) RGB 0..255 of `crop`, 0 where invalid."""
        if self.from_lattice(crop):
            assert self._lattice is not None, "prepare() read the lattice under every crop sampled from it"
            rows, cols = self._indices(crop)
            return self._lattice[:, rows[:, None] - self._origin[0], cols[None, :] - self._origin[1]]
        if self.decimates and crop.height > 2 * self.side:
            assert isinstance(self.source, RasterSource)
            return self.source.read(crop, (self.side, self.side))[0]
        return self.source.read(crop)[0]


ImageEmbedder = Callable[[torch.Tensor], torch.Tensor]  # normalised (B, 3, S, S) -> (B, D) image embeddings


def global_embedder(loaded: LoadedModel) -> tuple[ImageEmbedder, str]:
    """CLIP's global image path (encode_image) at the precision of the dense pass (encoders.TorchEncoder), and
    that precision's name: fp16 autocast on CUDA; a model converted with `models.to_half` (--half) fp16 end to
    end, its inputs cast to its weights' type; fp32 on the CPU."""
    weights = loaded.model.visual.conv1.weight.dtype
    autocast = autocast_enabled(loaded.device, None) and weights == torch.float32

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            return loaded.model.encode_image(pixels.to(weights))

    return embed, "fp16" if autocast or weights == torch.float16 else "fp32"


@torch.inference_mode()
def crop_embeddings(loaded: LoadedModel, source: PixelSource, crops: Sequence[PixelWindow],
                    should_cancel: Callable[[], bool] | None = None, embed: ImageEmbedder | None = None,
                    cache: FeatureCache | None = None, scope: str | None = None,
                    counts: dict[str, int] | None = None) -> np.ndarray:
    """(len(crops), D) unit image embeddings (CLIP's global path) of windows of `source` resized to the
    model's input, in batches of REGION_BATCH. `embed` replaces the model's image tower (benchmarks);
    with a `cache` and `scope`, windows embedded before are not run again (`counts["cached"]` adds them)."""
    if embed is None:
        embed, precision = global_embedder(loaded)
        if scope and precision != "fp32":  # fp16 embeddings never stand in for fp32 ones in the cache
            scope = f"{scope}-{precision}"
    visual = loaded.model.visual
    size = visual.image_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    keys = [(crop.row_off, crop.col_off, crop.height, side) for crop in crops]
    width = (embedding_width(loaded),)
    reader = RegionPixels(source, side)
    # A resampled raster's lattice is read over the span of the crops a run checks, and its pixels depend on
    # where that read starts: such crops are not kept (a run checking others would read them otherwise).
    resampled = not getattr(source, "same_in_any_window", False)
    kept = [bool(cache is not None and scope) and not (resampled and reader.from_lattice(crop)) for crop in crops]
    found = [cache.get(scope, key, shape=width, unit=True) if keep and cache is not None and scope else None
             for key, keep in zip(keys, kept)]
    missing = [i for i, known in enumerate(found) if known is None]
    if counts is not None:
        counts["cached"] = counts.get("cached", 0) + len(crops) - len(missing)
    reader.prepare([crops[i] for i in missing])
    for start in range(0, len(missing), REGION_BATCH):
        if should_cancel is not None and should_cancel():
            raise CancelledError("The segmentation was cancelled; nothing was written.")
        picked = missing[start:start + REGION_BATCH]
        batch = []
        for i in picked:
            rgb = reader.read(crops[i])
            pixels = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))[None]
            batch.append(F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False))
        pixels = normalize_pixels(torch.cat(batch).to(loaded.device))
        image = F.normalize(embed(pixels).float(), dim=-1).cpu().numpy()
        for i, row in zip(picked, image):
            found[i] = row
            if kept[i] and cache is not None and scope:
                cache.put(scope, keys[i], row.copy())  # not a view keeping the batch's array alive
    rows = [row for row in found if row is not None]
    assert len(rows) == len(crops), "every window embedded or cached"
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, int(visual.output_dim)), np.float32)


def crop_class_probabilities(loaded: LoadedModel, source: PixelSource, crops: Sequence[PixelWindow],
                             text: torch.Tensor, owner: np.ndarray,
                             should_cancel: Callable[[], bool] | None = None, **embedding) -> np.ndarray:
    """(len(crops), classes): each window of `source` resized to the model's input, run through CLIP's
    global image path (crop_embeddings; `embedding` are its options) and scored against all class lines
    as `classify` does (softmax over queries at the model's logit scale, max over synonyms)."""
    text_np = F.normalize(text.float(), dim=-1).cpu().numpy()
    n_classes = int(owner.max()) + 1
    if not crops:
        return np.zeros((0, n_classes))
    image = crop_embeddings(loaded, source, crops, should_cancel, **embedding)
    return np.asarray(class_probabilities(image, text_np, owner, n_classes, logit_scale(loaded)), dtype=float)


def region_agreement(regions, source: PixelSource, window: PixelWindow, transform: Affine, loaded: LoadedModel,
                     text: torch.Tensor, owner: np.ndarray, should_cancel: Callable[[], bool] | None = None,
                     only: Sequence[int] | None = None, **embedding) -> np.ndarray:
    """For each region (or those in `only`), the probability (CLIP's global image path vs all class
    lines) of its own class; NaN for the others. `embedding`: options of crop_embeddings."""
    picked = list(range(len(regions))) if only is None else list(only)
    crops = [region_crop_window(regions[i].geometry, transform, window, (source.height, source.width))
             for i in picked]
    probs = crop_class_probabilities(loaded, source, crops, text, owner, should_cancel, **embedding)
    agree = np.full(len(regions), np.nan)
    for row, i in enumerate(picked):
        agree[i] = probs[row, regions[i].class_id]
    return agree


def run_quality_estimate(regions, quality: np.ndarray, n_classes: int) -> float | None:
    """Estimated mIoU of a run: mean over classes with polygons of their area-weighted mean quality."""
    per_class = []
    for class_id in range(n_classes):
        picked = [(r.area_m2, q) for r, q in zip(regions, quality) if r.class_id == class_id and np.isfinite(q)]
        if picked:
            areas = np.array([a if np.isfinite(a) and a > 0 else 1.0 for a, _ in picked])
            per_class.append(float(np.average([q for _, q in picked], weights=areas)))
    return round(float(np.mean(per_class)), 4) if per_class else None


def fit_quality_model(signals: np.ndarray, target: np.ndarray, weights_sha256: str | None,
                      class_lines: list[str], l2: float = 0.05) -> QualityModel:
    """Logistic regression of per-tile true IoU (a fraction in [0, 1]) on the tiles' signals."""
    from scipy.optimize import minimize

    if len(target) < MIN_CALIBRATION_TILES:
        raise InputError(f"Calibrating the quality estimate needs at least {MIN_CALIBRATION_TILES} labelled tiles; "
                         f"the labels cover {len(target)}. Label a larger area or use a smaller --quality-tile.")
    default = QualityModel()
    fill = [float(np.nanmean(col)) if np.isfinite(col).any() else f
            for col, f in zip(signals.T, default.fill)]
    x = np.where(np.isnan(signals), np.asarray(fill), signals)
    y = np.clip(target, 0.0, 1.0)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = params[0] + x @ params[1:]
        p = 1.0 / (1.0 + np.exp(-z))
        eps = 1e-9
        value = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)) + l2 * np.sum(params[1:] ** 2)
        grad_z = (p - y) / len(y)
        grad = np.concatenate([[grad_z.sum()], x.T @ grad_z + 2 * l2 * params[1:]])
        return float(value), grad

    start = np.concatenate([[default.intercept], default.coef])
    result = minimize(loss, start, jac=True, method="L-BFGS-B")
    params = result.x
    return QualityModel(coef=[float(v) for v in params[1:]], intercept=float(params[0]), fill=fill,
                        source="calibrated", weights_sha256=weights_sha256, class_lines=list(class_lines))


def rank_agreement(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """SROCC and PLCC between predicted and true quality (RS-SQA's figures)."""
    from scipy.stats import pearsonr, spearmanr

    ok = np.isfinite(predicted) & np.isfinite(truth)
    if ok.sum() < 3 or np.ptp(predicted[ok]) == 0 or np.ptp(truth[ok]) == 0:
        return {"srocc": float("nan"), "plcc": float("nan"), "tiles": int(ok.sum())}
    return {"srocc": round(float(spearmanr(predicted[ok], truth[ok]).statistic), 4),
            "plcc": round(float(pearsonr(predicted[ok], truth[ok]).statistic), 4), "tiles": int(ok.sum())}
