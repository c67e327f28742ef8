"""mediarithmics: which audience a line is for (segments map, ids vs technical names) and who it is about
without a registry (identifier types kept in the user id, collision-free), issue 12 parts 1 and 2."""

import json
from datetime import UTC, datetime

import duckdb
import polars as pl
import pytest

from audience_pipeline.config import ConfigError, load_workspace
from audience_pipeline.formats import mediarithmics
from audience_pipeline_tests.conftest import base_config

MAP = "maps/segments.csv"


def ndjson(*commands) -> str:
    return "".join(json.dumps({"expiration_duration": 0, **c}) + "\n" for c in commands)


def mics_config(**options) -> dict:
    config = base_config()
    config["feeds"] = {"mics": {"format": "mediarithmics", "source": "drop/mics", "max_reject_ratio": 0.9,
                                **options}}
    return config


@pytest.fixture
def mapped(make_env):
    """A feed without a registry whose segments map is a relative path, resolved against the workspace."""
    env = make_env(mics_config(segments=MAP))
    (env.root / "maps").mkdir()
    (env.root / MAP).write_text("segment_id,technical_name\n123,vip\n456,gold\n")
    return env


@pytest.fixture
def plain(make_env):
    return make_env(mics_config())


def audience_names(env) -> list[str]:
    return [r[0] for r in env.query("SELECT name FROM audiences ORDER BY name")]


def rejects(env, record) -> list[tuple]:
    return env.query("SELECT line_number, reason FROM rejected_rows WHERE import_id = ? ORDER BY 1",
                     [record.import_id])


def test_a_delete_by_segment_id_removes_from_the_segment_added_by_technical_name(mapped):
    """The issue's example: u1 added to `vip`, then DELETE by segment_id 123, which the map says is vip."""
    added = mapped.import_file("add.ndjson", ndjson(
        {"operation": "UPDATE", "user_account_id": "u1", "segment_technical_name": "vip"}), feed="mics")
    assert added.status == "succeeded" and mapped.members("vip") == {"u1"}

    deleted = mapped.import_file("del.ndjson", ndjson(
        {"operation": "DELETE", "user_account_id": "u1", "segment_id": "123"}), feed="mics")
    assert (deleted.status, deleted.disqualified, deleted.noops) == ("succeeded", 1, 0)
    assert mapped.members("vip") == set()
    assert mapped.events("vip") == [(added.import_id, "qualify", "u1"), (deleted.import_id, "disqualify", "u1")]
    assert audience_names(mapped) == ["vip"]  # no audience `123` nor `segment_id:123`


def test_id_name_and_both_resolve_to_one_audience_and_a_contradiction_is_a_mismatch(mapped):
    record = mapped.import_file("mixed.ndjson", ndjson(
        {"operation": "UPDATE", "user_account_id": "a", "segment_id": "456"},
        {"operation": "UPDATE", "user_account_id": "b", "segment_technical_name": "gold"},
        {"operation": "UPDATE", "user_account_id": "c", "segment_id": " 456 ", "segment_technical_name": "gold"},
        # the map pairs 123 with vip, not gold
        {"operation": "UPDATE", "user_account_id": "d", "segment_id": "123", "segment_technical_name": "gold"},
        # the map pairs gold with 456, not 999 (an id it does not know)
        {"operation": "UPDATE", "user_account_id": "e", "segment_id": "999", "segment_technical_name": "gold"},
        # neither is in the map: the line's technical name names the audience
        {"operation": "UPDATE", "user_account_id": "f", "segment_id": "998", "segment_technical_name": "fresh"},
        # the map pairs 123 with vip, not with a name it does not know
        {"operation": "UPDATE", "user_account_id": "g", "segment_id": "123", "segment_technical_name": "other"},
    ), feed="mics")
    assert record.status == "succeeded"
    assert mapped.members("gold") == {"a", "b", "c"}
    assert mapped.members("fresh") == {"f"}
    assert rejects(mapped, record) == [(4, "segment_mismatch"), (5, "segment_mismatch"), (7, "segment_mismatch")]
    assert audience_names(mapped) == ["fresh", "gold"]


def test_a_brand_new_segment_by_id_only_is_accepted_under_its_id(mapped):
    record = mapped.import_file("new.ndjson", ndjson(
        {"operation": "UPDATE", "user_account_id": "u1", "segment_id": 777},
        {"operation": "UPDATE", "user_account_id": "u2", "segment_id": "777"},
    ), feed="mics")
    assert (record.status, record.rows_rejected) == ("succeeded", 0)
    assert mapped.members("segment_id:777") == {"u1", "u2"}
    assert audience_names(mapped) == ["segment_id:777"]


def test_the_csv_form_resolves_through_the_map_too(mapped):
    text = "operation,expiration_duration,user_account_id,segment_id,segment_technical_name\n" \
           "UPDATE,0,u1,123,\nUPDATE,0,u2,,vip\nUPDATE,0,u3,456,vip\n"
    record = mapped.import_file("cmds.csv", text, feed="mics")
    assert mapped.members("vip") == {"u1", "u2"}
    assert rejects(mapped, record) == [(4, "segment_mismatch")]


def test_a_parquet_map_with_integer_ids(make_env):
    env = make_env(mics_config(segments="segments.parquet"))
    pl.DataFrame({"segment_id": [123, 456], "technical_name": ["vip", "gold"]}).write_parquet(
        env.root / "segments.parquet")
    env.import_file("p.ndjson", ndjson({"operation": "UPDATE", "user_account_id": "u1", "segment_id": 456}),
                    feed="mics")
    assert env.members("gold") == {"u1"} and audience_names(env) == ["gold"]


def test_without_a_map_ids_and_technical_names_never_merge(plain):
    record = plain.import_file("nomap.ndjson", ndjson(
        {"operation": "UPDATE", "user_account_id": "u1", "segment_technical_name": "vip"},
        # an id that happens to equal another segment's technical name
        {"operation": "UPDATE", "user_account_id": "u2", "segment_id": "vip"},
        {"operation": "UPDATE", "user_account_id": "u3", "segment_id": "123"},
        # a technical name written like an id-named audience would pass for segment 123
        {"operation": "UPDATE", "user_account_id": "u4", "segment_technical_name": "segment_id:123"},
        # both: the technical name names the audience
        {"operation": "UPDATE", "user_account_id": "u5", "segment_id": "123", "segment_technical_name": "vip"},
    ), feed="mics")
    assert plain.members("vip") == {"u1", "u5"}
    assert plain.members("segment_id:vip") == {"u2"}
    assert plain.members("segment_id:123") == {"u3"}
    assert rejects(plain, record) == [(4, "segment_name_reserved")]
    assert audience_names(plain) == ["segment_id:123", "segment_id:vip", "vip"]


@pytest.mark.parametrize(("content", "expected"), [
    ("segment_id,technical_name\n1,vip\n2,gold\n1,silver\n",
     "segment_id '1' has two technical_names, 'vip' (line 2) and 'silver' (line 4)"),
    ("segment_id,technical_name\n1,vip\n2,gold\n3,vip\n",
     "technical_name 'vip' has two segment_ids, '1' (line 2) and '3' (line 4)"),
    ("id,name\n1,vip\n", "lacks the column(s) segment_id, technical_name (it has: id, name)"),
    ("segment_id,technical_name\n1,vip\n2,\n", "line 3: no technical_name"),
    ("segment_id,technical_name\n1,segment_id:2\n", "line 2: technical_name 'segment_id:2' starts with"),
    (b"segment_id,technical_name\n1,v\xffip\n", "cannot be read"),
    (None, "cannot be read"),
])
def test_an_inconsistent_or_unreadable_map_refuses_the_file_and_changes_nothing(mapped, content, expected):
    before = mapped.import_file("first.ndjson", ndjson(
        {"operation": "UPDATE", "user_account_id": "u1", "segment_id": "123"}), feed="mics")
    assert before.status == "succeeded" and mapped.members("vip") == {"u1"}
    map_path = mapped.root / MAP
    if content is None:
        map_path.unlink()
    else:
        map_path.write_bytes(content.encode() if isinstance(content, str) else content)

    record = mapped.import_file("second.ndjson", ndjson(
        {"operation": "DELETE", "user_account_id": "u1", "segment_technical_name": "vip"},
        {"operation": "UPDATE", "user_account_id": "u2", "segment_technical_name": "vip"}), feed="mics")
    assert record.status == "failed"
    assert record.error.startswith(f"second.ndjson: the segments map {map_path}")
    assert expected in record.error
    assert mapped.members("vip") == {"u1"}
    assert mapped.query("SELECT count(*) FROM membership_events WHERE import_id = ?", [record.import_id]) == [(0,)]


def test_identifier_types_are_two_members_not_a_duplicate(plain):
    record = plain.import_file("types.ndjson", ndjson(
        {"operation": "UPDATE", "user_agent_id": "u9", "segment_technical_name": "s"},
        {"operation": "UPDATE", "user_account_id": "u9", "segment_technical_name": "s"},
        {"operation": "UPDATE", "email_hash": "ABC", "segment_technical_name": "s"},
        {"operation": "UPDATE", "compartment_id": "c9", "user_account_id": "u9", "segment_technical_name": "s"},
    ), feed="mics")
    assert (record.status, record.qualified, record.duplicates) == ("succeeded", 4, 0)
    assert plain.members("s") == {"u9", "user_agent_id:u9", "email_hash:ABC", "c9:u9"}

    # a later DELETE by the same type and value finds its member, and only that one
    record = plain.import_file("del.ndjson", ndjson(
        {"operation": "DELETE", "user_agent_id": "u9", "segment_technical_name": "s"}), feed="mics")
    assert record.disqualified == 1
    assert plain.members("s") == {"u9", "email_hash:ABC", "c9:u9"}


def test_compartment_accounts_and_crafted_values_cannot_collide(plain):
    record = plain.import_file("crafted.ndjson", ndjson(
        {"operation": "UPDATE", "user_agent_id": "u9", "segment_technical_name": "s"},
        # a compartment named like a type: its account id would read as `user_agent_id:u9`
        {"operation": "UPDATE", "compartment_id": "user_agent_id", "user_account_id": "u9",
         "segment_technical_name": "s"},
        # the same text as a bare account id, then values that already look escaped
        {"operation": "UPDATE", "user_account_id": "email_hash:u9", "segment_technical_name": "s"},
        {"operation": "UPDATE", "email_hash": "u9", "segment_technical_name": "s"},
        {"operation": "UPDATE", "user_account_id": "\\email_hash:u9", "segment_technical_name": "s"},
        {"operation": "UPDATE", "user_account_id": "\\", "segment_technical_name": "s"},
        {"operation": "UPDATE", "user_agent_id": "\\", "segment_technical_name": "s"},
        # a colon elsewhere needs no escape
        {"operation": "UPDATE", "compartment_id": "c9", "user_account_id": "acc:1", "segment_technical_name": "s"},
    ), feed="mics")
    assert (record.status, record.qualified, record.duplicates) == ("succeeded", 8, 0)
    assert plain.members("s") == {
        "user_agent_id:u9", "\\user_agent_id:u9", "\\email_hash:u9", "email_hash:u9", "\\\\email_hash:u9",
        "\\\\", "user_agent_id:\\", "c9:acc:1"}


def test_the_primary_identifier_type_is_the_bare_one(make_env):
    env = make_env(mics_config(primary_identifier_type="user_agent_id"))
    env.import_file("primary.ndjson", ndjson(
        {"operation": "UPDATE", "user_agent_id": "u9", "segment_technical_name": "s"},
        {"operation": "UPDATE", "user_account_id": "u9", "segment_technical_name": "s"},
        {"operation": "UPDATE", "compartment_id": "c1", "user_account_id": "u9", "segment_technical_name": "s"},
        {"operation": "UPDATE", "email_hash": "h1", "segment_technical_name": "s"},
        {"operation": "UPDATE", "user_agent_id": "user_account_id:u9", "segment_technical_name": "s"},
    ), feed="mics")
    assert env.members("s") == {"u9", "user_account_id:u9", "user_account_id:c1:u9", "email_hash:h1",
                                "\\user_account_id:u9"}


def test_every_identifier_of_a_line_is_a_candidate_in_priority_order(tmp_path):
    """The parsed rows hand the registry every identifier of a line (the validator chooses among them)."""
    (tmp_path / "feeds.yaml").write_text(json.dumps(mics_config()))
    feed = load_workspace(tmp_path / "feeds.yaml").feed("mics")
    text = tmp_path / "c.ndjson"
    text.write_text(ndjson(
        {"operation": "UPDATE", "user_agent_id": " d1 ", "email_hash": "H1", "compartment_id": "c1",
         "user_account_id": " a1", "segment_id": "1"},
        {"operation": "UPDATE", "user_agent_id": "d2", "email_hash": " ", "segment_id": "1"},
        {"operation": "UPDATE", "segment_id": "1"},
    ))
    sql, params = mediarithmics.parse_query(text, "c.ndjson", feed, tmp_path / "work", datetime.now(UTC))
    rows = duckdb.sql(f"SELECT identifier_type, identifier, candidates FROM ({sql}) ORDER BY source_line",
                      params=params).fetchall()
    assert rows == [
        ("user_account_id", "c1:a1", [{"identifier_type": "user_account_id", "identifier": "c1:a1"},
                                      {"identifier_type": "email_hash", "identifier": "H1"},
                                      {"identifier_type": "user_agent_id", "identifier": "d1"}]),
        ("user_agent_id", "d2", [{"identifier_type": "user_agent_id", "identifier": "d2"}]),
        ("user_agent_id", None, []),
    ]


@pytest.mark.parametrize("option", [{"segments": "segments.csv"}, {"primary_identifier_type": "user_agent_id"}])
def test_the_options_are_for_mediarithmics_feeds_only(tmp_path, option):
    config = base_config(**option)
    (tmp_path / "feeds.yaml").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"{next(iter(option))} is for mediarithmics feeds"):
        load_workspace(tmp_path / "feeds.yaml")


def test_an_unknown_primary_identifier_type_is_a_config_error(tmp_path):
    (tmp_path / "feeds.yaml").write_text(json.dumps(mics_config(primary_identifier_type="phone")))
    with pytest.raises(ConfigError, match="primary_identifier_type"):
        load_workspace(tmp_path / "feeds.yaml")
