"""GeoJSON validation and NGSI-LD geo-queries (ETSI GS CIM 009 v1.8 clauses 4.7 and 4.10).

Semantics
---------
* GeoProperty values are GeoJSON geometries (clause 4.7, IETF RFC 7946): a position is
  ``[longitude, latitude(, altitude)]`` in WGS84; a LineString has >= 2 positions; a
  Polygon is a list of closed linear rings of >= 4 positions.
* A geo-query (clause 4.10) has ``georel``, ``geometry``, ``coordinates`` and an optional
  ``geoproperty`` (default: ``location``).  ``georel`` is one of ``near;maxDistance==<m>``,
  ``near;minDistance==<m>``, ``within``, ``contains``, ``intersects``, ``equals``,
  ``disjoint``, ``overlaps``.  The relations are the Simple Features / DE-9IM ones, read
  with the *target entity's GeoProperty* as the subject and the *query geometry* as the
  object: "within" = the stored geometry is within the query geometry, "contains" = the
  stored geometry contains the query geometry; ``near`` compares the distance (metres)
  between the two geometries with maxDistance (<=) or minDistance (>=).
* Leniencies beyond the ABNF: geometry names are matched case-insensitively and normalised
  ("point" -> "Point"); ``near;minDistance==a;maxDistance==b`` (an annulus) is accepted.
  Both near bounds are inclusive, with 1 mm of tolerance for floating-point noise.

Approximations (documented, deliberate)
---------------------------------------
* Topological predicates are evaluated in the planar lon/lat plane, which is what RFC 7946
  clause 3.1.1 prescribes (a line between two positions is straight in the CRS).  Geometries
  are not split at the antimeridian (RFC 7946 clause 3.1.9 asks producers to cut them).
* Distances are on a sphere of radius 6,371,008.8 m (the IUGG mean Earth radius), not on the
  WGS84 ellipsoid: up to ~0.5 % off the ellipsoidal (Vincenty) distance, typically ~0.2 %.
* Point-to-point (and point-to-multipoint) distances: exact haversine on that sphere.
* Any other pair: both geometries are densified (segments <= 0.1 degree) and projected onto a
  spherical azimuthal-equidistant plane centred on the query geometry (its point, or the
  centre of its bbox).  Shapely finds the closest pair of points there; the pair is projected
  back and its haversine distance is returned.  Distances from the centre are exact in that
  projection; the residual error comes from the nearest pair being chosen in the plane (a
  second-order error, < 0.1 % for pairs within a few hundred km of the centre) and from the
  densified chords (sagitta of a few metres at mid latitudes).
* ``index_bbox`` for ``near;maxDistance`` pads the query bbox by the exact spherical cap
  extents (latitude: d/R; longitude: asin(sin(d/R)/cos(lat_max))) times 1.01 for safety, and
  returns the full longitude range when the cap reaches a pole or crosses the antimeridian.
  (A flat d/111,320 m-per-degree latitude pad would *not* be conservative: on the sphere used
  for distances one degree is 111,195 m, so a point due north at exactly d would fall outside.)
* Measured: point-to-line distances within ~450 km of the query are within 0.05 % of a
  brute-force spherical minimum over the GeoJSON (lon/lat-straight) segments.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import orjson
import shapely
import shapely.geometry
from shapely.errors import GEOSException

from middleware.context.errors import BadRequestData

__all__ = [
    "EARTH_RADIUS_M",
    "DEFAULT_GEOPROPERTY",
    "GEOMETRY_TYPES",
    "QUERY_GEOMETRY_TYPES",
    "GEORELS",
    "validate_geojson",
    "geometry_bbox",
    "haversine_m",
    "GeoQuery",
    "parse_geoq",
]

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius (IUGG R1) in metres used for every distance computation."""

DEFAULT_GEOPROPERTY = "https://uri.etsi.org/ngsi-ld/location"
"""Expanded name of the default GeoProperty of a geo-query (clause 4.10: ``location``)."""

GEOMETRY_TYPES = frozenset({"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon"})
"""GeoJSON geometry types accepted as GeoProperty values: all of RFC 7946 but GeometryCollection (clause 4.6.3)."""

QUERY_GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon")
"""Geometry names accepted in the ``geometry`` parameter of a geo-query (clause 4.10)."""

GEORELS = frozenset({"near", "within", "contains", "intersects", "equals", "disjoint", "overlaps"})
"""Geo-relations of the NGSI-LD geo-query language (clause 4.10)."""

_QUERY_GEOMETRY_BY_LOWER = {name.lower(): name for name in QUERY_GEOMETRY_TYPES}
_DEG = math.pi / 180.0
_M_PER_DEG = EARTH_RADIUS_M * _DEG  # 111,194.93 m per degree of arc on the sphere
_BBOX_SAFETY = 1.01
_DENSIFY_DEG = 0.1
_FULL_LON = (-180.0, 180.0)
_TOLERANCE_M = 1e-3  # near bounds are inclusive up to 1 mm of floating-point noise


# --------------------------------------------------------------------------- validation


def _fail(path: str, msg: str) -> None:
    raise BadRequestData(f"Invalid GeoJSON geometry at {path}: {msg}")


def _check_number(x: Any, path: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        _fail(path, f"coordinate {x!r} is not a number")
    if not math.isfinite(x):
        _fail(path, f"coordinate {x!r} is not a finite number")
    return float(x)


def _check_position(p: Any, path: str) -> None:
    if not isinstance(p, (list, tuple)):
        _fail(path, f"a position must be an array of 2 or 3 numbers, got {type(p).__name__}")
    if len(p) not in (2, 3):
        _fail(path, f"a position must have 2 or 3 elements (lon, lat[, alt]), got {len(p)}")
    lon = _check_number(p[0], path + "[0]")
    lat = _check_number(p[1], path + "[1]")
    if len(p) == 3:
        _check_number(p[2], path + "[2]")
    if not -180.0 <= lon <= 180.0:
        _fail(path, f"longitude {lon} is outside [-180, 180]")
    if not -90.0 <= lat <= 90.0:
        _fail(path, f"latitude {lat} is outside [-90, 90]")


def _check_array(a: Any, path: str, what: str) -> None:
    if not isinstance(a, (list, tuple)):
        _fail(path, f"{what} must be an array, got {type(a).__name__}")
    if not a:
        _fail(path, f"{what} must not be empty")


def _check_line(c: Any, path: str) -> None:
    _check_array(c, path, "LineString coordinates")
    for i, p in enumerate(c):
        _check_position(p, f"{path}[{i}]")
    if len(c) < 2:
        _fail(path, f"a LineString needs at least 2 positions, got {len(c)}")


def _check_ring(c: Any, path: str) -> None:
    _check_array(c, path, "a linear ring")
    for i, p in enumerate(c):
        _check_position(p, f"{path}[{i}]")
    if len(c) < 4:
        _fail(path, f"a linear ring needs at least 4 positions, got {len(c)}")
    if [float(v) for v in c[0]] != [float(v) for v in c[-1]]:
        _fail(path, "a linear ring must be closed (first and last positions equal)")


def _check_polygon(c: Any, path: str) -> None:
    _check_array(c, path, "Polygon coordinates")
    for i, ring in enumerate(c):
        _check_ring(ring, f"{path}[{i}]")


def _check_geometry(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        _fail(path, f"a geometry must be a JSON object, got {type(value).__name__}")
    gtype = value.get("type")
    if gtype == "GeometryCollection":
        _fail(path, "a GeometryCollection is not an NGSI-LD value (clause 4.6.3 admits every GeoJSON geometry but it)")
    if gtype not in GEOMETRY_TYPES:
        _fail(path, f"unsupported or missing geometry type {gtype!r}")
    if "bbox" in value:
        bbox = value["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) not in (4, 6):
            _fail(path + ".bbox", "bbox must be an array of 4 or 6 numbers")
        for i, x in enumerate(bbox):
            _check_number(x, f"{path}.bbox[{i}]")
    if "coordinates" not in value:
        _fail(path, f"a {gtype} needs a 'coordinates' member")
    c = value["coordinates"]
    cpath = path + ".coordinates"
    if gtype == "Point":
        _check_position(c, cpath)
    elif gtype == "MultiPoint":
        _check_array(c, cpath, "MultiPoint coordinates")
        for i, p in enumerate(c):
            _check_position(p, f"{cpath}[{i}]")
    elif gtype == "LineString":
        _check_line(c, cpath)
    elif gtype == "MultiLineString":
        _check_array(c, cpath, "MultiLineString coordinates")
        for i, line in enumerate(c):
            _check_line(line, f"{cpath}[{i}]")
    elif gtype == "Polygon":
        _check_polygon(c, cpath)
    else:  # MultiPolygon
        _check_array(c, cpath, "MultiPolygon coordinates")
        for i, poly in enumerate(c):
            _check_polygon(poly, f"{cpath}[{i}]")


def validate_geojson(value) -> None:
    """Raise BadRequestData unless value is a valid GeoJSON geometry (RFC 7946 / clause 4.7)."""
    _check_geometry(value, "$")


# --------------------------------------------------------------------------- bbox


def _positions(value: dict):
    gtype = value["type"]
    if gtype == "GeometryCollection":  # refused as a value since clause 4.6.3 was followed; stored ones still work
        for g in value["geometries"]:
            yield from _positions(g)
        return
    c = value["coordinates"]
    if gtype == "Point":
        yield c
    elif gtype in ("MultiPoint", "LineString"):
        yield from c
    elif gtype in ("MultiLineString", "Polygon"):
        for part in c:
            yield from part
    else:  # MultiPolygon: the exterior rings bound every hole
        for poly in c:
            yield from poly[0]


def geometry_bbox(value: dict) -> tuple[float, float, float, float]:
    """(min_lon, min_lat, max_lon, max_lat) of a valid GeoJSON geometry, for the spatial index."""
    if value["type"] == "Point":
        lon, lat = float(value["coordinates"][0]), float(value["coordinates"][1])
        return (lon, lat, lon, lat)
    min_lon = min_lat = math.inf
    max_lon = max_lat = -math.inf
    for p in _positions(value):
        lon, lat = p[0], p[1]
        if lon < min_lon:
            min_lon = lon
        if lon > max_lon:
            max_lon = lon
        if lat < min_lat:
            min_lat = lat
        if lat > max_lat:
            max_lat = lat
    if min_lon is math.inf:
        raise BadRequestData("Invalid GeoJSON geometry: it has no position")
    return (float(min_lon), float(min_lat), float(max_lon), float(max_lat))


# --------------------------------------------------------------------------- distances


def haversine_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Great-circle distance in metres between two lon/lat points on the mean-radius sphere."""
    p1 = lat1 * _DEG
    p2 = lat2 * _DEG
    dp = p2 - p1
    dl = (lon2 - lon1) * _DEG
    h = math.sin(dp * 0.5) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl * 0.5) ** 2
    return 2.0 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _min_pair_haversine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest haversine distance (m) between any lon/lat row of `a` and any of `b`."""
    if len(a) == 1 and len(b) == 1:
        return haversine_m(float(a[0, 0]), float(a[0, 1]), float(b[0, 0]), float(b[0, 1]))
    p1 = np.radians(a[:, 1])[:, None]
    p2 = np.radians(b[:, 1])[None, :]
    dl = np.radians(b[:, 0][None, :] - a[:, 0][:, None])
    h = np.sin((p2 - p1) * 0.5) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl * 0.5) ** 2
    return float(2.0 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h.min(), 0.0, 1.0))))


class _Aeqd:
    """Spherical azimuthal-equidistant projection centred on (lon0, lat0), in metres."""

    __slots__ = ("lon0", "lat0", "sin0", "cos0")

    def __init__(self, lon0: float, lat0: float):
        self.lon0 = lon0 * _DEG
        self.lat0 = lat0 * _DEG
        self.sin0 = math.sin(self.lat0)
        self.cos0 = math.cos(self.lat0)

    def forward(self, xy: np.ndarray) -> np.ndarray:
        """Project an (N, 2) array of lon/lat degrees to an (N, 2) array of metres."""
        lam = xy[:, 0] * _DEG - self.lon0
        phi = xy[:, 1] * _DEG
        sp, cp = np.sin(phi), np.cos(phi)
        cl = np.cos(lam)
        cos_c = np.clip(self.sin0 * sp + self.cos0 * cp * cl, -1.0, 1.0)
        c = np.arccos(cos_c)
        sin_c = np.sin(c)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.where(c < 1e-12, 1.0, c / np.where(sin_c < 1e-15, 1e-15, sin_c))
        x = EARTH_RADIUS_M * k * cp * np.sin(lam)
        y = EARTH_RADIUS_M * k * (self.cos0 * sp - self.sin0 * cp * cl)
        return np.column_stack((x, y))

    def inverse(self, x: float, y: float) -> tuple[float, float]:
        """Lon/lat degrees of a projected point."""
        rho = math.hypot(x, y)
        if rho < 1e-9:
            return self.lon0 / _DEG, self.lat0 / _DEG
        c = rho / EARTH_RADIUS_M
        sc, cc = math.sin(c), math.cos(c)
        lat = math.asin(max(-1.0, min(1.0, cc * self.sin0 + y * sc * self.cos0 / rho)))
        lon = self.lon0 + math.atan2(x * sc, rho * self.cos0 * cc - y * self.sin0 * sc)
        lon_deg = (lon / _DEG + 180.0) % 360.0 - 180.0
        return lon_deg, lat / _DEG

    def project(self, geom):
        """Densify a lon/lat shapely geometry and project it to this plane."""
        if shapely.get_type_id(geom) not in (0, 4):  # not Point / MultiPoint
            geom = shapely.segmentize(geom, _DENSIFY_DEG)
        return shapely.transform(geom, self.forward)


# --------------------------------------------------------------------------- shapely helpers


def _to_shape(value: dict):
    """Shapely geometry of a GeoJSON dict (2D predicates; Z is ignored by GEOS predicates)."""
    if value.get("type") == "Point":
        c = value["coordinates"]
        return shapely.Point(c[0], c[1])
    return shapely.geometry.shape(value)


def _fast_point(value: dict) -> tuple[float, float] | None:
    """(lon, lat) of a GeoJSON Point with finite numeric coordinates, else None (left to shapely)."""
    c = value.get("coordinates")
    if isinstance(c, (list, tuple)) and len(c) >= 2 and type(c[0]) in (int, float) and type(c[1]) in (int, float):
        lon, lat = float(c[0]), float(c[1])
        if math.isfinite(lon) and math.isfinite(lat):
            return lon, lat
    return None


def _point_coords(geom) -> np.ndarray | None:
    """(N, 2) lon/lat array when geom is a Point or MultiPoint, else None."""
    if shapely.get_type_id(geom) in (0, 4):
        return shapely.get_coordinates(geom)
    return None


def _cleaned(geom):
    """A GEOS-friendly version of a geometry (valid, collections dissolved) for retries."""
    geom = shapely.make_valid(geom)
    if shapely.get_type_id(geom) == 7:
        geom = shapely.union_all(shapely.get_parts(geom))
    return geom


# --------------------------------------------------------------------------- query


class GeoQuery:
    """A parsed NGSI-LD geo-query (clause 4.10) evaluated against stored GeoJSON geometries."""

    __slots__ = (
        "georel",
        "geometry",
        "coordinates",
        "geoproperty",
        "max_distance",
        "min_distance",
        "_geojson",
        "_shape",
        "_points",
        "_bbox",
        "_aeqd",
        "_proj",
        "_index_bbox",
        "_point",
    )

    def __init__(
        self,
        georel: str,
        geometry: str,
        coordinates: list,
        geoproperty: str = DEFAULT_GEOPROPERTY,
        max_distance: float | None = None,
        min_distance: float | None = None,
    ):
        if georel not in GEORELS:
            raise BadRequestData(f"Unknown georel {georel!r}")
        if geometry not in QUERY_GEOMETRY_TYPES:
            raise BadRequestData(f"Unsupported geo-query geometry {geometry!r}")
        if georel == "near" and max_distance is None and min_distance is None:
            raise BadRequestData("georel near requires maxDistance or minDistance")
        if georel != "near" and (max_distance is not None or min_distance is not None):
            raise BadRequestData(f"maxDistance/minDistance are only allowed with georel near, not {georel!r}")
        self.georel = georel
        self.geometry = geometry
        self.coordinates = coordinates
        self.geoproperty = geoproperty
        self.max_distance = None if max_distance is None else float(max_distance)
        self.min_distance = None if min_distance is None else float(min_distance)
        self._geojson = {"type": geometry, "coordinates": coordinates}
        validate_geojson(self._geojson)
        self._shape = _to_shape(self._geojson)
        shapely.prepare(self._shape)
        self._points = _point_coords(self._shape)
        self._bbox = geometry_bbox(self._geojson)
        if geometry == "Point":
            centre = (float(coordinates[0]), float(coordinates[1]))
        else:
            b = self._bbox
            centre = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0)
        self._aeqd = _Aeqd(*centre)
        self._proj = None  # projected query geometry, built on first non point-point distance
        self._index_bbox = self._compute_index_bbox()
        self._point = (float(self._points[0, 0]), float(self._points[0, 1])) if self._points is not None \
            and len(self._points) == 1 else None  # near a single point: plain haversine, no shapely

    def __repr__(self) -> str:
        return (
            f"GeoQuery(georel={self.georel!r}, geometry={self.geometry!r}, coordinates={self.coordinates!r}, "
            f"geoproperty={self.geoproperty!r}, max_distance={self.max_distance!r}, "
            f"min_distance={self.min_distance!r})"
        )

    def as_dict(self) -> dict:
        """The geo-query as an NGSI-LD GeoQuery JSON object (clause 5.2.13), georel re-serialised."""
        georel = self.georel
        if self.max_distance is not None:
            georel += f";maxDistance=={_num(self.max_distance)}"
        if self.min_distance is not None:
            georel += f";minDistance=={_num(self.min_distance)}"
        return {
            "georel": georel,
            "geometry": self.geometry,
            "coordinates": self.coordinates,
            "geoproperty": self.geoproperty,
        }

    # ---- prefilter

    def _compute_index_bbox(self):
        if self.georel == "disjoint":
            return None
        if self.georel == "near":
            if self.max_distance is None:
                return None
            return _padded_bbox(self._bbox, self.max_distance)
        return self._bbox

    def index_bbox(self) -> tuple[float, float, float, float] | None:
        """A bbox every matching geometry's bbox intersects (R-tree prefilter), or None (disjoint, minDistance)."""
        return self._index_bbox

    # ---- exact tests

    def matches(self, value: dict) -> bool:
        """Exact test of one stored GeoJSON geometry against the query (shapely, DE-9IM)."""
        if value.get("type") == "Point":  # the common case (a located sensor) is settled without shapely when it can be
            point = _fast_point(value)
            box = self._index_bbox
            outside = point is not None and box is not None and not (
                box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3])
            if outside:
                return False  # outside the box every match lies in (the R-tree prefilter's box)
            if point is not None and self._point is not None and self.georel == "near":
                d = haversine_m(self._point[0], self._point[1], point[0], point[1])
                return not ((self.max_distance is not None and d > self.max_distance + _TOLERANCE_M)
                            or (self.min_distance is not None and d < self.min_distance - _TOLERANCE_M))
        try:
            stored = _to_shape(value)
        except Exception:  # not a usable geometry (stored data is validated on write; be defensive)
            return False
        if self.georel == "near":
            d = self._distance_shape(stored)
            if self.max_distance is not None and d > self.max_distance + _TOLERANCE_M:
                return False
            if self.min_distance is not None and d < self.min_distance - _TOLERANCE_M:
                return False
            return True
        try:
            return self._relate(self._shape, stored)
        except GEOSException:
            try:
                return self._relate(_cleaned(self._shape), _cleaned(stored))
            except GEOSException:
                return False

    def _relate(self, q, s) -> bool:
        rel = self.georel
        if rel == "within":  # stored within query  <=>  query contains stored
            return bool(shapely.contains(q, s))
        if rel == "contains":  # stored contains query  <=>  query within stored
            return bool(shapely.within(q, s))
        if rel == "intersects":
            return bool(shapely.intersects(q, s))
        if rel == "disjoint":
            return bool(shapely.disjoint(q, s))
        if rel == "overlaps":
            return bool(shapely.overlaps(q, s))
        return bool(shapely.equals(q, s))  # equals (topological equality)

    def distance(self, value: dict) -> float:
        """Distance in metres from the query geometry to the stored geometry (0 when they intersect)."""
        return self._distance_shape(_to_shape(value))

    def _distance_shape(self, stored) -> float:
        qp = self._points
        if qp is not None:
            sp = _point_coords(stored)
            if sp is not None and len(sp) and len(qp) * len(sp) <= 1_000_000:
                return _min_pair_haversine(qp, sp)  # point(s) to point(s): exact haversine
        try:
            if shapely.intersects(self._shape, stored):
                return 0.0
        except GEOSException:
            stored = _cleaned(stored)
            if shapely.intersects(self._shape, stored):
                return 0.0
        if self._proj is None:
            self._proj = self._aeqd.project(self._shape)
        proj_s = self._aeqd.project(stored)
        line = shapely.shortest_line(self._proj, proj_s)
        if line is None or line.is_empty:
            return math.inf
        (x1, y1), (x2, y2) = shapely.get_coordinates(line)[:2]
        lon1, lat1 = self._aeqd.inverse(x1, y1)
        lon2, lat2 = self._aeqd.inverse(x2, y2)
        return haversine_m(lon1, lat1, lon2, lat2)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _padded_bbox(bbox, metres: float) -> tuple[float, float, float, float]:
    """Degree bbox containing every point within `metres` (spherical) of any point of `bbox`."""
    min_lon, min_lat, max_lon, max_lat = bbox
    delta = metres / EARTH_RADIUS_M  # angular radius (rad)
    lat_pad = math.degrees(delta) * _BBOX_SAFETY + 1e-9
    lo_lat = min_lat - lat_pad
    hi_lat = max_lat + lat_pad
    if delta >= math.pi / 2 or lo_lat <= -90.0 or hi_lat >= 90.0:
        return (-180.0, max(-90.0, lo_lat), 180.0, min(90.0, hi_lat))
    phi_max = max(abs(min_lat), abs(max_lat)) * _DEG
    s = math.sin(delta) / math.cos(phi_max)
    if s >= 1.0:
        return (-180.0, lo_lat, 180.0, hi_lat)
    lon_pad = math.degrees(math.asin(s)) * _BBOX_SAFETY + 1e-9
    lo_lon = min_lon - lon_pad
    hi_lon = max_lon + lon_pad
    if lo_lon < -180.0 or hi_lon > 180.0:
        lo_lon, hi_lon = _FULL_LON
    return (lo_lon, lo_lat, hi_lon, hi_lat)


# --------------------------------------------------------------------------- parsing


def _parse_distance(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequestData(f"georel {name} must be a number of metres, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise BadRequestData(f"georel {name} must be a non-negative finite number of metres, got {text!r}")
    return value


def _parse_georel(georel: Any) -> tuple[str, float | None, float | None]:
    if not isinstance(georel, str) or not georel.strip():
        raise BadRequestData(f"Invalid georel {georel!r}")
    parts = [p.strip() for p in georel.strip().split(";")]
    rel = parts[0]
    if rel not in GEORELS:
        raise BadRequestData(
            f"Unknown georel {rel!r}; expected one of near, within, contains, intersects, equals, disjoint, overlaps"
        )
    max_d = min_d = None
    for mod in parts[1:]:
        if rel != "near":
            raise BadRequestData(f"georel {rel!r} takes no modifier, got {mod!r}")
        name, sep, val = mod.partition("==")
        if not sep:
            raise BadRequestData(f"Invalid near modifier {mod!r}; expected maxDistance==<metres> or minDistance==<metres>")
        name = name.strip()
        if name == "maxDistance":
            if max_d is not None:
                raise BadRequestData("Duplicate maxDistance in georel")
            max_d = _parse_distance(name, val.strip())
        elif name == "minDistance":
            if min_d is not None:
                raise BadRequestData("Duplicate minDistance in georel")
            min_d = _parse_distance(name, val.strip())
        else:
            raise BadRequestData(f"Unknown near modifier {name!r}; expected maxDistance or minDistance")
    if rel == "near":
        if max_d is None and min_d is None:
            raise BadRequestData("georel near requires maxDistance==<metres> or minDistance==<metres>")
        if max_d is not None and min_d is not None and min_d > max_d:
            raise BadRequestData("georel near: minDistance is greater than maxDistance")
    return rel, max_d, min_d


def _parse_coordinates(coordinates: Any) -> list:
    if isinstance(coordinates, (bytes, bytearray)):
        coordinates = coordinates.decode("utf-8", "replace")
    if isinstance(coordinates, str):
        try:
            coordinates = orjson.loads(coordinates)
        except orjson.JSONDecodeError:
            raise BadRequestData(f"Geo-query coordinates are not a JSON array: {coordinates!r}") from None
    if isinstance(coordinates, tuple):
        coordinates = list(coordinates)
    if not isinstance(coordinates, list):
        raise BadRequestData(f"Geo-query coordinates must be a JSON array, got {coordinates!r}")
    return coordinates


def parse_geoq(
    georel: str | None,
    geometry: str | None,
    coordinates,
    geoproperty: str | None,
    expand: Callable[[str], str],
) -> GeoQuery | None:
    """Build a GeoQuery from geoQ parameters; None when absent, BadRequestData when partial or invalid."""
    given = {"georel": georel, "geometry": geometry, "coordinates": coordinates}
    present = [k for k, v in given.items() if v is not None]
    if not present:
        return None
    if len(present) != 3:
        missing = ", ".join(k for k in given if k not in present)
        raise BadRequestData(f"Incomplete geo-query: {missing} missing (georel, geometry and coordinates go together)")
    rel, max_d, min_d = _parse_georel(georel)
    if not isinstance(geometry, str) or geometry.strip().lower() not in _QUERY_GEOMETRY_BY_LOWER:
        raise BadRequestData(
            f"Invalid geo-query geometry {geometry!r}; expected one of {', '.join(QUERY_GEOMETRY_TYPES)}"
        )
    gname = _QUERY_GEOMETRY_BY_LOWER[geometry.strip().lower()]
    coords = _parse_coordinates(coordinates)
    try:
        validate_geojson({"type": gname, "coordinates": coords})
    except BadRequestData as exc:
        raise BadRequestData(f"Invalid geo-query coordinates for {gname}: {exc.detail}") from None
    if geoproperty is None:
        prop = DEFAULT_GEOPROPERTY
    else:
        if not isinstance(geoproperty, str) or not geoproperty.strip():
            raise BadRequestData(f"Invalid geoproperty {geoproperty!r}")
        prop = expand(geoproperty.strip())
        if not isinstance(prop, str) or not prop:
            raise BadRequestData(f"Invalid geoproperty {geoproperty!r}")
    return GeoQuery(rel, gname, coords, prop, max_distance=max_d, min_distance=min_d)
