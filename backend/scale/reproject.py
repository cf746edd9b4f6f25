"""The rasters' polygons in the output CRS of a scaled run (--out-crs), and whether that CRS can take them.

A raster's polygons are reprojected with their edges first split at its pixel size, so a straight pixel edge
bends as the projection bends it (one vectorised pyproj transform: the fast path). Into a lon/lat CRS some
polygons need more, and are found cheaply after that transform (a longitude span over 90 degrees, a vertex on a
pole, an edge sweeping over a degree of longitude, as near a pole); only they take the slow path, ring by ring:

- a polygon over the antimeridian is kept continuous in longitude (179.8 .. 180.2, never cut), as the polygons
  of a lon/lat raster there are in its own coordinates; every polygon of a raster lies in the 360 degrees around
  the raster's centre (a raster over the antimeridian gives longitudes past 180 on its east side);
- a polygon around a pole is closed through the pole (to latitude +-90) and spans -180 .. 180 (a raster around
  a pole is centred on 0), a vertex on a pole becomes an edge along it, and a polygon around a pole with a
  hole around that pole (a ring) becomes a band.

check_reach refuses, before anything is computed, a raster whose CRS cannot be transformed to the output CRS and
an output CRS that cannot hold a raster's area (a pole in Mercator, the far side of the globe in a UTM zone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyproj
import shapely
from pyproj.enums import TransformDirection
from pyproj.exceptions import CRSError, ProjError
from rasterio.crs import CRS
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box

from backend.engine.errors import InputError
from backend.engine.ground import crs_label
from backend.engine.raster import longitude_turn

# A vertex this close to a pole (a fraction of 90 degrees: 1e-9 is ~1 cm) is on it; its longitude means nothing.
POLE_TOLERANCE = 1e-9
# A polygon spanning more longitude than this (a quarter turn) takes the slow path: it may cross the antimeridian.
WIDE = 0.25
# How far beyond the output CRS's area of use (in its own units, times the area's larger side) a raster may reach.
REACH = 2.0
SAMPLES = 33  # points along each side of a raster's grid checked by check_reach


def transformer(source: CRS, target: CRS) -> pyproj.Transformer:
    """x, y from `source` to `target`; ProjError when PROJ knows no way between them."""
    return pyproj.Transformer.from_crs(pyproj.CRS.from_wkt(source.to_wkt()), pyproj.CRS.from_wkt(target.to_wkt()),
                                       always_xy=True)


class _Turn:
    """The angular unit of a lon/lat CRS: a full turn and a quarter (360 and 90 in degrees)."""

    def __init__(self, target: CRS):
        self.full = longitude_turn(target)
        self.half, self.quarter = self.full / 2, self.full / 4


def reprojected(geometries: np.ndarray, source: CRS, target: CRS, pixel_size: float, raster: str = "") -> np.ndarray:
    """Polygons from `source` to `target`, edges split at `pixel_size` first (always x, y order); into a lon/lat
    CRS, continuous over the antimeridian and closed through the poles (see the module). An InputError naming
    `raster` when they cannot be transformed (check_reach refuses that before a run; this is the last resort)."""
    if source == target or not len(geometries):
        return geometries
    where = f"The polygons of {raster}" if raster else "The polygons"
    try:
        forward = transformer(source, target)
    except (ProjError, CRSError):
        raise InputError(f"{where} cannot be transformed from {crs_label(source)} to the output CRS "
                         f"{crs_label(target)}: PROJ knows no way between them; give --out-crs a CRS they can be "
                         "transformed to.") from None

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = forward.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    dense = shapely.segmentize(geometries, pixel_size)
    try:
        moved = shapely.transform(dense, apply)
    except ProjError:
        moved = None
    if moved is None or not np.isfinite(shapely.get_coordinates(moved)).all():
        raise InputError(f"{where} cannot be represented in the output CRS {crs_label(target)} (a point of them "
                         f"has no coordinates there); choose another --out-crs.")
    if not target.is_geographic:
        return moved
    return _continuous(dense, moved, forward, _Turn(target), source, pixel_size)


def _continuous(dense: np.ndarray, moved: np.ndarray, forward: pyproj.Transformer, turn: _Turn, source: CRS,
                pixel_size: float) -> np.ndarray:
    """The lon/lat polygons `moved` (of `dense`, in `source`) placed around their raster's centre longitude, those
    over the antimeridian or a pole rebuilt from `dense` (_rebuilt)."""
    poles = _poles_in(forward, turn)
    left, bottom, right, top = shapely.total_bounds(dense)
    around_pole = any(left <= x <= right and bottom <= y <= top for x, y in poles)
    if around_pole:
        centre = 0.0
    else:
        lon, _ = forward.transform((left + right) / 2, (bottom + top) / 2)
        centre = float(lon) if math.isfinite(lon) else 0.0
        if source.is_geographic:  # a lon/lat raster past 180 keeps its own longitudes
            centre += turn.full * round(((left + right) / 2 - centre) / turn.full)
    bounds = shapely.bounds(moved)
    on_pole = np.maximum(np.abs(bounds[:, 1]), np.abs(bounds[:, 3])) >= turn.quarter * (1 - POLE_TOLERANCE)
    # Near a pole a pixel edge may sweep many degrees: such polygons are densified (_densified), and so are their
    # neighbours, which share that edge, so the polygons keep sharing their edges.
    coordinates, owner = shapely.get_coordinates(moved, return_index=True)
    sweep = np.abs((np.diff(coordinates[:, 0]) + turn.half) % turn.full - turn.half)
    sweeping = np.zeros(len(moved), dtype=bool)
    sweeping[owner[1:][(owner[1:] == owner[:-1]) & (sweep > STEP * turn.full)]] = True
    slow = (bounds[:, 2] - bounds[:, 0] > WIDE * turn.full) | on_pole | sweeping
    # The fast path: whole turns off, so that the middle of each polygon lies within half a turn of the centre.
    middle = (bounds[:, 0] + bounds[:, 2]) / 2
    turns = np.floor((middle - (centre - turn.half)) / turn.full)
    turns[slow] = 0
    result = moved.copy()
    if turns.any():
        coordinates = shapely.get_coordinates(result)
        coordinates[:, 0] -= np.repeat(turns * turn.full, shapely.get_num_coordinates(result))
        result = shapely.set_coordinates(result, coordinates)
    for index in np.flatnonzero(slow):
        result[index] = _rebuilt(dense[index], moved[index], forward, turn, centre, poles, pixel_size)
    return result


def _poles_in(forward: pyproj.Transformer, turn: _Turn) -> list[tuple[float, float]]:
    """Where the north and south poles are in the source CRS (those it can place)."""
    found = []
    for latitude in (turn.quarter, -turn.quarter):
        try:
            x, y = forward.transform(0.0, latitude, direction=TransformDirection.INVERSE)
        except ProjError:
            continue
        if math.isfinite(x) and math.isfinite(y):
            found.append((float(x), float(y)))
    return found


def _rebuilt(geometry, moved, forward: pyproj.Transformer, turn: _Turn, centre: float,
             poles: list[tuple[float, float]], pixel_size: float):
    """One polygon (or multipolygon) of the slow path, ring by ring (_ring), as a valid polygonal geometry
    (`moved`, its fast-path shape, when it lies on a pole only)."""
    parts = []
    for polygon in shapely.get_parts(geometry):
        flip = _orientation(polygon, forward, turn, pixel_size) < 0
        rings = [_ring(np.asarray(ring.coords), ring.is_ccw != flip, forward, turn, poles, pixel_size)
                 for ring in (polygon.exterior, *polygon.interiors)]
        if rings[0] is not None:
            parts.append(_assembled(rings[0], [ring for ring in rings[1:] if ring is not None], turn, centre))
    if not parts:
        return moved
    shape = _polygonal(shapely.union_all(parts) if len(parts) > 1 else parts[0])
    return shape if shape.is_valid else _polygonal(shapely.make_valid(shape))  # never an invalid polygon


def _orientation(polygon: Polygon, forward: pyproj.Transformer, turn: _Turn, pixel_size: float) -> float:
    """+1 where the transform keeps a ring's turning sense (counter-clockwise stays so), -1 where it mirrors it:
    the sign of its Jacobian at a vertex of `polygon` off the poles."""
    step = pixel_size * 1e-3
    for x, y in polygon.exterior.coords:
        lons, lats = forward.transform([x, x + step, x], [y, y, y + step])
        if max(abs(v) for v in lats) >= turn.quarter * (1 - 1e-6) or not np.isfinite([*lons, *lats]).all():
            continue
        dlon = [(lons[i] - lons[0] + turn.half) % turn.full - turn.half for i in (1, 2)]
        determinant = dlon[0] * (lats[2] - lats[0]) - dlon[1] * (lats[1] - lats[0])
        if determinant:
            return math.copysign(1.0, determinant)
    return 1.0


@dataclass
class _Ring:
    """A closed ring in lon/lat with its longitudes unwrapped: each the one PROJ gave (`lon`) plus whole turns
    (`turns`), so that a vertex two rings share stays the same number in both. `pole`: the latitude of the pole
    it winds around and holds (None when it winds around none; then its last point lies a turn east or west of its
    first)."""

    lon: np.ndarray
    turns: np.ndarray
    lat: np.ndarray
    pole: float | None

    def points(self, turn: _Turn, shift: int = 0) -> np.ndarray:
        return np.column_stack([self.lon + (self.turns + shift) * turn.full, self.lat])


def _ring(xy: np.ndarray, ccw: bool, forward: pyproj.Transformer, turn: _Turn, poles: list[tuple[float, float]],
          pixel_size: float) -> _Ring | None:
    """A closed ring (source coordinates) in lon/lat, unwrapped: no step of half a turn or more between two
    vertices. A vertex on a pole becomes an edge along it, westward or eastward as the ring's sense (`ccw` in
    lon/lat) says, so the ring keeps its inside; a pole on an edge between two vertices is made a vertex first.
    None for a ring on a pole only."""
    lon, lat, on_pole = _densified(_with_poles(xy[:-1], poles, pixel_size * 1e-6), forward, turn)
    if on_pole.all():
        return None
    start = int(np.argmin(on_pole))  # a vertex off the poles
    lon, lat, on_pole = np.roll(lon, -start), np.roll(lat, -start), np.roll(on_pole, -start)
    count = len(lon)
    if not on_pole.any():
        steps = (np.diff(np.append(lon, lon[0])) + turn.half) % turn.full - turn.half
        raw = np.append(lon, lon[0])
        unwrapped = lon[0] + np.concatenate([[0.0], np.cumsum(steps)])
        lats = np.append(lat, lat[0])
    else:
        raw_list, unwrapped_list, lat_list = [lon[0]], [lon[0]], [lat[0]]
        current, previous = lon[0], lon[0]
        i = 1
        while i <= count:
            k = i % count
            if on_pole[k]:
                j = i
                while on_pole[j % count]:
                    j += 1
                pole = math.copysign(turn.quarter, lat[k])
                # Counter-clockwise, the inside is on the left: along the north pole that is going west.
                if ccw == (pole > 0):
                    following = current - ((current - lon[j % count]) % turn.full)
                else:
                    following = current + ((lon[j % count] - current) % turn.full)
                raw_list += [previous, lon[j % count]]
                unwrapped_list += [current, following]
                lat_list += [pole, pole]
                current, previous = following, lon[j % count]
                i = j
                continue
            current += (lon[k] - previous + turn.half) % turn.full - turn.half
            previous = lon[k]
            raw_list.append(lon[k])
            unwrapped_list.append(current)
            lat_list.append(lat[k])
            i += 1
        raw, unwrapped, lats = np.array(raw_list), np.array(unwrapped_list), np.array(lat_list)
    turns = np.round((unwrapped - raw) / turn.full).astype(np.int64)
    winding = int(turns[-1] - turns[0])  # the last point is the first again
    if not winding:
        return _Ring(raw, turns, lats, None)
    # Counter-clockwise, the inside is on the left: a ring running east around the north pole holds it.
    return _Ring(raw, turns, lats, turn.quarter if (winding > 0) == ccw else -turn.quarter)


STEP = 1 / 360  # the most longitude (of a turn) between two vertices near a pole, where edges sweep longitude fast
ROUNDS = 12


def _densified(xy: np.ndarray, forward: pyproj.Transformer, turn: _Turn) -> tuple[np.ndarray, ...]:
    """The open ring `xy` in lon/lat, its edges split in the source CRS until none spans more than STEP of longitude
    (but those from or to a pole, along a meridian): near a pole a straight pixel edge sweeps many degrees, and
    straight lines between its ends in lon/lat would cross the neighbouring rings. Longitudes, latitudes, and
    which vertices lie on a pole."""
    for round_ in range(ROUNDS + 1):
        lon, lat = forward.transform(xy[:, 0], xy[:, 1])
        lon, lat = np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)
        on_pole = np.abs(lat) >= turn.quarter * (1 - POLE_TOLERANCE)
        sweep = np.abs((np.roll(lon, -1) - lon + turn.half) % turn.full - turn.half)
        pieces = np.where(on_pole | np.roll(on_pole, -1), 1,
                          np.clip(np.ceil(sweep / (STEP * turn.full)), 1, 64)).astype(int)
        if round_ == ROUNDS or (pieces == 1).all():
            return lon, lat, on_pole
        edge = np.roll(xy, -1, axis=0) - xy
        starts = np.repeat(np.arange(len(xy)), pieces)
        fractions = np.concatenate([np.arange(n) / n for n in pieces])
        xy = xy[starts] + fractions[:, None] * edge[starts]
    raise AssertionError("unreachable")


def _with_poles(xy: np.ndarray, poles: list[tuple[float, float]], tolerance: float) -> np.ndarray:
    """The open ring `xy` with each pole that lies on one of its edges (not on a vertex) inserted there."""
    for px, py in poles:
        following = np.roll(xy, -1, axis=0)
        edge = following - xy
        length = np.hypot(edge[:, 0], edge[:, 1])
        with np.errstate(invalid="ignore", divide="ignore"):
            along = ((px - xy[:, 0]) * edge[:, 0] + (py - xy[:, 1]) * edge[:, 1]) / length ** 2
            off = np.abs((px - xy[:, 0]) * edge[:, 1] - (py - xy[:, 1]) * edge[:, 0]) / length
        hits = np.flatnonzero((along > 0) & (along < 1) & (off <= tolerance)
                              & (np.hypot(px - xy[:, 0], py - xy[:, 1]) > tolerance)
                              & (np.hypot(px - following[:, 0], py - following[:, 1]) > tolerance))
        for index in hits[::-1]:
            xy = np.insert(xy, index + 1, [px, py], axis=0)
    return xy


COPIES = 2  # turns repeated either side of a ring by _region: more than any window can reach


def _assembled(exterior: _Ring, holes: list[_Ring], turn: _Turn, centre: float):
    """The polygon of _ring's rings: placed around `centre` when none winds around a pole; else the turn around
    `centre` of the pattern they repeat every turn (_region)."""
    if exterior.pole is None and all(hole.pole is None for hole in holes):
        outline = exterior.points(turn)
        middle = (outline[:, 0].min() + outline[:, 0].max()) / 2
        shift = -math.floor((middle - (centre - turn.half)) / turn.full)
        shell, inner = Polygon(outline), []
        for hole in holes:  # each hole a whole number of turns over, to where it lies inside the exterior
            inside = Polygon(hole.points(turn)).representative_point()
            offsets = sorted(range(-COPIES - 1, COPIES + 2), key=abs)
            turns = next((k for k in offsets if shell.contains(affinity.translate(inside, xoff=k * turn.full))), 0)
            inner.append(hole.points(turn, turns + shift))
        return Polygon(exterior.points(turn, shift), inner)
    shape = _region(exterior, turn)
    if holes:
        shape = shape.difference(shapely.union_all([_region(hole, turn) for hole in holes]))
    return shape.intersection(box(centre - turn.half, -turn.quarter, centre + turn.half, turn.quarter))


def _region(ring: _Ring, turn: _Turn):
    """What a ring bounds, repeated every turn over 2 COPIES + 1 turns. A ring around a pole is one turn of an
    endless curve: that curve's copies end to end, closed through the pole at both far ends."""
    if ring.pole is None:  # less than a turn wide: its copies lie apart
        return MultiPolygon([Polygon(ring.points(turn, k)) for k in range(-COPIES, COPIES + 1)])
    step = int(ring.turns[-1] - ring.turns[0])  # a turn east or west
    curve = np.vstack([ring.points(turn, k * step)[:-1] for k in range(-COPIES, COPIES + 1)]
                      + [ring.points(turn, COPIES * step)[-1:]])
    # Closed through the pole at its far ends, where the meridians that close it may cross the curve's own
    # wiggles: made valid by the even-odd rule, which leaves the turns in the middle as the curve makes them.
    closed = np.vstack([curve, [[curve[-1, 0], ring.pole], [curve[0, 0], ring.pole]]])
    return _polygonal(shapely.make_valid(Polygon(closed)))


def _polygonal(shape):
    """The polygons of a shape (make_valid may give a collection with lines in it)."""
    pieces, found = [shape], []
    while pieces:  # collections in collections
        piece = pieces.pop()
        if piece.geom_type == "Polygon" and not piece.is_empty:
            found.append(piece)
        elif piece.geom_type in ("MultiPolygon", "GeometryCollection"):
            pieces.extend(reversed(shapely.get_parts(piece)))
    return found[0] if len(found) == 1 else MultiPolygon(found)


def check_reach(rasters: list[tuple[str, CRS, object, int, int]], out_crs: CRS, typed: bool) -> None:
    """Refuse (InputError) a raster whose CRS cannot be transformed to `out_crs`, or whose area `out_crs` cannot
    hold: a point of its grid (or a pole in it) without finite coordinates there, further from the output CRS's
    area of use than REACH times that area's larger side, or a jump across the output CRS's edge (a raster over
    the antimeridian in Web Mercator). `rasters`: (path, CRS, transform, width, height); `typed`: whether
    `out_crs` is the --out-crs given (else the first raster's)."""
    said = f"--out-crs {crs_label(out_crs)}" if typed else f"the output CRS {crs_label(out_crs)} (the first raster's)"
    limits = _area_of_use(out_crs)
    for path, crs, grid, width, height in rasters:
        if crs == out_crs:
            continue
        try:
            forward = transformer(crs, out_crs)
        except (ProjError, CRSError):
            raise InputError(f"The raster {path} is in {crs_label(crs)}, which cannot be transformed to {said}: PROJ "
                             "knows no way between them; give --out-crs a CRS every raster can be transformed to, "
                             f"or segment the rasters in {crs_label(crs)} apart.") from None
        where = _footprint(crs, grid, width, height)
        try:
            x, y = forward.transform(where[:, 0], where[:, 1])
            x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        except ProjError:
            x = y = np.array([np.nan])
        far = f"The raster {path} ({crs_label(crs)}) reaches where {said} cannot represent it"
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise InputError(f"{far} (a point of it has no coordinates there, such as a pole in Mercator); choose "
                             "another --out-crs, e.g. EPSG:4326.")
        if limits is None or out_crs.is_geographic:
            continue
        (x0, y0, x1, y1), side = limits, max(limits[2] - limits[0], limits[3] - limits[1])
        if (x.min() < x0 - REACH * side or x.max() > x1 + REACH * side
                or y.min() < y0 - REACH * side or y.max() > y1 + REACH * side):
            raise InputError(f"{far}: it lies far outside that CRS's area of use (x {x.min():.4g} .. {x.max():.4g}, "
                             f"y {y.min():.4g} .. {y.max():.4g}); choose an --out-crs made for its area, or "
                             "EPSG:4326.")
        ring = slice(0, 4 * (SAMPLES - 1))  # the grid's outline comes first in _footprint, in order
        steps = np.hypot(np.diff(x[ring], append=x[0]), np.diff(y[ring], append=y[0]))
        if steps.max() > side / 2:
            raise InputError(f"{far}: it crosses that CRS's edge (such as the antimeridian), where its polygons "
                             "would be torn apart; choose an --out-crs centred nearer to it, or EPSG:4326.")


def _area_of_use(crs: CRS) -> tuple[float, float, float, float] | None:
    """The output CRS's area of use in its own coordinates, when it has one and it can be placed there."""
    try:
        projected = pyproj.CRS.from_wkt(crs.to_wkt(version="WKT2_2019"))  # GDAL's WKT1 drops the area of use
        area = projected.area_of_use
        if area is None or projected.geodetic_crs is None:
            return None
        to_crs = pyproj.Transformer.from_crs(projected.geodetic_crs, projected, always_xy=True)
        bounds = to_crs.transform_bounds(area.west, area.south, area.east, area.north, densify_pts=41)
    except (ProjError, CRSError):
        return None
    return bounds if all(math.isfinite(v) for v in bounds) and bounds[2] > bounds[0] else None


def _footprint(crs: CRS, grid, width: int, height: int) -> np.ndarray:
    """Points of a raster's grid in its CRS: its outline in order (SAMPLES a side), a lattice inside, and the
    poles that lie on it."""
    steps = np.linspace(0, 1, SAMPLES)
    outline = np.concatenate([np.column_stack([steps[:-1], np.zeros(SAMPLES - 1)]),
                              np.column_stack([np.ones(SAMPLES - 1), steps[:-1]]),
                              np.column_stack([steps[::-1][:-1], np.ones(SAMPLES - 1)]),
                              np.column_stack([np.zeros(SAMPLES - 1), steps[::-1][:-1]])])
    inside = np.array([(a, b) for a in steps[1:-1:4] for b in steps[1:-1:4]])
    fractions = np.vstack([outline, inside])
    cols, rows = fractions[:, 0] * width, fractions[:, 1] * height
    xs, ys = grid.a * cols + grid.b * rows + grid.c, grid.d * cols + grid.e * rows + grid.f
    points = [np.column_stack([xs, ys])]
    try:
        geodetic = pyproj.CRS.from_wkt(crs.to_wkt()).geodetic_crs
        if geodetic is not None:
            to_crs = pyproj.Transformer.from_crs(geodetic, pyproj.CRS.from_wkt(crs.to_wkt()), always_xy=True)
            for latitude in (90.0, -90.0):
                x, y = to_crs.transform(0.0, latitude)
                if math.isfinite(x) and math.isfinite(y):
                    col, row = ~grid @ (x, y)
                    if 0 <= col <= width and 0 <= row <= height:
                        points.append(np.array([[x, y]]))
    except (ProjError, CRSError):
        pass
    return np.vstack(points)

