from audience_pipeline.cursor import Cursor, object_digest, plan_tick
from audience_pipeline.sources.base import SourceObject

S = 1_000_000_000


def obj(key, t, version="v1"):
    return SourceObject(key=key, size=1, arrived_ns=t * S, version=version, uri=f"file:///{key}")


def test_same_second_objects_are_found_and_not_repeated():
    c0 = Cursor()
    p1 = plan_tick([obj("a", 10)], c0, lookback_ns=S, max_new=10)
    assert [o.key for o in p1.new] == ["a"]
    p2 = plan_tick([obj("a", 10), obj("b", 10)], p1.cursor, lookback_ns=0, max_new=10)
    assert [o.key for o in p2.new] == ["b"]
    p3 = plan_tick([obj("a", 10), obj("b", 10)], Cursor.loads(p2.cursor.dumps()), lookback_ns=0, max_new=10)
    assert p3.new == []


def test_rewritten_key_is_new_and_old_edge_entries_are_dropped():
    p1 = plan_tick([obj("a", 10)], Cursor(), lookback_ns=S, max_new=10)
    p2 = plan_tick([obj("a", 10, "v2")], p1.cursor, lookback_ns=S, max_new=10)
    assert [o.version for o in p2.new] == ["v2"]
    p3 = plan_tick([obj("a", 10, "v2"), obj("z", 100)], p2.cursor, lookback_ns=S, max_new=10)
    assert [o.key for o in p3.new] == ["z"]
    assert len(p3.cursor.edge) == 1  # only the look-back window is kept
    assert p3.cursor.edge == {object_digest(obj("z", 100)): 100 * S}


def test_max_new_carries_the_rest_including_ties():
    objects = [obj(f"k{i}", 5) for i in range(5)]
    p1 = plan_tick(objects, Cursor(), lookback_ns=0, max_new=2)
    assert p1.backlog == 3
    p2 = plan_tick(objects, p1.cursor, lookback_ns=0, max_new=2)
    p3 = plan_tick(objects, p2.cursor, lookback_ns=0, max_new=2)
    keys = [o.key for p in (p1, p2, p3) for o in p.new]
    assert sorted(keys) == [f"k{i}" for i in range(5)]


def test_deleted_objects_are_ignored():
    p1 = plan_tick([obj("a", 1), obj("b", 2)], Cursor(), lookback_ns=S, max_new=10)
    p2 = plan_tick([obj("b", 2)], p1.cursor, lookback_ns=S, max_new=10)
    assert p2.new == [] and p2.cursor.hwm_ns == p1.cursor.hwm_ns
