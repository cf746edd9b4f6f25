"""How much ground a unit of a projected CRS covers: map units are not metres on the ground everywhere.

A conformal projection far from its true-scale line (Web Mercator, EPSG:3857, at 50 degrees latitude
stretches lengths by 1.56 and areas by 2.4) gives planar lengths and areas that are not ground
metres. Where a projection keeps areas within TRUE_SCALE_TOLERANCE of the ground (UTM, State Plane,
national grids, every equal-area projection), planar figures scaled by the CRS unit are kept as they
are, so a pixel's area stays exactly its planar size; elsewhere areas and pixel sizes are measured on
the CRS's ellipsoid (through latitude and longitude, pyproj's Geod).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pyproj
import shapely

TRUE_SCALE_TOLERANCE = 0.01  # planar areas within 1 % of the ground are kept as they are


def as_pyproj(crs) -> pyproj.CRS | None:
    """A pyproj CRS of a rasterio/pyproj CRS or any user input; the horizontal part of a compound CRS."""
    if crs is None:
        return None
    if isinstance(crs, pyproj.CRS) and not crs.is_compound:
        return crs  # already one: no second round trip through WKT
    if hasattr(crs, "to_wkt"):
        crs = crs.to_wkt()
    crs = pyproj.CRS.from_user_input(crs)
    if crs.is_compound:
        crs = crs.sub_crs_list[0]
    return crs


def degrees_per_unit(crs) -> float:
    """Degrees per unit of a geographic CRS's longitude and latitude (0.9 for grads, EPSG:4807; 1 for degrees
    and where the CRS does not say)."""
    try:
        converted = as_pyproj(crs)
        axes = converted.axis_info if converted is not None else []
    except Exception:  # pyproj raises several types for CRSs it cannot read
        return 1.0
    if converted is None or not converted.is_geographic or not axes:
        return 1.0
    radians = axes[0].unit_conversion_factor
    return round(math.degrees(radians), 12) if radians and math.isfinite(radians) and radians > 0 else 1.0


def crs_label(crs) -> str:
    """A CRS's short name for a sentence: its code where its definition carries one (EPSG:32633), each part's
    joined by ' + ' for a compound CRS (EPSG:32633 + EPSG:5773), else its name in quotes ('site grid');
    a WKT or PROJ string is never inlined."""
    if crs is None:
        return "no CRS"
    try:
        parsed = pyproj.CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except Exception:  # pyproj raises several types for definitions it cannot read
        text = crs.to_string() if hasattr(crs, "to_string") else str(crs)
        return text if len(text) <= 40 else f"{text[:40]}..."
    return _label(parsed)


def _label(crs: pyproj.CRS) -> str:
    root = crs.to_json_dict().get("id")
    if isinstance(root, dict) and root.get("authority") and root.get("code") is not None:
        return f"{root['authority']}:{root['code']}"
    if crs.is_compound and crs.sub_crs_list:
        return " + ".join(_label(part) for part in crs.sub_crs_list)
    if crs.name and crs.name.lower() != "unknown":
        return repr(crs.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyproj warns that a PROJ string loses information
        text = crs.to_proj4()
    return text if text and len(text) <= 80 else "a CRS without a name or code"


@functools.lru_cache(maxsize=32)
def _factors(wkt: str) -> tuple[pyproj.Proj, pyproj.Transformer] | None:
    crs = pyproj.CRS.from_wkt(wkt)
    geographic = crs.geodetic_crs
    if geographic is None:
        return None
    try:
        return pyproj.Proj(crs), pyproj.Transformer.from_crs(crs, geographic, always_xy=True)
    except pyproj.exceptions.ProjError:
        return None


def areal_scale(crs, x, y) -> np.ndarray:
    """Planar area / ground area at the points (x, y) of a projected `crs` (CRS units squared taken as
    m² once scaled by the unit); 1 where unknown (no CRS, a geographic one, outside the projection)."""
    x, y = np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(np.asarray(y, dtype=np.float64))
    crs = as_pyproj(crs)
    scale = np.ones(x.shape, np.float64)
    if crs is None or not crs.is_projected or x.size == 0:
        return scale
    found = _factors(crs.to_wkt())
    if found is None:
        return scale
    proj, to_geographic = found
    with np.errstate(all="ignore"):
        lon, lat = to_geographic.transform(x, y, errcheck=False)
        try:
            factors = proj.get_factors(lon, lat, errcheck=False)
        except pyproj.exceptions.ProjError:
            return scale
        areal = np.asarray(factors.areal_scale, dtype=np.float64).reshape(x.shape)
    usable = np.isfinite(areal) & (areal > 0)
    scale[usable] = areal[usable]
    return scale


def keeps_areas(crs, x, y, tolerance: float = TRUE_SCALE_TOLERANCE) -> np.ndarray:
    """Whether the projection keeps areas within `tolerance` of the ground at each point."""
    return np.abs(areal_scale(crs, x, y) - 1.0) <= tolerance


def _to_geographic(crs: pyproj.CRS) -> tuple[pyproj.Transformer, pyproj.Geod] | None:
    found = _factors(crs.to_wkt())
    geod = crs.get_geod()
    if found is None or geod is None:
        return None
    return found[1], geod


# A polygon's edge is straight in its own CRS: for a pixel edge of a north-up raster in degrees, a
# parallel, not the geodesic Geod would join its two ends by (over a long edge the two part; an edge
# across all 360 degrees of longitude has no length at all). Areas are therefore integrated along the
# edges as drawn (Green's theorem with the ellipsoid's authalic function q: exact for parallels and
# meridians), projected polygons cut first into pieces this short on the ground.
MAX_EDGE_METRES = 10_000.0


def _authalic_q(latitude: np.ndarray, e2: float) -> np.ndarray:
    """q(latitude) of the ellipsoid (eccentricity squared e2): the area between the equator and a parallel
    over one radian of longitude is b^2 / 2 * q."""
    s = np.sin(latitude)
    if e2 == 0:
        return 2 * s
    e = math.sqrt(e2)
    return s / (1 - e2 * s * s) + np.arctanh(e * s) / e


def ellipsoid_areas(shapes: np.ndarray, geod: pyproj.Geod, unwrap: bool = False) -> np.ndarray:
    """Areas in m² on `geod`'s ellipsoid of polygons in degrees of longitude and latitude, each edge taken
    as drawn (straight in longitude and latitude). Latitudes a hair past a pole (a grid's edge at
    90.00000000000001, as reprojections write it) count as the pole. `unwrap`: longitudes of points
    moved from a projected CRS, which jump by 360 degrees where a ring crosses the antimeridian.

    Per ring, |integral of q dlon| (Simpson's rule on each edge, exact to ~1e-9 on an edge of one degree:
    longer edges are cut first); a ring that goes once around a pole (only a projected polygon can)
    encloses the pole's side; holes are taken off. All rings at once, in arrays."""
    shapes = np.asarray(shapes, dtype=object)
    pieces = shapes if unwrap else shapely.segmentize(shapes, 1.0)  # moved points are 10 km apart already
    areas = np.zeros(len(pieces), np.float64)
    polygons, owner = shapely.get_parts(pieces, return_index=True)
    if len(polygons) == 0:
        return areas
    rings, ring_polygon = shapely.get_rings(polygons, return_index=True)
    exterior = np.r_[True, ring_polygon[1:] != ring_polygon[:-1]]  # get_rings gives the exterior first
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    xy = np.radians(xy)
    lon, lat = xy[:, 0], np.clip(xy[:, 1], -math.pi / 2, math.pi / 2)
    if unwrap:  # across ring boundaries too: those steps are no edge, and a whole turn moves no area
        lon = np.unwrap(lon)
    same = ring_of[1:] == ring_of[:-1]  # an edge joins two points of one ring
    dlon = np.where(same, np.diff(lon), 0.0)
    q0, q1 = _authalic_q(lat[:-1], geod.es), _authalic_q(lat[1:], geod.es)
    middle = _authalic_q((lat[:-1] + lat[1:]) / 2, geod.es)
    edge_ring = ring_of[:-1]
    integral = np.bincount(edge_ring, dlon * (q0 + 4 * middle + q1) / 6, minlength=len(rings))
    if unwrap:
        turns = np.rint(np.bincount(edge_ring, dlon, minlength=len(rings)) / (2 * math.pi))
        mean_lat = np.bincount(ring_of, lat, minlength=len(rings)) / np.maximum(np.bincount(ring_of,
                                                                                            minlength=len(rings)), 1)
        pole = _authalic_q(np.copysign(math.pi / 2, mean_lat), geod.es)
        integral -= turns * 2 * math.pi * pole
    ring_area = np.abs(integral) * np.where(exterior, 1.0, -1.0)
    per_polygon = np.bincount(ring_polygon, ring_area, minlength=len(polygons))
    areas += np.bincount(owner, per_polygon, minlength=len(pieces)) * (geod.b * geod.b / 2)
    return areas


def geodesic_areas(shapes: np.ndarray, crs) -> np.ndarray | None:
    """Ellipsoidal areas in m² of polygons in a projected `crs` (None when the CRS has no way back to
    latitude and longitude)."""
    crs = as_pyproj(crs)
    found = _to_geographic(crs) if crs is not None else None
    if found is None:
        return None
    to_geographic, geod = found

    def lonlat(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(to_geographic.transform(xy[:, 0], xy[:, 1], errcheck=False))

    metres_per_unit = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    with np.errstate(all="ignore"):
        moved = shapely.transform(shapely.segmentize(shapes, MAX_EDGE_METRES / metres_per_unit), lonlat)
        return ellipsoid_areas(moved, geod, unwrap=True)


def ground_pixel_size(crs, transform, col: float, row: float) -> float | None:
    """Side in metres of a square with the ground area of pixel (col, row) of a raster in a projected
    `crs` with affine `transform` (None when unknown)."""
    corners = [transform @ (col + dc, row + dr) for dc, dr in ((0, 0), (1, 0), (1, 1), (0, 1))]
    area = geodesic_areas(np.array([shapely.Polygon(corners)], dtype=object), crs)
    if area is None or not np.isfinite(area[0]) or area[0] <= 0:
        return None
    return float(np.sqrt(area[0]))
