"""Unit tests of middleware.context.geo: GeoJSON validation and NGSI-LD geo-queries (CIM 009 4.7, 4.10)."""
from __future__ import annotations

import math

import pytest

from middleware.context.errors import BadRequestData
from middleware.context.geo import (
    DEFAULT_GEOPROPERTY,
    EARTH_RADIUS_M,
    GeoQuery,
    geometry_bbox,
    haversine_m,
    parse_geoq,
    validate_geojson,
)

CORE = "https://uri.etsi.org/ngsi-ld/"


def expand(name: str) -> str:
    """Toy expansion: core terms into the core namespace, anything else into example.org."""
    if name.startswith("http"):
        return name
    if name in ("location", "observationSpace", "operationSpace"):
        return CORE + name
    return "https://example.org/" + name


def q(georel, geometry, coordinates, geoproperty=None) -> GeoQuery:
    """Shorthand for parse_geoq that must succeed."""
    result = parse_geoq(georel, geometry, coordinates, geoproperty, expand)
    assert result is not None
    return result


def point(lon, lat):
    return {"type": "Point", "coordinates": [lon, lat]}


def box(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def box_coords(x0, y0, x1, y1):
    return box(x0, y0, x1, y1)["coordinates"]


def destination(lon, lat, bearing_deg, metres):
    """Point at `metres` along the great circle from (lon, lat) with initial bearing (sphere)."""
    d = metres / EARTH_RADIUS_M
    th = math.radians(bearing_deg)
    p1, l1 = math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(th))
    l2 = l1 + math.atan2(math.sin(th) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    lon2 = (math.degrees(l2) + 180.0) % 360.0 - 180.0
    return lon2, math.degrees(p2)


def in_bbox(bbox, lon, lat):
    return bbox[0] <= lon <= bbox[2] and bbox[1] <= lat <= bbox[3]


SEOUL = (126.9780, 37.5665)
BUSAN = (129.0756, 35.1796)
PARIS = (2.3522, 48.8566)
LONDON = (-0.1276, 51.5072)
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0  # 111,194.93 m


# ----------------------------------------------------------------------------- validate_geojson

VALID = [
    point(8.0, 40.0),
    point(180, 90),
    point(-180, -90),
    {"type": "Point", "coordinates": [8.0, 40.0, 120.5]},
    {"type": "Point", "coordinates": [8, 40]},
    {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
    {"type": "LineString", "coordinates": [[1, 2], [3, 4]]},
    {"type": "MultiLineString", "coordinates": [[[1, 2], [3, 4]], [[5, 6], [7, 8], [9, 10]]]},
    box(0, 0, 1, 1),
    {"type": "Polygon", "coordinates": box_coords(0, 0, 10, 10) + [[[2, 2], [2, 3], [3, 3], [3, 2], [2, 2]]]},
    {"type": "MultiPolygon", "coordinates": [box_coords(0, 0, 1, 1), box_coords(5, 5, 6, 6)]},
    {"type": "Point", "coordinates": [1, 2], "bbox": [1, 2, 1, 2]},
]


@pytest.mark.parametrize("value", VALID)
def test_validate_accepts_valid_geometries(value):
    assert validate_geojson(value) is None


INVALID = [
    ("not-a-dict", "JSON object"),
    ({"coordinates": [1, 2]}, "geometry type"),
    ({"type": "Feature", "geometry": point(1, 2)}, "geometry type"),
    ({"type": "Circle", "coordinates": [1, 2]}, "geometry type"),
    ({"type": "point", "coordinates": [1, 2]}, "geometry type"),
    ({"type": "Point"}, "coordinates"),
    ({"type": "Point", "coordinates": "1,2"}, "position"),
    ({"type": "Point", "coordinates": [1]}, "2 or 3"),
    ({"type": "Point", "coordinates": [1, 2, 3, 4]}, "2 or 3"),
    ({"type": "Point", "coordinates": [True, 2]}, "not a number"),
    ({"type": "Point", "coordinates": ["1", 2]}, "not a number"),
    ({"type": "Point", "coordinates": [None, 2]}, "not a number"),
    ({"type": "Point", "coordinates": [float("nan"), 2]}, "finite"),
    ({"type": "Point", "coordinates": [1, float("inf")]}, "finite"),
    ({"type": "Point", "coordinates": [180.0001, 0]}, "longitude"),
    ({"type": "Point", "coordinates": [-181, 0]}, "longitude"),
    ({"type": "Point", "coordinates": [0, 90.5]}, "latitude"),
    ({"type": "Point", "coordinates": [0, -91]}, "latitude"),
    ({"type": "MultiPoint", "coordinates": []}, "empty"),
    ({"type": "MultiPoint", "coordinates": [[1, 2], [500, 2]]}, "longitude"),
    ({"type": "LineString", "coordinates": [[1, 2]]}, "at least 2"),
    ({"type": "LineString", "coordinates": [1, 2]}, "position"),
    ({"type": "MultiLineString", "coordinates": [[[1, 2], [3, 4]], [[1, 2]]]}, "at least 2"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}, "at least 4"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}, "closed"),
    ({"type": "Polygon", "coordinates": []}, "empty"),
    ({"type": "Polygon", "coordinates": [[0, 0], [1, 0], [1, 1], [0, 0]]}, "position"),
    ({"type": "MultiPolygon", "coordinates": [box_coords(0, 0, 1, 1), [[[0, 0], [1, 1], [0, 0]]]]}, "at least 4"),
    ({"type": "GeometryCollection", "geometries": [point(1, 2), box(0, 0, 1, 1)]}, "clause 4.6.3"),  # not a value
    ({"type": "Point", "coordinates": [1, 2], "bbox": [1, 2]}, "bbox"),
]


@pytest.mark.parametrize("value,fragment", INVALID)
def test_validate_rejects_invalid_geometries_with_clear_detail(value, fragment):
    with pytest.raises(BadRequestData) as exc:
        validate_geojson(value)
    assert exc.value.status == 400
    assert fragment in exc.value.detail


def test_validate_error_detail_points_at_the_offending_position():
    with pytest.raises(BadRequestData) as exc:
        validate_geojson({"type": "MultiLineString", "coordinates": [[[1, 2], [3, 4]], [[1, 2], [3, 95]]]})
    assert "$.coordinates[1][1]" in exc.value.detail


# ----------------------------------------------------------------------------- geometry_bbox


@pytest.mark.parametrize(
    "value,expected",
    [
        (point(8, 40), (8.0, 40.0, 8.0, 40.0)),
        ({"type": "Point", "coordinates": [8, 40, 100]}, (8.0, 40.0, 8.0, 40.0)),
        ({"type": "MultiPoint", "coordinates": [[1, 5], [-3, 4]]}, (-3.0, 4.0, 1.0, 5.0)),
        ({"type": "LineString", "coordinates": [[1, 2], [3, -4]]}, (1.0, -4.0, 3.0, 2.0)),
        ({"type": "MultiLineString", "coordinates": [[[1, 2], [3, 4]], [[-5, 6], [7, 8]]]}, (-5.0, 2.0, 7.0, 8.0)),
        (box(0, 0, 10, 5), (0.0, 0.0, 10.0, 5.0)),
        ({"type": "MultiPolygon", "coordinates": [box_coords(0, 0, 1, 1), box_coords(5, -5, 6, 6)]}, (0.0, -5.0, 6.0, 6.0)),
        ({"type": "GeometryCollection", "geometries": [point(-170, 80), box(0, 0, 1, 1)]}, (-170.0, 0.0, 1.0, 80.0)),
    ],
)
def test_geometry_bbox(value, expected):
    assert geometry_bbox(value) == expected
    assert all(isinstance(v, float) for v in geometry_bbox(value))


# ----------------------------------------------------------------------------- parse_geoq


def test_parse_returns_none_when_no_geo_query():
    assert parse_geoq(None, None, None, None, expand) is None
    assert parse_geoq(None, None, None, "location", expand) is None


@pytest.mark.parametrize(
    "georel,geometry,coordinates",
    [
        ("within", None, None),
        (None, "Point", None),
        (None, None, "[1,2]"),
        ("within", "Polygon", None),
        ("near;maxDistance==10", None, "[1,2]"),
        (None, "Point", "[1,2]"),
    ],
)
def test_parse_rejects_partial_geo_query(georel, geometry, coordinates):
    with pytest.raises(BadRequestData) as exc:
        parse_geoq(georel, geometry, coordinates, None, expand)
    assert "missing" in exc.value.detail


def test_parse_url_string_coordinates_and_default_geoproperty():
    g = q("near;maxDistance==2000", "Point", "[8.0,40.0]")
    assert g.georel == "near"
    assert g.max_distance == 2000.0 and g.min_distance is None
    assert g.geometry == "Point" and g.coordinates == [8.0, 40.0]
    assert g.geoproperty == DEFAULT_GEOPROPERTY == CORE + "location"


def test_parse_json_list_coordinates_and_expanded_geoproperty():
    g = q("within", "Polygon", box_coords(0, 0, 1, 1), "observationSpace")
    assert g.georel == "within" and g.max_distance is None and g.min_distance is None
    assert g.coordinates == box_coords(0, 0, 1, 1)
    assert g.geoproperty == CORE + "observationSpace"
    assert q("within", "Polygon", box_coords(0, 0, 1, 1), "myArea").geoproperty == "https://example.org/myArea"


def test_parse_min_distance_and_both_modifiers():
    g = q("near;minDistance==100", "Point", "[8,40]")
    assert (g.min_distance, g.max_distance) == (100.0, None)
    g = q("near;minDistance==100;maxDistance==2000.5", "Point", "[8,40]")
    assert (g.min_distance, g.max_distance) == (100.0, 2000.5)


@pytest.mark.parametrize("georel", ["within", "contains", "intersects", "equals", "disjoint", "overlaps"])
def test_parse_accepts_every_plain_georel(georel):
    assert q(georel, "Polygon", box_coords(0, 0, 1, 1)).georel == georel


def test_parse_normalises_geometry_name_case():
    assert q("intersects", "linestring", "[[0,0],[1,1]]").geometry == "LineString"


def test_as_dict_round_trips():
    g = q("near;maxDistance==2000", "Point", "[8.0,40.0]", "location")
    d = g.as_dict()
    assert d == {"georel": "near;maxDistance==2000", "geometry": "Point", "coordinates": [8.0, 40.0],
                 "geoproperty": CORE + "location"}
    g2 = parse_geoq(d["georel"], d["geometry"], d["coordinates"], d["geoproperty"], expand)
    assert g2.as_dict() == d


@pytest.mark.parametrize(
    "georel,geometry,coordinates,fragment",
    [
        ("nearby;maxDistance==10", "Point", "[1,2]", "Unknown georel"),
        ("coveredBy", "Point", "[1,2]", "Unknown georel"),
        ("WITHIN", "Polygon", box_coords(0, 0, 1, 1), "Unknown georel"),
        ("", "Point", "[1,2]", "georel"),
        ("near", "Point", "[1,2]", "requires maxDistance"),
        ("near;", "Point", "[1,2]", "modifier"),
        ("near;maxDistance=2000", "Point", "[1,2]", "modifier"),
        ("near;maxDistance:2000", "Point", "[1,2]", "modifier"),
        ("near;maxDistance==abc", "Point", "[1,2]", "number"),
        ("near;maxDistance==-5", "Point", "[1,2]", "non-negative"),
        ("near;maxDistance==nan", "Point", "[1,2]", "finite"),
        ("near;maxDistance==inf", "Point", "[1,2]", "finite"),
        ("near;radius==10", "Point", "[1,2]", "Unknown near modifier"),
        ("near;maxDistance==10;maxDistance==20", "Point", "[1,2]", "Duplicate"),
        ("near;minDistance==10;minDistance==20", "Point", "[1,2]", "Duplicate"),
        ("near;minDistance==200;maxDistance==100", "Point", "[1,2]", "greater"),
        ("within;maxDistance==10", "Polygon", box_coords(0, 0, 1, 1), "no modifier"),
        ("intersects;minDistance==10", "Point", "[1,2]", "no modifier"),
        ("within", "Circle", "[1,2]", "geometry"),
        ("within", "GeometryCollection", "[]", "geometry"),
        ("within", "", "[1,2]", "geometry"),
        ("intersects", "Point", "[8.0,", "JSON"),
        ("intersects", "Point", "8.0,40.0", "JSON"),
        ("intersects", "Point", '{"a":1}', "JSON array"),
        ("intersects", "Point", 42, "JSON array"),
        ("intersects", "Point", "[[8,40]]", "coordinates"),
        ("intersects", "Point", "[200,40]", "longitude"),
        ("intersects", "Point", "[8,95]", "latitude"),
        ("intersects", "LineString", "[[8,40]]", "at least 2"),
        ("within", "Polygon", "[[[0,0],[1,0],[1,1],[0,1]]]", "closed"),
        ("within", "Polygon", "[[[0,0],[1,0],[0,0]]]", "at least 4"),
        ("within", "MultiPoint", "[]", "empty"),
    ],
)
def test_parse_errors(georel, geometry, coordinates, fragment):
    with pytest.raises(BadRequestData) as exc:
        parse_geoq(georel, geometry, coordinates, None, expand)
    assert fragment in exc.value.detail


def test_parse_rejects_empty_geoproperty():
    with pytest.raises(BadRequestData):
        parse_geoq("within", "Polygon", box_coords(0, 0, 1, 1), "  ", expand)


def test_geoquery_constructor_validates_too():
    with pytest.raises(BadRequestData):
        GeoQuery("near", "Point", [1, 2])
    with pytest.raises(BadRequestData):
        GeoQuery("within", "Point", [1, 2], max_distance=3)
    with pytest.raises(BadRequestData):
        GeoQuery("within", "Point", [1, 200])
    assert GeoQuery("within", "Polygon", box_coords(0, 0, 1, 1)).geoproperty == DEFAULT_GEOPROPERTY


# ----------------------------------------------------------------------------- georels

SQUARE = box_coords(0, 0, 10, 10)


def test_within_stored_geometry_within_query_geometry():
    g = q("within", "Polygon", SQUARE)
    assert g.matches(point(5, 5))
    assert g.matches(box(1, 1, 2, 2))
    assert g.matches({"type": "LineString", "coordinates": [[1, 1], [9, 9]]})
    assert not g.matches(point(15, 5))
    assert not g.matches(point(10, 5))  # on the boundary: not within (no interior point in common)
    assert not g.matches(box(5, 5, 15, 15))  # partly outside
    assert not g.matches(box(-1, -1, 11, 11))  # the stored geometry contains the query, not within it
    assert g.index_bbox() == (0.0, 0.0, 10.0, 10.0)


def test_contains_stored_geometry_contains_query_geometry():
    g = q("contains", "Point", "[5,5]")
    assert g.matches(box(0, 0, 10, 10))
    assert g.matches({"type": "MultiPolygon", "coordinates": [box_coords(20, 20, 21, 21), SQUARE]})
    assert g.matches(point(5, 5))  # a point contains itself
    assert not g.matches(box(6, 6, 10, 10))
    assert not g.matches(point(5, 6))
    g = q("contains", "Polygon", box_coords(2, 2, 3, 3))
    assert g.matches(box(0, 0, 10, 10))
    assert not g.matches(box(2.5, 2.5, 10, 10))
    assert not g.matches(point(2.5, 2.5))  # stored within query is not contains
    assert g.index_bbox() == (2.0, 2.0, 3.0, 3.0)


def test_intersects():
    g = q("intersects", "Polygon", SQUARE)
    assert g.matches({"type": "LineString", "coordinates": [[-5, 5], [15, 5]]})
    assert g.matches(point(10, 10))  # touching the boundary intersects
    assert g.matches(box(10, 0, 20, 10))  # shared edge
    assert g.matches(point(3, 3))
    assert not g.matches(point(10.0001, 5))
    assert not g.matches({"type": "LineString", "coordinates": [[11, 0], [11, 10]]})
    gc = {"type": "GeometryCollection", "geometries": [point(50, 50), point(5, 5)]}
    assert g.matches(gc)


def test_equals_is_topological_equality():
    g = q("equals", "Polygon", SQUARE)
    assert g.matches(box(0, 0, 10, 10))
    rotated = {"type": "Polygon", "coordinates": [[[10, 10], [0, 10], [0, 0], [10, 0], [10, 10]]]}
    assert g.matches(rotated)  # same point set, other start vertex and orientation
    assert not g.matches(box(0, 0, 10, 11))
    assert not g.matches(point(5, 5))
    gp = q("equals", "Point", "[8,40]")
    assert gp.matches(point(8, 40))
    assert gp.matches({"type": "Point", "coordinates": [8, 40, 12]})  # altitude ignored (2D predicates)
    assert not gp.matches(point(8, 40.000001))
    assert gp.index_bbox() == (8.0, 40.0, 8.0, 40.0)


def test_disjoint():
    g = q("disjoint", "Polygon", SQUARE)
    assert g.matches(point(20, 20))
    assert g.matches(box(11, 11, 12, 12))
    assert not g.matches(point(5, 5))
    assert not g.matches(point(10, 5))  # boundary contact is not disjoint
    assert not g.matches(box(9, 9, 12, 12))
    assert g.index_bbox() is None


def test_overlaps_requires_same_dimension_and_partial_overlap():
    g = q("overlaps", "Polygon", SQUARE)
    assert g.matches(box(5, 5, 15, 15))
    assert not g.matches(box(2, 2, 3, 3))  # contained, not overlapping
    assert not g.matches(box(-1, -1, 11, 11))  # containing, not overlapping
    assert not g.matches(box(10, 0, 20, 10))  # touching only
    assert not g.matches(box(20, 20, 30, 30))
    assert not g.matches(point(5, 5))  # different dimension
    gl = q("overlaps", "LineString", "[[0,0],[10,0]]")
    assert gl.matches({"type": "LineString", "coordinates": [[5, 0], [15, 0]]})
    assert not gl.matches({"type": "LineString", "coordinates": [[5, -5], [5, 5]]})  # crosses, not overlaps


def test_multi_geometries_as_query():
    g = q("within", "MultiPolygon", [box_coords(0, 0, 1, 1), box_coords(10, 10, 11, 11)])
    assert g.matches(point(0.5, 0.5))
    assert g.matches(point(10.5, 10.5))
    assert not g.matches(point(5, 5))
    assert g.index_bbox() == (0.0, 0.0, 11.0, 11.0)
    g = q("intersects", "MultiPoint", "[[1,1],[5,5]]")
    assert g.matches(box(4, 4, 6, 6))
    assert not g.matches(box(2, 2, 3, 3))
    g = q("intersects", "MultiLineString", "[[[0,0],[1,1]],[[5,0],[5,10]]]")
    assert g.matches({"type": "LineString", "coordinates": [[4, 5], [6, 5]]})
    assert not g.matches({"type": "LineString", "coordinates": [[2, 5], [3, 5]]})


def test_matches_returns_false_for_garbage_stored_values():
    g = q("intersects", "Polygon", SQUARE)
    assert g.matches({"type": "Nope"}) is False
    assert g.matches({"type": "Point"}) is False


def test_invalid_stored_polygon_does_not_crash():
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]}
    validate_geojson(bowtie)  # structurally valid GeoJSON, topologically invalid
    assert q("intersects", "Point", "[1,2]").matches(bowtie) is True
    assert q("disjoint", "Point", "[20,20]").matches(bowtie) is True
    assert isinstance(q("overlaps", "Polygon", box_coords(1, 1, 5, 5)).matches(bowtie), bool)


# ----------------------------------------------------------------------------- near / distances


def rel_close(value, expected, tol=0.005):
    return abs(value - expected) <= tol * expected


def test_haversine_known_values():
    assert rel_close(haversine_m(*SEOUL, *BUSAN), 325_000)
    assert rel_close(haversine_m(*PARIS, *LONDON), 343_500)
    assert rel_close(haversine_m(0, 0, 1, 0), 111_195, 1e-4)
    assert haversine_m(10, 20, 10, 20) == 0.0
    assert rel_close(haversine_m(0, 0, 180, 0), math.pi * EARTH_RADIUS_M, 1e-9)


def test_near_point_to_point_distance_seoul_busan():
    g = q("near;maxDistance==330000", "Point", [SEOUL[0], SEOUL[1]])
    d = g.distance(point(*BUSAN))
    assert rel_close(d, 325_000)
    assert g.matches(point(*BUSAN))
    assert not q("near;maxDistance==320000", "Point", [SEOUL[0], SEOUL[1]]).matches(point(*BUSAN))
    assert q("near;minDistance==320000", "Point", [SEOUL[0], SEOUL[1]]).matches(point(*BUSAN))
    assert not q("near;minDistance==330000", "Point", [SEOUL[0], SEOUL[1]]).matches(point(*BUSAN))


def test_near_ordering_nearest_first():
    g = q("near;maxDistance==1000000", "Point", [PARIS[0], PARIS[1]])
    stored = {
        "london": point(*LONDON),  # ~343.5 km
        "brussels": point(4.3517, 50.8503),  # ~264 km
        "lyon": point(4.8357, 45.7640),  # ~392 km
        "versailles": point(2.1301, 48.8049),  # ~17 km
        "paris": point(*PARIS),
    }
    ranked = sorted(stored, key=lambda k: g.distance(stored[k]))
    assert ranked == ["paris", "versailles", "brussels", "london", "lyon"]
    assert g.distance(stored["paris"]) == 0.0
    assert rel_close(g.distance(stored["london"]), 343_500)
    assert rel_close(g.distance(stored["brussels"]), 264_000)
    assert rel_close(g.distance(stored["lyon"]), 392_000)


def test_near_point_to_linestring_and_polygon():
    g = q("near;maxDistance==200000", "Point", "[0,1]")
    equator = {"type": "LineString", "coordinates": [[-1, 0], [1, 0]]}
    assert rel_close(g.distance(equator), M_PER_DEG)  # nearest point (0,0), 1 degree of meridian
    g2 = q("near;maxDistance==200000", "Point", "[0,2]")
    assert rel_close(g2.distance(box(-1, -1, 1, 1)), M_PER_DEG)  # top edge, lat 1
    g3 = q("near;maxDistance==200000", "Point", "[10,61]")
    parallel = {"type": "LineString", "coordinates": [[9, 60], [11, 60]]}
    assert rel_close(g3.distance(parallel), M_PER_DEG)
    g4 = q("near;maxDistance==200000", "Point", "[0,0]")
    diagonal = {"type": "LineString", "coordinates": [[1, 1], [2, 2]]}
    assert rel_close(g4.distance(diagonal), haversine_m(0, 0, 1, 1))
    assert g.matches(equator) and g2.matches(box(-1, -1, 1, 1))
    assert not q("near;maxDistance==100000", "Point", "[0,1]").matches(equator)


def test_near_long_segment_uses_densified_geometry():
    # A 20-degree edge along the parallel at lat 50; from a point 1 degree north of its middle.
    g = q("near;maxDistance==500000", "Point", "[10,51]")
    edge = {"type": "LineString", "coordinates": [[0, 50], [20, 50]]}
    assert rel_close(g.distance(edge), M_PER_DEG, 0.002)


def test_near_zero_inside_or_touching():
    g = q("near;maxDistance==1", "Point", "[5,5]")
    assert g.distance(box(0, 0, 10, 10)) == 0.0
    assert g.matches(box(0, 0, 10, 10))
    gpoly = q("near;maxDistance==10", "Polygon", SQUARE)
    assert gpoly.distance(point(5, 5)) == 0.0
    assert gpoly.matches(point(5, 5))


def test_near_polygon_query_to_point():
    gpoly = q("near;maxDistance==120000", "Polygon", box_coords(0, 0, 1, 1))
    d = gpoly.distance(point(0.5, 2))  # 1 degree north of the top edge
    assert rel_close(d, M_PER_DEG)
    assert gpoly.matches(point(0.5, 2))
    assert not gpoly.matches(point(0.5, 3))


def test_near_multipoint_query_uses_nearest_member():
    g = q("near;maxDistance==5000", "MultiPoint", "[[0,0],[10,10]]")
    assert rel_close(g.distance(point(10, 10.01)), 0.01 * M_PER_DEG, 1e-3)
    assert g.matches(point(10, 10.01))
    assert not g.matches(point(5, 5))


def test_near_distance_across_antimeridian():
    g = q("near;maxDistance==30000", "Point", "[179.9,0]")
    assert rel_close(g.distance(point(-179.9, 0)), 0.2 * M_PER_DEG, 1e-4)
    assert g.matches(point(-179.9, 0))
    far_side = box(-180, -1, -179.5, 1)
    assert rel_close(g.distance(far_side), 0.1 * M_PER_DEG)
    assert g.matches(far_side)
    bbox = g.index_bbox()
    assert bbox[0] == -180.0 and bbox[2] == 180.0  # the padded box wraps: full longitude range


def test_near_min_distance_has_no_prefilter():
    g = q("near;minDistance==100", "Point", "[8,40]")
    assert g.index_bbox() is None
    assert g.matches(point(9, 40))
    assert not g.matches(point(8, 40.0001))  # ~11 m away


def test_near_annulus_with_both_modifiers():
    g = q("near;minDistance==1000;maxDistance==5000", "Point", "[8,40]")
    assert g.index_bbox() is not None
    assert not g.matches(point(8, 40.001))  # ~111 m
    assert g.matches(point(8, 40.02))  # ~2.2 km
    assert not g.matches(point(8, 40.1))  # ~11 km


# ----------------------------------------------------------------------------- index_bbox


@pytest.mark.parametrize("lat", [0.0, 37.5665, 45.0, -60.0, 70.0, 80.0, -85.0])
@pytest.mark.parametrize("metres", [1.0, 100.0, 2000.0, 50_000.0, 300_000.0])
def test_near_index_bbox_contains_every_point_at_max_distance(lat, metres):
    lon = 8.0
    g = q(f"near;maxDistance=={metres}", "Point", [lon, lat])
    bbox = g.index_bbox()
    for bearing in range(0, 360, 5):
        plon, plat = destination(lon, lat, bearing, metres)
        assert in_bbox(bbox, plon, plat), (bearing, plon, plat, bbox)
        # the exact test agrees with the prefilter at the boundary (maxDistance is inclusive)
        assert g.matches(point(plon, plat))
        assert rel_close(g.distance(point(plon, plat)), metres, 1e-6)


def test_near_index_bbox_is_tight_away_from_poles():
    g = q("near;maxDistance==2000", "Point", "[8,40]")
    b = g.index_bbox()
    lat_pad = 2000 / M_PER_DEG
    lon_pad = lat_pad / math.cos(math.radians(40))
    assert b[1] == pytest.approx(40 - lat_pad, rel=0, abs=lat_pad * 0.02)
    assert b[3] == pytest.approx(40 + lat_pad, rel=0, abs=lat_pad * 0.02)
    assert b[0] == pytest.approx(8 - lon_pad, rel=0, abs=lon_pad * 0.02)
    assert b[2] == pytest.approx(8 + lon_pad, rel=0, abs=lon_pad * 0.02)


def test_near_index_bbox_polygon_query_pads_the_query_bbox():
    g = q("near;maxDistance==10000", "Polygon", box_coords(0, 60, 1, 61))
    b = g.index_bbox()
    for bearing in range(0, 360, 10):
        for corner in [(0, 60), (1, 60), (0, 61), (1, 61)]:
            assert in_bbox(b, *destination(*corner, bearing, 10_000))


def test_near_index_bbox_near_pole_takes_full_longitude():
    g = q("near;maxDistance==5000", "Point", "[8,89.99]")
    b = g.index_bbox()
    assert (b[0], b[2]) == (-180.0, 180.0)
    assert b[3] == 90.0
    for bearing in range(0, 360, 15):
        assert in_bbox(b, *destination(8, 89.99, bearing, 5000))


def test_near_index_bbox_clamps_latitude():
    b = q("near;maxDistance==300000", "Point", "[8,-89]").index_bbox()
    assert b[1] == -90.0 and (b[0], b[2]) == (-180.0, 180.0)


def test_near_index_bbox_near_antimeridian_takes_full_longitude():
    b = q("near;maxDistance==20000", "Point", "[-179.95,10]").index_bbox()
    assert (b[0], b[2]) == (-180.0, 180.0)
    assert -90 < b[1] < 10 < b[3] < 90
    b2 = q("near;maxDistance==20000", "Point", "[-179.5,10]").index_bbox()
    assert b2[0] > -180.0  # 20 km does not reach the antimeridian from 0.5 degree away


def test_index_bbox_of_predicates_is_the_query_bbox():
    for rel in ("within", "contains", "intersects", "equals", "overlaps"):
        assert q(rel, "LineString", "[[1,2],[3,-4]]").index_bbox() == (1.0, -4.0, 3.0, 2.0)


# ----------------------------------------------------------------------------- cost


def test_many_candidates_match_as_their_coordinates_say():
    g = q("near;maxDistance==50000", "Point", "[8,40]")
    gw = q("within", "Polygon", box_coords(7, 39, 9, 41))
    candidates = [point(7 + (i % 50) / 25, 39 + (i // 50) / 25) for i in range(2000)]
    near_hits = sum(g.matches(c) for c in candidates)
    within_hits = sum(gw.matches(c) for c in candidates)
    ordered = sorted(candidates, key=g.distance)
    assert near_hits == sum(1 for c in candidates if haversine_m(8, 40, *c["coordinates"]) <= 50000)
    assert 0 < near_hits < len(candidates)
    assert within_hits == sum(1 for c in candidates if 7 < c["coordinates"][0] < 9 and 39 < c["coordinates"][1] < 41)
    assert g.distance(ordered[0]) <= g.distance(ordered[-1])


@pytest.mark.parametrize("georel, geometry, coordinates", [
    ("near;maxDistance==2000", "Point", "[129.0756,35.1796]"),
    ("near;minDistance==2000", "Point", "[129.0756,35.1796]"),
    ("near;maxDistance==3000;minDistance==1000", "Point", "[129.0756,35.1796]"),
    ("near;maxDistance==2000", "LineString", "[[129.07,35.17],[129.09,35.19]]"),
    ("within", "Polygon", "[[[129.06,35.17],[129.09,35.17],[129.09,35.19],[129.06,35.19],[129.06,35.17]]]"),
    ("intersects", "Polygon", "[[[129.06,35.17],[129.09,35.17],[129.075,35.19],[129.06,35.17]]]"),
    ("disjoint", "Polygon", "[[[129.06,35.17],[129.09,35.17],[129.09,35.19],[129.06,35.19],[129.06,35.17]]]"),
    ("equals", "Point", "[129.0756,35.1796]"),
    ("contains", "Point", "[129.0756,35.1796]"),
    ("overlaps", "Polygon", "[[[129.06,35.17],[129.09,35.17],[129.09,35.19],[129.06,35.19],[129.06,35.17]]]"),
])
def test_a_stored_point_matches_as_the_same_point_in_shapely_does(georel, geometry, coordinates):
    """Points are settled by a bbox check and haversine without shapely; a one-point MultiPoint takes the
    shapely route, and both must agree everywhere, on the query's own vertices and box edges included."""
    g = q(georel, geometry, coordinates)
    lons = [129.0756, 129.06, 129.09, 129.07, 129.075] + [129.05 + i * 0.0025 for i in range(21)]
    lats = [35.1796, 35.17, 35.19, 35.18] + [35.16 + i * 0.002 for i in range(21)]
    hits = 0
    for lon in lons:
        for lat in lats:
            fast = g.matches(point(lon, lat))
            assert fast == g.matches({"type": "MultiPoint", "coordinates": [[lon, lat]]}), (lon, lat)
            hits += fast
    assert 0 < hits < len(lons) * len(lats) or georel in ("equals", "contains", "overlaps")
    assert g.matches(point(129.0756, 35.1796)) == (georel not in ("near;minDistance==2000", "disjoint", "overlaps",
                                                                    "near;maxDistance==3000;minDistance==1000"))
