"""`search`: rank the windows of a raster's search index by a sentence, or by an example place.

Scoring (MPS-CLIP's keyword guidance, training-free): a window's score for a sentence is
    0.5 * cos(image embedding, sentence) + 0.5 * mean over keywords of
          max over the window's perspectives of cos(perspective, keyword)
where the perspectives are the image embedding and its five sub-perspectives (search_index). With
no keywords the score is the global cosine alone. The sentence is encoded as written (as retrieval
benchmarks do); keywords, which are short noun phrases, with a few remote-sensing prompts.

Keyword rule: search_queries.split_keywords.

Extent (--bbox): the box (its envelope in the raster's CRS; a box across the antimeridian of a world raster
is two boxes, at its west and east edges, each taken alone) is cut to the raster's footprint; a window is
searched when the part of its footprint inside that region spans, along each axis of the CRS, at least
half of the shorter of the window's and the region's extents; so a box smaller than one window is
searched by the windows that hold most of it. On a north-up raster this is: at least half inside the box
along each axis, or, along an axis where the box is narrower than the window, covering half of the box.

Hits: the best windows over all levels, with overlapping ones suppressed across scales (a window
is dropped when its intersection with a better hit covers more than `max_overlap` of the smaller
of the two, measured in the raster's pixels, where windows are boxes whatever the grid's rotation),
ranked 1..top per query. A hit is its window's footprint on the ground (the affine applied to its four
pixel corners, as classify writes its tiles): a rectangle on a north-up raster, the turned quadrilateral
on a rotated one, never its envelope, which would reach off the window and off the raster.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from pyproj import Transformer

from backend import __version__
from .atomic import StagedOutputs, is_shapefile, shapefile_parts
from .diskspace import writing_to
from .errors import InputError
from .export import check_field_widths, check_format_crs, driver_for, report_json, report_path_for, write_layer
from .files import absolute_outputs, check_output_files, input_paths, raster_file, refuse_folder_name
from .models import LoadedModel
from .ground import crs_label
from .raster import longitude_on, parse_crs, pixel_envelope, unplaced, x_turn
from .search_index import (BuildStats, SearchIndex, bbox_region, check_bbox, check_point, describe,
                           footprint_envelopes, footprint_polygons, is_rotated, point_window)
from .text import TextEmbedder, token_ids
from .search_queries import DEFAULT_MAX_OVERLAP, SearchOptions, validate_search_options

KEYWORD_TEMPLATES = ("{}", "a satellite image of {}.", "an aerial photo of {}.", "a remote sensing image of {}.")
SENTENCE_TEMPLATES = ("{}",)
GLOBAL_WEIGHT = 0.5
HIT_FIELDS = ("rank", "score", "scale_m", "query", "model", "run_id")


def fit_to_context(text: str, loaded: LoadedModel, what: str = "sentence") -> tuple[str, str | None]:
    """The text as the model will read it, and a notice when it had to be shortened."""
    limit = loaded.context_length - 2  # start and end tokens
    counted = token_ids(loaded, text)
    if counted is None or len(counted[0]) <= limit:
        return text, None
    tokens, decode = counted
    kept = decode(tokens[:limit]).strip()
    notice = (f"The {what} {text[:40]!r}... is {len(tokens)} tokens long, but model {loaded.name} reads at most "
              f"{limit}; only its beginning was used: {kept!r}.")
    return kept, notice


@dataclass
class Hits:
    """Ranked hits of one search, all queries together."""

    footprints: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 2)))  # (N, 4, 2) window corners
    score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale_m: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rank: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    query: list[str] = field(default_factory=list)

    @property
    def bounds(self) -> np.ndarray:
        """(N, 4) xmin, ymin, xmax, ymax: the envelopes of the hits (to zoom to one; the hit is its footprint)."""
        return footprint_envelopes(self.footprints)

    def extend(self, footprints, score, scale_m, query: str) -> None:
        self.footprints = np.concatenate([self.footprints, np.asarray(footprints, np.float64).reshape(-1, 4, 2)])
        self.score = np.concatenate([self.score, score])
        self.scale_m = np.concatenate([self.scale_m, scale_m])
        self.rank = np.concatenate([self.rank, np.arange(1, len(score) + 1)])
        self.query += [query] * len(score)

    def records(self) -> list[dict]:
        """One dict per hit: rank, score, scale_m, query, `footprint` (the window's closed ring of corners on the
        ground, as written to the layer) and `bbox` (that footprint's envelope, to zoom to)."""
        return [{"rank": int(r), "score": round(float(s), 6), "scale_m": round(float(m), 3), "query": q,
                 "bbox": [round(float(v), 6) for v in b],
                 "footprint": [[round(float(x), 6), round(float(y), 6)] for x, y in [*f, f[0]]]}
                for r, s, m, q, b, f in zip(self.rank, self.score, self.scale_m, self.query, self.bounds,
                                            self.footprints)]


def suppress_overlaps(bounds: np.ndarray, scores: np.ndarray, top: int,
                      max_overlap: float = DEFAULT_MAX_OVERLAP) -> np.ndarray:
    """Indices of the best windows, best first, none covering more than max_overlap of a better one
    (intersection over the smaller of the two areas, so a big window and a small one inside it clash).
    `bounds` are axis-aligned boxes (N, 4): the windows in the raster's pixels, where they are boxes on any
    grid (ratios of areas are the same on the ground)."""
    order = np.argsort(-scores, kind="stable")
    areas = (bounds[:, 2] - bounds[:, 0]) * (bounds[:, 3] - bounds[:, 1])
    kept: list[int] = []
    for i in order:
        if kept:
            k = np.asarray(kept)
            width = np.minimum(bounds[k, 2], bounds[i, 2]) - np.maximum(bounds[k, 0], bounds[i, 0])
            height = np.minimum(bounds[k, 3], bounds[i, 3]) - np.maximum(bounds[k, 1], bounds[i, 1])
            inter = np.clip(width, 0, None) * np.clip(height, 0, None)
            if (inter / np.minimum(areas[k], areas[i]) > max_overlap).any():
                continue
        kept.append(int(i))
        if len(kept) >= top:
            break
    return np.asarray(kept, dtype=np.intp)


def sentence_scores(embeddings: np.ndarray, sentence: np.ndarray, keywords: np.ndarray | None) -> np.ndarray:
    """Scores of windows (N, P, D) for a sentence (D,) and its keywords (K, D) by the documented rule."""
    global_score = embeddings[:, 0] @ sentence
    if keywords is None or len(keywords) == 0:
        return global_score
    count, perspectives, dim = embeddings.shape
    if count == 0:  # no window (an area of nodata only): reshape cannot infer the keywords' axis of nothing
        return global_score
    # One BLAS matrix product over all perspectives, then the best perspective per keyword.
    per_keyword = (embeddings.reshape(-1, dim) @ keywords.T).reshape(count, perspectives, -1).max(axis=1)
    return GLOBAL_WEIGHT * global_score + (1 - GLOBAL_WEIGHT) * per_keyword.mean(axis=1)


@dataclass
class SearchResult:
    run_id: str
    hits: Hits
    outputs: dict[str, str]
    notices: list[str]
    report: dict


def _in_bbox(entries, region, rotated: bool = True) -> np.ndarray:
    """Windows searched for a bbox (`region`: the box cut to the raster's footprint, bbox_region), by the rule
    of the module docstring: the part of a window's footprint inside the region spans, along each axis, at
    least half of the shorter of the window's and the region's extents. On a grid that is not `rotated`
    windows and region are boxes, and that part is the overlap of the two along each axis."""
    if region is None or not len(entries.level):
        return np.ones(len(entries.level), bool)
    # A box across the antimeridian of a world raster is two regions (bbox_region): a window is searched by
    # the rule for one of them, never for their envelope, the whole width between them.
    inside = np.zeros(len(entries.level), bool)
    for part in shapely.get_parts(region):
        inside |= _in_region(entries, part, rotated)
    return inside


def _in_region(entries, region, rotated: bool) -> np.ndarray:
    """_in_bbox for one polygon of the region."""
    inside = np.ones(len(entries.level), bool)
    window_box, region_box = entries.bounds, shapely.bounds(region)
    if rotated:
        candidates = np.flatnonzero((window_box[:, 0] < region_box[2]) & (window_box[:, 2] > region_box[0])
                                    & (window_box[:, 1] < region_box[3]) & (window_box[:, 3] > region_box[1]))
        overlap = np.full((len(inside), 4), np.nan)  # NaN where they do not meet
        overlap[candidates] = shapely.bounds(shapely.intersection(footprint_polygons(entries.footprints[candidates]),
                                                                  region))
    else:
        overlap = np.concatenate([np.maximum(window_box[:, :2], region_box[:2]),
                                  np.minimum(window_box[:, 2:], region_box[2:])], axis=1)
    for low, high in ((0, 2), (1, 3)):
        spans = np.nan_to_num(overlap[:, high] - overlap[:, low], nan=0.0)
        shorter = np.minimum(window_box[:, high] - window_box[:, low], region_box[high] - region_box[low])
        inside &= (spans > 0) & (spans >= 0.5 * shorter)
    return inside


def _bbox_in_raster_crs(index: SearchIndex, bbox, bbox_crs):
    """The part of the raster's footprint under the bbox (a shapely geometry in the raster's CRS), or None."""
    return bbox_region(index.dataset.transform, index.dataset.width, index.dataset.height, index.crs,
                       index.label, bbox, bbox_crs)


def point_in_raster_crs(like, like_crs: str | None, raster_crs, envelope=None) -> tuple[float, float]:
    """The example point `like` (in `like_crs`, default the raster's) in the raster's CRS. In a geographic one,
    with the raster's `envelope` (left, bottom, right, top), a longitude a whole turn away is moved onto the
    raster's longitudes, as a bbox's are: -159.85 is 200.15 on a raster over 200..200.4 (raster.longitude_on);
    so is the x of a cylindrical projection over the world (raster.x_turn): -179.997 degrees is x 20037842.7 on
    an EPSG:3857 raster past 20037508.34."""
    x, y = (float(v) for v in like)
    crs = parse_crs(like_crs, raster_crs, what="like CRS")
    if crs != raster_crs:
        try:
            x, y = Transformer.from_crs(crs, raster_crs, always_xy=True).transform(x, y)
        except Exception as exc:  # pyproj raises several types for CRSs it cannot join
            raise InputError(f"The point {x:.10g}, {y:.10g} cannot be placed on the raster: PROJ knows no way from "
                             f"the like CRS {crs_label(crs)} to the raster's CRS {crs_label(raster_crs)}"
                             f"{unplaced(raster_crs, '--like-crs')}") from exc
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InputError(f"The point {like} could not be transformed from {crs_label(crs)} to the raster's CRS "
                             f"{crs_label(raster_crs)}.")
    turn = x_turn(raster_crs) if envelope is not None else None
    if turn:  # in degrees, or in a cylindrical projection's x past its antimeridian (Web Mercator's 20037508.34)
        x = longitude_on(x, envelope[0], envelope[2], turn)
    return x, y


def like_point(index: SearchIndex, like: tuple[float, float], like_crs: str | None) -> tuple[float, float]:
    """The example point in the raster's CRS, checked to lie on the raster."""
    dataset = index.dataset
    x, y = point_in_raster_crs(like, like_crs, index.crs, pixel_envelope(dataset.transform, 0, 0, dataset.width,
                                                                         dataset.height))
    check_point(index, x, y)
    return x, y


def like_label(index: SearchIndex, like: tuple[float, float], like_crs: str | None) -> str:
    """The query field of hits by example: the point as given, to about 10 cm (6 decimals of a degree
    in a geographic CRS, 2 decimals of a metre or foot in a projected one)."""
    crs = parse_crs(like_crs, index.crs, what="like CRS")
    decimals = 6 if crs.is_geographic else 2
    text = f"like {like[0]:.{decimals}f} {like[1]:.{decimals}f}"
    return f"{text} ({like_crs})" if like_crs else text


def example_queries(index: SearchIndex, point: tuple[float, float], like: tuple[float, float], should_cancel=None
                    ) -> tuple[dict[int, np.ndarray], list[str], int]:
    """Per level, the image embedding of the window under the example point ({factor: (D,)}), the notices
    for levels where that window holds no valid pixel, and how many windows were embedded for it. An
    example whose window is nodata at every scale is refused: there would be nothing to compare with."""
    queries: dict[int, np.ndarray] = {}
    empty: list[str] = []
    computed = 0
    for level in index.levels:
        found = point_window(index, level, *point)
        if found is None:
            continue
        vector, count = index.window_embedding(level, *found, should_cancel=should_cancel)
        computed += count
        if vector is None:
            empty.append(f"{level.scale_m(index.dataset):g} m")
        else:
            queries[level.factor] = vector
    if not queries:
        raise InputError(f"The example point {like[0]:.10g}, {like[1]:.10g} lies on nodata pixels of "
                         f"{index.label}: the window under it holds no valid pixel at any scale. Choose a "
                         "point on the image.")
    notices = []
    if empty:
        notices.append(f"The window under the example point holds no valid pixel at {' and '.join(empty)}; the "
                       "search by example compares windows of the other scales only.")
    return queries, notices, computed


def _said_among_notices(sentence: str) -> None:
    """A SearchIndex's `notice` that leaves its sentence to the notices search_index returns (index.notices)."""


def search_index(index: SearchIndex, options: SearchOptions, progress=None, should_cancel=None
                 ) -> tuple[Hits, list[str], dict]:
    """Complete the index over the searched extent, then rank its windows; (hits, notices, facts)."""
    queries = validate_search_options(options)
    check_bbox(index, options.bbox, options.bbox_crs)
    notices = ([index.rebuilt_reason] if index.rebuilt_reason else []) + index.band_notices
    if index.notice is None:  # a retry after the GPU ran out of memory is said among the notices, not on stderr too
        index.notice = _said_among_notices
    retries = len(index.notices)
    point = like_point(index, options.like, options.like_crs) if options.like is not None else None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    examples: dict[int, np.ndarray] = {}
    example_stats = BuildStats()
    if point is not None and options.like is not None:  # the example window may lie outside the searched extent
        examples, example_notices, example_stats.computed = example_queries(index, point, options.like,
                                                                           should_cancel)
        notices += example_notices
    stats = index.ensure(options.bbox, options.bbox_crs, progress, should_cancel)
    stats.computed += example_stats.computed
    notices += index.notices[retries:]
    timings["index_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    entries = index.entries(options.bbox, options.bbox_crs)
    timings["load_s"] = time.perf_counter() - t0
    inside = _in_bbox(entries, _bbox_in_raster_crs(index, options.bbox, options.bbox_crs),
                      is_rotated(index.dataset.transform))
    if options.bbox is not None and not inside.any():
        notices.append("No window with valid pixels lies in the --bbox area (it holds only nodata), so there are "
                       "no hits; choose another area.")
    t0 = time.perf_counter()
    hits = Hits()
    sentence_embedder = TextEmbedder(index.loaded, templates=SENTENCE_TEMPLATES)
    keyword_embedder = TextEmbedder(index.loaded, templates=KEYWORD_TEMPLATES)
    for query in queries:
        text, notice = fit_to_context(query.text, index.loaded)
        if notice:
            notices.append(notice)
        sentence = sentence_embedder.embed_one(text).numpy()
        keywords = (keyword_embedder.embed([fit_to_context(k, index.loaded, "keyword")[0] for k in query.keywords])
                    .numpy() if query.keywords else None)
        scores = np.where(inside, sentence_scores(entries.embeddings, sentence, keywords), -np.inf)
        if (few := _add_hits(hits, entries, scores, options, query.text)) is not None:
            notices.append(few)
    if point is not None and options.like is not None:
        label = like_label(index, options.like, options.like_crs)
        notice = _add_like_hits(hits, entries, inside, point, examples, options, label, index.dataset.transform)
        if notice:
            notices.append(notice)
    timings["rank_s"] = time.perf_counter() - t0
    facts = {"index": describe(index, stats), "queries": [{"query": q.text, "keywords": q.keywords} for q in queries],
             "timings": {k: round(v, 4) for k, v in timings.items()}, "windows_searched": int(inside.sum())}
    return hits, notices, facts


def _add_hits(hits: Hits, entries, scores: np.ndarray, options: SearchOptions, label: str,
              besides: str = "") -> str | None:
    """The best windows of `scores` for one query as hits; a notice when fewer than --top are left (none
    when no window was searched: that has its own)."""
    finite = np.isfinite(scores)
    candidates = np.flatnonzero(finite)
    kept = candidates[suppress_overlaps(entries.pixels[candidates], scores[candidates], options.top,
                                        options.max_overlap)]
    hits.extend(entries.footprints[kept], scores[kept], entries.scale_m[kept], label)
    if not len(candidates) or len(kept) >= options.top:
        return None
    found = f"{label!r} has {len(kept)} hit{'' if len(kept) == 1 else 's'}, not --top {options.top}"
    if len(kept) == len(candidates):
        return (f"{found}: the area searched holds only {len(candidates)} window{'' if len(candidates) == 1 else 's'}"
                f"{besides}.")
    return (f"{found}: the area's other windows each overlap a better one by more than --max-overlap "
            f"{options.max_overlap:g} (raise it, or search a larger area, for more).")


def _add_like_hits(hits: Hits, entries, inside: np.ndarray, point, examples: dict[int, np.ndarray],
                   options: SearchOptions, label: str, transform) -> str | None:
    """Query by example: per level, the window under the point is the query for that level's windows.
    A notice when no window is left to rank (every window searched holds the point)."""
    col, row = ~transform @ point  # the point in the raster's pixels, where the windows are boxes
    scores = np.full(len(entries.level), -np.inf)
    for factor, query in examples.items():
        same = entries.level == factor
        scores[same] = entries.embeddings[same, 0] @ query
    # The example place itself is not a hit: drop every window whose footprint contains the point.
    contains = ((entries.pixels[:, 0] <= col) & (entries.pixels[:, 2] >= col)
                & (entries.pixels[:, 1] <= row) & (entries.pixels[:, 3] >= row))
    scores[contains | ~inside] = -np.inf
    few = _add_hits(hits, entries, scores, options, label, besides=" besides those holding the example point")
    if inside.any() and not (inside & ~contains).any():
        return ("Every window searched holds the example point, so no other place is left to compare with it "
                f"and {label!r} has no hits; search a larger area (or raster) than one window around the point.")
    return few


def write_footprints(path: str | Path, footprints: np.ndarray, fields: dict[str, np.ndarray], crs,
                     layer: str | None = None, keep_from: Path | None = None) -> Path:
    """Window footprints (N, 4, 2 corners on the ground) as counter-clockwise polygons with attribute columns,
    written atomically in the format of the path's extension (`layer`, `keep_from`: see write_layer)."""
    return write_layer(Path(path), footprint_polygons(footprints), fields, "Polygon", crs, layer=layer,
                       keep_from=keep_from)


def write_hits(path: str | Path, hits: Hits, crs, model: str, run_id: str, layer: str | None = None,
               keep_from: Path | None = None) -> Path:
    """The hits as a polygon layer (each its window's footprint) with rank, score, scale_m, query, model, run_id
    (`layer`, `keep_from`: see write_layer)."""
    count = len(hits.query)
    fields: dict[str, np.ndarray] = dict(zip(HIT_FIELDS, (hits.rank.astype(np.int32), hits.score.astype(np.float64),
                                   hits.scale_m.astype(np.float64), np.array(hits.query, dtype=object),
                                   np.array([model] * count, dtype=object), np.array([run_id] * count, dtype=object))))
    return write_footprints(path, hits.footprints, fields, crs, layer, keep_from)


def hits_output_files(out: Path) -> dict[str, Path]:
    """The files a search (or classify) run writes, by what they are called in a sentence."""
    out = Path(out)
    named = {"output": out, "run report": report_path_for(out)}
    if is_shapefile(out):
        named.update({f"shapefile part {part.suffix}": part for part in shapefile_parts(out)})
    return named


def check_hits_output(out: str | Path, overwrite: bool, inputs: dict[str, Path] | None = None,
                      sentences: list[str] | None = None, option: str = "--overwrite",
                      what: str = "--out file") -> None:
    """Before any work: the output layer and its report can be written (names, folder, not a folder or
    device, not one of `inputs`, the layer not there yet unless `overwrite`), and a shapefile can hold
    every sentence. `option` is how the user allows overwriting; `what` names the output in a sentence.
    Give `out` as the user wrote it: a name ending in a separator names a folder, which a Path forgets."""
    refuse_folder_name(out, what)
    driver_for(Path(out))
    # The layer and its report: an existing report belongs to another run (e.g. -o h.gpkg before -o h.shp).
    check_output_files(hits_output_files(Path(out)), inputs, overwrite, option,
                       replaced=[Path(out), report_path_for(Path(out))])
    check_field_widths(out, sentences or [], what="sentence", field="query")


def search_raster(index: SearchIndex, options: SearchOptions, out: Path, overwrite: bool = False,
                  progress=None, should_cancel=None) -> SearchResult:
    """Search and write the hits layer and its report; nothing is written when it fails or is cancelled."""
    started = time.perf_counter()
    queries = validate_search_options(options)
    check_hits_output(out, overwrite, input_paths([("raster", raster_file(index.raster))]), [q.text for q in queries])
    format_notices = check_format_crs(out, index.crs)
    hits, notices, facts = search_index(index, options, progress, should_cancel)
    notices += format_notices
    run_id = uuid.uuid4().hex[:12]
    out = Path(out)
    report_path = report_path_for(out)
    outputs = absolute_outputs({"vector": out, "report": report_path})
    report = {"farslip_version": __version__, "run_id": run_id, "raster": index.absolute_name,
              "model": index.loaded.name, "weights_sha256": index.loaded.weights_id, "crs": index.crs.to_string(),
              "bbox": list(options.bbox) if options.bbox else None, "bbox_crs": options.bbox_crs,
              "like": list(options.like) if options.like else None, "like_crs": options.like_crs,
              "top": options.top, "max_overlap": options.max_overlap, "notices": notices,
              "hits": hits.records(), "outputs": outputs, **facts,
              "total_s": 0.0}
    # The hits, then their report (the marker of a finished run), renamed in together: all or nothing.
    with StagedOutputs({"vector": out, "report": report_path}) as staged, writing_to([out, report_path], 1.0):
        write_hits(staged["vector"], hits, index.crs, index.loaded.name, run_id, layer=out.stem, keep_from=out)
        report["total_s"] = round(time.perf_counter() - started, 3)
        staged["report"].write_text(report_json(report), "utf-8")
        staged.commit()
    return SearchResult(run_id, hits, outputs, notices, report)
