"""Unit tests of middleware.subscriptions.matcher: which attributes a change creates, updates or deletes (5.8.6)."""
from __future__ import annotations

from middleware.subscriptions.matcher import attribute_changes

P = "https://example.org/"


def prop(value, at="2024-05-01T12:00:00Z", **sub):
    inst = {"type": "Property", "value": value, "createdAt": "2024-01-01T00:00:00Z", "modifiedAt": at}
    for name, sub_value in sub.items():
        inst[P + name] = {"type": "Property", "value": sub_value, "createdAt": "2024-01-01T00:00:00Z", "modifiedAt": at}
    return inst


def entity(**attrs):
    return {"id": "urn:ngsi-ld:X:1", "type": [P + "X"], "attrs": {P + k: v if isinstance(v, list) else [v]
                                                                  for k, v in attrs.items()}}


def test_new_times_alone_are_no_update_at_any_depth():
    old = entity(pm10=prop(5, quality=1), pm25=prop(3))
    new = entity(pm10=prop(5, at="2024-05-01T13:00:00Z", quality=1), pm25=prop(3, at="2024-05-01T13:00:00Z"))
    assert attribute_changes(old, new) == (set(), set(), set())


def test_a_changed_value_sub_property_or_member_is_an_update():
    old = entity(a=prop(5), b=prop(5, quality=1), c=prop(5), d=prop(5), e=[prop(1), prop(2)])
    changed_member = dict(prop(5), unitCode="GQ")
    new = entity(a=prop(6), b=prop(5, quality=2), c=changed_member, d=prop(5), e=[prop(1)])
    assert attribute_changes(old, new) == (set(), {P + "a", P + "b", P + "c", P + "e"}, set())
    assert attribute_changes(new, old) == (set(), {P + "a", P + "b", P + "c", P + "e"}, set())


def test_created_and_deleted_are_always_found_and_compared_limits_updates():
    old = entity(a=prop(1), b=prop(1), gone=prop(1))
    new = entity(a=prop(2), b=prop(2), fresh=prop(1))
    assert attribute_changes(old, new, frozenset({P + "a"})) == ({P + "fresh"}, {P + "a"}, {P + "gone"})
    assert attribute_changes(None, new) == ({P + "a", P + "b", P + "fresh"}, set(), set())
    assert attribute_changes(old, None) == (set(), set(), {P + "a", P + "b", P + "gone"})
