"""One instant per import: its events happen when its versions start, so `members_as_of` at any instant equals
the replay of `membership_events` up to and including it, and an audience's versions neither overlap nor
leave gaps. An audience is (feed, name): `members_as_of`'s third argument keeps feeds apart."""

from datetime import timedelta

from audience_pipeline_tests.conftest import base_config


def replay(events: list[tuple], upto) -> set[str]:
    members: set[str] = set()
    for _, user, action, at in events:
        if at <= upto:
            (members.add if action == "qualify" else members.discard)(user)
    return members


def test_members_as_of_equals_the_replay_of_events(make_env):
    config = base_config(gate={"max_removed": 1})
    config["feeds"]["other"] = {**config["feeds"]["repro"], "source": "drop/other"}
    env = make_env(config)
    env.import_file("a.csv", "u1\nu2\nu3\n")
    env.import_file("a.csv", "u2\nu3\nu4\n")
    held = env.import_file("a.csv", "u4\nu5\n")  # would remove two: held, applied later by approval
    assert held.status == "held", held.error
    env.import_file("b.csv", "u9\n")
    approved = env.runner.service.approve(held.import_id)
    assert approved.status == "succeeded"
    env.import_file("a.csv", "u5\nu6\n")
    (env.root / "drop" / "other").mkdir()
    env.import_file("a.csv", "x1\n", feed="other")  # another feed's audience of the same name

    events = env.query("""SELECT import_id, user_id, action, event_at FROM membership_events e
                          JOIN audiences a USING (audience_id) WHERE a.name = 'a' AND a.feed = 'repro'
                          ORDER BY event_at, import_id, action DESC""")
    instants = sorted({at for *_, at in events})
    assert len(instants) == 4  # one instant per import that changed the audience
    for at in instants:
        for t in (at - timedelta(microseconds=1), at):
            as_of = {u for (u,) in env.query("SELECT user_id FROM members_as_of('a', ?, 'repro')", [t])}
            assert as_of == replay([e for e in events], t), t
    assert {u for (u,) in env.query("SELECT user_id FROM members_as_of('a', now(), 'other')")} == {"x1"}
    # without the feed, both feeds' audiences named 'a' answer
    assert {u for (u,) in env.query("SELECT user_id FROM members_as_of('a', now())")} == {"u5", "u6", "x1"}

    versions = env.query("""SELECT import_id, valid_from, valid_to FROM audience_versions
                            WHERE audience_name = 'a' AND feed = 'repro' ORDER BY version""")
    for (_, _, closed), (_, opened, _) in zip(versions, versions[1:], strict=False):
        assert closed == opened  # no overlap, no gap
    catalog = env.runner.service.catalog
    for import_id, valid_from, _ in versions:
        assert catalog.get_import(import_id).applied_at == valid_from
        assert {at for i, *_, at in events if i == import_id} <= {valid_from}
    # the approved import's instant is its approval, after the import that arrived while it was held
    assert catalog.get_import(held.import_id).applied_at > catalog.get_import(held.import_id + 1).applied_at
