"""``audience-pipeline``: set up a workspace, import files, poll feeds, and look at the results."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import click
import duckdb
from rich.console import Console
from rich.table import Table

from audience_pipeline.config import ConfigError, Workspace, load_workspace
from audience_pipeline.storage.backends import CatalogBusy
from audience_pipeline.storage.catalog import ImportRecord

console = Console()
err = Console(stderr=True)


# Exit codes (README, "Exit codes"); with several files the most severe wins, in the order of SEVERITY.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HELD, EXIT_RETRY = 0, 1, 2, 3, 75
SEVERITY = (EXIT_FAILED, EXIT_RETRY, EXIT_HELD, EXIT_OK)
_STATUS_EXIT = {"succeeded": EXIT_OK, "skipped": EXIT_OK, "dry_run": EXIT_OK, "rejected": EXIT_OK,
                "superseded": EXIT_OK, "failed": EXIT_FAILED, "held": EXIT_HELD, "waiting": EXIT_HELD}


def exit_code(record: ImportRecord) -> int:
    """An import that did not reach a final status (received, abandoned) is work to retry later."""
    return _STATUS_EXIT.get(record.status, EXIT_RETRY)


def most_severe(codes) -> int:
    codes = set(codes)
    return next((code for code in SEVERITY if code in codes), EXIT_OK)


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        err.print(f"[red]error:[/red] {self.message}", markup=True, highlight=False)


def _finish(codes: list[int], problems: list[str]) -> None:
    code = most_severe(codes)
    if code != EXIT_OK:
        raise CliError("; ".join(problems) or "an import is held or waiting for an operator", exit_code=code)


def _workspace(config: str | None) -> Workspace:
    try:
        return load_workspace(config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _runner(workspace: Workspace):
    from audience_pipeline.runner import Runner, instance_for

    return Runner(workspace, instance_for(workspace))


def _analytics(workspace: Workspace) -> duckdb.DuckDBPyConnection:
    from audience_pipeline.workspace_setup import prepare

    if workspace.lake_is_remote:
        raise CliError(f"the lake is on S3: query it with DuckDB and httpfs using the views in "
                       f"{workspace.analytics.with_suffix('.sql')} ('audience-pipeline views' writes them)")
    if not workspace.analytics.exists():
        prepare(workspace)
    con = duckdb.connect(str(workspace.analytics), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    return con


def _table(title: str, cur: duckdb.DuckDBPyConnection) -> Table:
    table = Table(title=title, title_justify="left")
    for column in cur.description:
        table.add_column(column[0])
    for row in cur.fetchall():
        table.add_row(*("" if v is None else str(v) for v in row))
    return table


def _outcome_line(record: ImportRecord, reason: str | None = None) -> str:
    if record.status in ("received", "abandoned"):
        return (f"[red]not finished[/red] ({record.status}) {record.file_name}: "
                f"{reason or record.error or 'its run ended before the import did'}")
    if record.status in ("held", "waiting", "dry_run"):
        return (f"[yellow]{record.status}[/yellow] {record.file_name}: would qualify {record.qualified}, "
                f"disqualify {record.disqualified}; {record.error}")
    if record.status == "failed":
        return f"[red]failed[/red]    {record.file_name}: {record.error}"
    if record.status == "skipped":
        return f"[yellow]skipped[/yellow]   {record.file_name}: {record.error}"
    return (
        f"[green]{record.status}[/green] {record.file_name}: +{record.qualified} qualified, "
        f"-{record.disqualified} disqualified, {record.members} members "
        f"({record.rows_rejected} rejected, {record.unmatched} unmatched, {record.duplicates} duplicates)"
    )


config_option = click.option(
    "--config", "config", envvar="AUDIENCE_PIPELINE_CONFIG", default=None,
    help="Workspace configuration file (default: ./feeds.yaml, or $AUDIENCE_PIPELINE_CONFIG).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Import audience membership files into tracked Dagster runs, DuckDB snapshots and analyst views."""


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init(directory: Path) -> None:
    """Write a fresh workspace into DIRECTORY: feeds.yaml, dagster.yaml, a drop folder with sample files."""
    from audience_pipeline.workspace_setup import init_workspace, prepare

    written = init_workspace(directory)
    prepare(load_workspace(directory / "feeds.yaml"))
    for path in written:
        console.print(f"wrote {path}")
    console.print(f"workspace ready: cd {directory} && audience-pipeline poll")


@main.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--feed", required=True, help="Feed whose format and rules apply to the files.")
@click.option("--dry-run", is_flag=True, help="Compute the diff and the removal gate's verdict; apply nothing.")
@click.option("--profile", metavar="NAME", default=None,
              help="One of the feed's profiles (Loymax): its mode, audience, identifier and action apply.")
@config_option
def import_(files: tuple[Path, ...], feed: str, dry_run: bool, profile: str | None, config: str | None) -> None:
    """Import FILES now, as the feed's sensor would (runs show in the Dagster UI)."""
    from audience_pipeline.runner import RunNotRecorded

    workspace = _workspace(config)
    try:
        workspace.feed(feed)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    files = tuple(p.resolve() for p in files)
    runner = _runner(workspace)
    codes, problems = [], []
    for path in files:
        started = time.monotonic()
        with console.status(f"importing {path} ...", spinner="dots"):
            try:
                record = runner.import_file(feed, path, dry_run=dry_run, profile=profile)
            except ConfigError as exc:
                # the feed was checked above, so this is the profile: a bad option value, exit 2 as click's
                raise click.BadParameter(str(exc), param_hint="'--profile'") from None
            except FileNotFoundError as exc:
                codes.append(EXIT_FAILED)
                problems.append(str(exc))
                continue
            except RunNotRecorded as exc:
                codes.append(EXIT_RETRY if exc.retry_later else EXIT_FAILED)
                problems.append(f"{path.name}: {exc}")
                continue
        reason = runner.reasons.get(record.import_id)
        console.print(f"import {record.import_id}: {_outcome_line(record, reason)} "
                      f"[{time.monotonic() - started:.1f} s]")
        codes.append(exit_code(record))
        if codes[-1] in (EXIT_FAILED, EXIT_RETRY):
            problems.append(f"import {record.import_id} ({record.file_name}): {reason or record.error}")
    _finish(codes, problems)


@main.command()
@click.option("--feed", default=None, help="Poll only this feed (default: every feed).")
@config_option
def poll(feed: str | None, config: str | None) -> None:
    """Evaluate the feeds' sensors once and run the imports they ask for (for cron users)."""
    from audience_pipeline.sources import SourceError, SourceRefused

    workspace = _workspace(config)
    feeds = [feed] if feed else sorted(workspace.config.feeds)
    runner = _runner(workspace)
    codes, problems = [], []
    for name in feeds:
        try:
            workspace.feed(name)
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        with console.status(f"polling {name} ...", spinner="dots"):
            try:
                records = runner.poll(name)
            except SourceRefused as exc:
                codes.append(EXIT_FAILED)
                problems.append(f"{name}: the source refuses us: {exc}")
                continue
            except (SourceError, CatalogBusy) as exc:
                codes.append(EXIT_RETRY)
                problems.append(f"{name}: cannot read the source now: {exc}")
                continue
        for problem in runner.unrecorded:
            err.print(f"{name}: {problem}", markup=False, highlight=False)
            codes.append(EXIT_RETRY if problem.retry_later else EXIT_FAILED)
            problems.append(f"{name}: {problem}")
        runner.unrecorded.clear()
        if not records:
            console.print(f"{name}: no new files")
        for record in records:
            reason = runner.reasons.get(record.import_id)
            console.print(f"{name}: import {record.import_id}: {_outcome_line(record, reason)}")
            codes.append(exit_code(record))
            if codes[-1] in (EXIT_FAILED, EXIT_RETRY):
                problems.append(f"{name}: import {record.import_id} ({record.file_name}): {reason or record.error}")
    _finish(codes, problems)


@main.command()
@config_option
def demo(config: str | None) -> None:
    """Import every file in each feed's drop folder, then show the audiences and what changed."""
    workspace = _workspace(config)
    from audience_pipeline.formats import get_format
    from audience_pipeline.sources import LocalDropSource

    runner = _runner(workspace)
    records = []
    for name in sorted(workspace.config.feeds):
        source = runner.resource.source(name)
        if not isinstance(source, LocalDropSource):
            console.print(f"{name}: {source.location} is not a local folder; use 'audience-pipeline poll'")
            continue
        fmt = get_format(workspace.feed(name).format)
        for obj in source.list():
            if not fmt.accepts(obj.name, workspace.feed(name)):
                continue
            with console.status(f"importing {obj.key} ...", spinner="dots"):
                record = runner.import_file(name, source.root / obj.key)
            console.print(f"{name}: import {record.import_id}: {_outcome_line(record)}")
            records.append(record)
    con = _analytics(workspace)
    console.print(_table("audiences", con.execute(
        "SELECT name, feed, member_count, updated_at FROM audiences ORDER BY feed, name")))
    ids = [r.import_id for r in records]
    console.print(_table("what changed in this demo", con.execute(
        """SELECT audience_name, action, count(*) AS users FROM membership_events
           WHERE list_contains(?, import_id) GROUP BY ALL ORDER BY ALL""", [ids])))
    console.print(f"analyst views: duckdb -readonly {workspace.analytics}")


@main.command()
@config_option
def audiences(config: str | None) -> None:
    """List the audiences with their member counts."""
    con = _analytics(_workspace(config))
    console.print(_table("audiences", con.execute(
        "SELECT audience_id, name, feed, status, member_count, created_at, updated_at "
        "FROM audiences ORDER BY feed, name")))


@main.command()
@click.argument("name")
@click.option("--as-of", "as_of", default=None, help="An instant (ISO 8601, UTC if no offset).")
@click.option("--limit", default=100, show_default=True, help="At most this many user ids.")
@config_option
def members(name: str, as_of: str | None, limit: int, config: str | None) -> None:
    """Print the user ids of audience NAME, now or as of a past instant."""
    con = _analytics(_workspace(config))
    if as_of:
        try:
            ts = datetime.fromisoformat(as_of)
        except ValueError:
            raise CliError(f"--as-of {as_of!r} is not an ISO 8601 timestamp") from None
        cur = con.execute("SELECT user_id FROM members_as_of(?, ?) ORDER BY user_id LIMIT ?", [name, ts, limit])
    else:
        cur = con.execute("SELECT user_id FROM members WHERE audience_name = ? ORDER BY user_id LIMIT ?",
                          [name, limit])
    rows = cur.fetchall()
    for (user_id,) in rows:
        console.print(user_id, highlight=False, markup=False)
    if not rows:
        err.print(f"no members for {name!r}" + (f" as of {as_of}" if as_of else ""))


@main.command("user-audiences")
@click.argument("user_id")
@click.option("--as-of", "as_of", default=None,
              help="An instant (ISO 8601, UTC if no offset) within storage.retention_days.")
@config_option
def user_audiences(user_id: str, as_of: str | None, config: str | None) -> None:
    """The audiences USER_ID is in, now or as of a past instant, one per line (tab-separated): feed, audience,
    qualified_at, expires_at (empty: none)."""
    from datetime import UTC, timedelta

    workspace = _workspace(config)
    ts = None
    if as_of:
        try:
            ts = datetime.fromisoformat(as_of)
        except ValueError:
            raise click.BadParameter(f"{as_of!r} is not an ISO 8601 timestamp", param_hint="'--as-of'") from None
        ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        days = workspace.config.storage.retention_days
        if ts < datetime.now(UTC) - timedelta(days=days):
            raise click.BadParameter(f"{as_of} is older than storage.retention_days ({days:g}): the member lists of "
                                     "then may be deleted (membership_events keeps the history)",
                                     param_hint="'--as-of'")
    con = _analytics(workspace)
    if ts is None:
        cur = con.execute("""SELECT a.feed, m.audience_name, m.qualified_at, m.expires_at
                             FROM members m JOIN audiences a USING (audience_id) WHERE m.user_id = ?
                             ORDER BY ALL""", [user_id])
    else:
        cur = con.execute("""SELECT feed, audience_name, qualified_at, expires_at
                             FROM user_audiences_as_of(?, ?) ORDER BY ALL""", [user_id, ts])
    rows = cur.fetchall()
    # plain tab-separated lines (rich would expand the tabs), for scripts
    click.echo("feed\taudience\tqualified_at\texpires_at")
    for row in rows:
        click.echo("\t".join("" if v is None else v.isoformat() if isinstance(v, datetime) else str(v) for v in row))
    if not rows:
        err.print(f"{user_id!r} is in no audience" + (f" as of {as_of}" if as_of else ""), markup=False,
                  highlight=False)


@main.command()
@click.option("--limit", default=20, show_default=True)
@config_option
def activity(limit: int, config: str | None) -> None:
    """The activity log: the latest imports with their outcome and counts."""
    con = _analytics(_workspace(config))
    console.print(_table("imports", con.execute(
        """SELECT import_id, feed, file_name, status, rows_total AS rows, rows_rejected AS rejected,
                  unmatched, qualified, disqualified, finished_at, error
           FROM imports ORDER BY import_id DESC LIMIT ?""", [limit])))


@main.command()
@click.argument("import_id", type=int)
@click.option("--limit", default=100, show_default=True)
@config_option
def rejects(import_id: int, limit: int, config: str | None) -> None:
    """The rejected rows of import IMPORT_ID, with line number and reason."""
    con = _analytics(_workspace(config))
    console.print(_table(f"rejected rows of import {import_id}", con.execute(
        "SELECT line_number, reason, raw FROM rejected_rows WHERE import_id = ? ORDER BY line_number LIMIT ?",
        [import_id, limit])))


@main.command("delete-audience")
@click.argument("name")
@click.option("--feed", required=True, help="The feed the audience belongs to.")
@config_option
def delete_audience(name: str, feed: str, config: str | None) -> None:
    """Delete audience NAME: disqualify every member (with events). A later file naming it is refused (Repro),
    or makes a new audience of that name (reuse_deleted_names, the default for the other formats)."""
    workspace = _workspace(config)
    runner = _runner(workspace)
    try:
        record = runner.service.delete_audience(feed, name)
    except (LookupError, ConfigError) as exc:
        raise CliError(str(exc)) from None
    if record.status != "succeeded":
        raise CliError(f"deleting {name!r} failed: {record.error}")
    console.print(f"deleted {name!r} ({feed}): {record.disqualified} members disqualified, import {record.import_id}")


@main.command("forget-user")
@click.argument("user_id")
@config_option
def forget_user(user_id: str, config: str | None) -> None:
    """Erase USER_ID: it leaves every audience (with disqualify events), then every lake file holding it is
    rewritten without it. The erasure is recorded by a hash of the id only."""
    runner = _runner(_workspace(config))
    try:
        records, rewritten = runner.service.forget_user(user_id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    console.print(f"removed from {sum(r.disqualified or 0 for r in records)} audience(s) in {len(records)} "
                  f"import(s); {rewritten} lake file(s) rewritten")


@main.command()
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@config_option
def migrate(dry_run: bool, config: str | None) -> None:
    """Upgrade from 0.1.0: rename mediarithmics audiences named by segment id and re-encode the user ids of
    non-primary identifier types, as imports of their own with events (README, "Upgrading from 0.1.0")."""
    from audience_pipeline.importer import ImportFailed
    from audience_pipeline.migrate import Migration, MigrationRefused

    runner = _runner(_workspace(config))
    try:
        with Migration(runner.service) as migration:
            plan = migration.make_plan()
            for line in plan.lines():
                console.print(line, markup=False, highlight=False)
            if plan.refusals:
                raise CliError("migration refused, nothing changed: " + "; ".join(plan.refusals))
            if dry_run or plan.empty:
                return
            applied = migration.apply()
    except MigrationRefused as exc:
        raise CliError(f"migration refused, nothing changed: {exc}") from None
    except CatalogBusy as exc:
        raise CliError(str(exc), exit_code=EXIT_RETRY) from None
    except ImportFailed as exc:
        raise CliError(f"import {exc.record.import_id} {exc.record.file_name}: {exc.record.error}") from None
    for record in applied.renames:
        console.print(f"import {record.import_id}: {record.status} {record.file_name}", highlight=False)
    for record in applied.member_imports:
        console.print(f"import {record.import_id}: {_outcome_line(record)}")
    _finish([exit_code(r) for r in applied.renames + applied.member_imports],
            [f"import {r.import_id}: {r.error}" for r in applied.renames + applied.member_imports])


@main.command()
@click.argument("import_id", type=int)
@config_option
def approve(import_id: int, config: str | None) -> None:
    """Apply held import IMPORT_ID now (and the imports queued behind it)."""
    from audience_pipeline.importer import ImportFailed

    runner = _runner(_workspace(config))
    try:
        record = runner.service.approve(import_id)
    except (ValueError, KeyError) as exc:
        raise CliError(str(exc).strip("'")) from None
    except CatalogBusy as exc:
        raise CliError(str(exc), exit_code=EXIT_RETRY) from None
    except ImportFailed as exc:
        record = exc.record
    console.print(f"import {record.import_id}: {_outcome_line(record)}")
    _finish([exit_code(record)], [f"import {record.import_id}: {record.error}"])


@main.command()
@click.argument("import_id", type=int)
@config_option
def reject(import_id: int, config: str | None) -> None:
    """Drop held import IMPORT_ID: nothing of it is applied."""
    runner = _runner(_workspace(config))
    try:
        record = runner.service.reject(import_id)
    except (ValueError, KeyError) as exc:
        raise CliError(str(exc).strip("'")) from None
    console.print(f"import {record.import_id}: {record.status}")


@main.command()
@click.argument("import_id", type=int)
@config_option
def reimport(import_id: int, config: str | None) -> None:
    """Apply the list of earlier import IMPORT_ID again (a rollback), as a new import through the gate."""
    from audience_pipeline.runner import RunNotRecorded

    runner = _runner(_workspace(config))
    try:
        record = runner.reimport(import_id)
    except (ValueError, KeyError) as exc:
        raise CliError(str(exc).strip("'")) from None
    except RunNotRecorded as exc:
        raise CliError(str(exc), exit_code=EXIT_RETRY if exc.retry_later else EXIT_FAILED) from None
    reason = runner.reasons.get(record.import_id)
    console.print(f"import {record.import_id}: {_outcome_line(record, reason)}")
    _finish([exit_code(record)], [f"import {record.import_id} ({record.file_name}): {reason or record.error}"])


@main.command()
@click.option("--replace", is_flag=True, help="Rewrite the file (no analyst may have it open).")
@config_option
def views(replace: bool, config: str | None) -> None:
    """Write the analysts' DuckDB views file (storage.analytics) if it is missing.

    For an S3 lake, writes the views as a SQL script beside it (storage.analytics with .sql) for DuckDB
    with the httpfs extension."""
    from audience_pipeline.workspace_setup import prepare

    workspace = _workspace(config)
    lake = None
    if workspace.lake_is_remote:
        from audience_pipeline.defs.resources import AudienceWorkspace

        lake = AudienceWorkspace(config_path=str(workspace.path)).service().lake
    try:
        written = prepare(workspace, lake, replace_views=replace)
    except duckdb.IOException as exc:
        raise CliError(f"{workspace.analytics} is in use: {str(exc).splitlines()[0]}") from None
    target = workspace.analytics.with_suffix(".sql") if workspace.lake_is_remote else workspace.analytics
    console.print(f"{'wrote' if written else 'kept'} {target}")


@main.group()
def registry() -> None:
    """The users registry (users.path)."""


@registry.command("check")
@config_option
def registry_check(config: str | None) -> None:
    """Registry values that fail to normalize as the feeds read them (identifier_kind: a phone that is no
    phone, an e-mail that is no e-mail): such values match nothing. Per feed and column: the count and a few
    examples with their registry line. Exits 1 when there are any."""
    import os
    import shutil

    from audience_pipeline.duck import work_connection
    from audience_pipeline.formats import get_format
    from audience_pipeline.users import RegistryError, UsersRegistry

    workspace = _workspace(config)
    if workspace.users_path is None:
        raise CliError(f"{workspace.path}: no users registry (users.path) to check")
    users = UsersRegistry(workspace.users_path, workspace.config.users.user_id_column)
    feeds = {name: (feed, {t: feed.registry_mapping(t) for t in get_format(feed.format).identifier_types(feed)})
             for name, feed in workspace.config.feeds.items()}
    # the lookups built here are the ones imports use, so they are kept beside theirs
    staging = workspace.lake / "staging"
    work = staging / f"registry_check_{os.getpid()}"
    con = work_connection(work, workspace.config.storage.memory_limit)
    try:
        problems = users.check(con, feeds, staging)
    except RegistryError as exc:
        raise CliError(str(exc)) from None
    finally:
        con.close()
        shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        console.print(f"feed {problem.feed}: column {problem.column!r} ({problem.kind}): {problem.count} value(s) "
                      "fail to normalize and match nothing", markup=False, highlight=False)
        for line, value, reason in problem.examples:
            console.print(f"  line {line}: {value!r} ({reason})", markup=False, highlight=False)
    if problems:
        raise CliError(f"{users.path}: {sum(p.count for p in problems)} registry value(s) fail to normalize")
    console.print(f"{users.path}: every value normalizes for {len(feeds)} feed(s)", markup=False, highlight=False)


@registry.command("sweep")
@click.option("--feed", "feeds", multiple=True, help="Sweep only this feed (repeatable; default: every feed due).")
@config_option
def registry_sweep(feeds: tuple[str, ...], config: str | None) -> None:
    """Disqualify now the members the current users registry makes ineligible for the feeds with eligible:, as
    users_registry_sensor's run does: one import per feed, once per registry version."""
    from audience_pipeline.eligibility import EligibilitySweep
    from audience_pipeline.users import RegistryError

    workspace = _workspace(config)
    for feed in feeds:
        try:
            if not workspace.feed(feed).eligible:
                raise click.BadParameter(f"feed {feed!r} has no eligible: to sweep", param_hint="'--feed'")
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="'--feed'") from None
    sweep = EligibilitySweep(_runner(workspace).service)
    if not sweep.feeds():
        console.print("no feed has eligible: (with a users registry): nothing to sweep")
        return
    try:
        results = sweep.sweep(list(feeds) or None)
    except RegistryError as exc:
        raise CliError(str(exc)) from None
    except CatalogBusy as exc:
        raise CliError(str(exc), exit_code=EXIT_RETRY) from None
    if not results:
        console.print("every feed with eligible: is already swept against the current registry")
    for result in results:
        if result.record is None:
            console.print(f"{result.feed}: every member is eligible (registry {result.users_sha256[:12]})")
            continue
        console.print(f"{result.feed}: import {result.record.import_id}: {_outcome_line(result.record)}")
        for drop in result.large_drops:
            console.print(f"{result.feed}: [yellow]large drop[/yellow] (admins e-mailed): {drop}", highlight=False)
    _finish([exit_code(r.record) for r in results if r.record is not None],
            [f"{r.feed}: import {r.record.import_id}: {r.record.error}" for r in results if r.failed])


if __name__ == "__main__":
    sys.exit(main())
