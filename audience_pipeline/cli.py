"""``audience-pipeline``: set up a workspace, import files, poll feeds, and look at the results."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import click
import duckdb
from rich.console import Console

from audience_pipeline import output
from audience_pipeline.config import ConfigError, Workspace, load_workspace
from audience_pipeline.storage.backends import CatalogBusy
from audience_pipeline.storage.catalog import ImportRecord

# Kept for rich's spinner and for callers that print with it: never markup ("[vip]" is a style tag to rich),
# emoji codes (":id:"), highlighting or wrapping, so data comes out as it is. Rows go through output.py.
console = Console(markup=False, emoji=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)


# Exit codes (README, "Exit codes"); with several files the most severe wins, in the order of SEVERITY.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HELD, EXIT_RETRY = 0, 1, 2, 3, 75
SEVERITY = (EXIT_FAILED, EXIT_RETRY, EXIT_HELD, EXIT_OK)
_STATUS_EXIT = {"succeeded": EXIT_OK, "skipped": EXIT_OK, "dry_run": EXIT_OK, "rejected": EXIT_OK,
                "superseded": EXIT_OK, "failed": EXIT_FAILED, "held": EXIT_HELD, "waiting": EXIT_HELD}
_STATUS_COLOR = {"succeeded": "green", "failed": "red", "received": "red", "abandoned": "red", "held": "yellow",
                 "waiting": "yellow", "dry_run": "yellow", "skipped": "yellow"}


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
        output.echo_error(self.message)


def _finish(codes: list[int], problems: list[str]) -> None:
    code = most_severe(codes)
    if code != EXIT_OK:
        raise CliError("; ".join(problems) or "an import is held or waiting for an operator", exit_code=code)


def _group_option(name: str):
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().params.get(name) if ctx is not None else None


def _printer() -> output.Printer:
    return output.Printer(quiet=bool(_group_option("quiet")))


def _workspace(config: str | None) -> Workspace:
    """A command's own --config wins over the group's (which reads $AUDIENCE_PIPELINE_CONFIG when not given)."""
    try:
        return load_workspace(config or _group_option("config"))
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _runner(workspace: Workspace):
    from audience_pipeline.runner import Runner, instance_for

    verbose = _group_option("verbose") or 0
    return Runner(workspace, instance_for(workspace), quiet=not verbose,
                  log_level="DEBUG" if verbose > 1 else "INFO")


@contextlib.contextmanager
def _import_progress(label: str):
    """The importer's phases on one redrawn stderr line while FILE imports, for a person at a terminal."""
    if _group_option("quiet") or not sys.stderr.isatty():
        yield
        return
    from audience_pipeline.importer import import_progress

    with output.Progress(label) as progress:
        token = import_progress.set(progress)
        try:
            yield
        finally:
            import_progress.reset(token)


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


def _table(title: str, cur: duckdb.DuckDBPyConnection) -> str:
    """A query's rows as a plain aligned table (text to print as it is, e.g. with click.echo)."""
    out = io.StringIO()
    output.write_table(out, [c[0] for c in cur.description], output.batches(cur), title)
    return out.getvalue().rstrip("\n")


def _outcome_line(record: ImportRecord, reason: str | None = None, color: bool = False) -> str:
    """One import's outcome as one line of plain text; ``color``: its status in ANSI colour (for click.echo,
    which drops the colour when the output is not a terminal)."""
    status = record.status
    if color and status in _STATUS_COLOR:
        status = click.style(status, fg=_STATUS_COLOR[status])
    if record.status in ("received", "abandoned"):
        return (f"{click.style('not finished', fg='red') if color else 'not finished'} ({status}) "
                f"{record.file_name}: {reason or record.error or 'its run ended before the import did'}")
    if record.status in ("held", "waiting", "dry_run"):
        return (f"{status} {record.file_name}: would qualify {record.qualified}, "
                f"disqualify {record.disqualified}; {record.error}")
    if record.status == "failed":
        return f"{status}    {record.file_name}: {record.error}"
    if record.status == "skipped":
        return f"{status}   {record.file_name}: {record.error}"
    return (
        f"{status} {record.file_name}: +{record.qualified} qualified, "
        f"-{record.disqualified} disqualified, {record.members} members "
        f"({record.rows_rejected} rejected, {record.unmatched} unmatched, {record.duplicates} duplicates)"
    )


config_option = click.option(
    "--config", "config", default=None,
    help="Workspace configuration file; wins over the group's --config (default: ./feeds.yaml, or "
         "$AUDIENCE_PIPELINE_CONFIG).",
)
format_option = click.option(
    "--format", "fmt", type=click.Choice(output.FORMATS), default=None,
    help="table (the default at a terminal), csv (the default when piped: RFC 4180 quoting, a header row) or "
         "json (an array of objects keyed like the CSV header).",
)


def limit_option(table_default: int):
    return click.option(
        "--limit", type=click.IntRange(min=0), default=None,
        help=f"At most N rows; 0: all [default: {table_default} in a table, all in csv and json].")


def _print_query(con: duckdb.DuckDBPyConnection, sql: str, params: list, fmt: str | None,
                 limit: int | None = None, table_limit: int = 0, title: str | None = None) -> int:
    """Print a query's rows (its column names are the header); returns how many it printed. ``limit`` None:
    ``table_limit`` rows for a table, all for csv and json. A cut says how many rows it left out."""
    fmt = fmt or output.default_format()
    limit = (table_limit if fmt == "table" else 0) if limit is None else limit
    left_out = 0
    if limit:
        [(total,)] = con.execute(f"SELECT count(*) FROM ({sql})", params).fetchall()
        left_out = max(0, total - limit)
        sql, params = f"{sql} LIMIT ?", [*params, limit]
    cur = con.execute(sql, params)
    columns = [c[0] for c in cur.description]
    counted = _Counted(output.batches(cur))
    _printer().rows(columns, counted, fmt, title, left_out)
    return counted.count


class _Counted:
    def __init__(self, rows):
        self.rows = rows
        self.count = 0

    def __iter__(self):
        for row in self.rows:
            self.count += 1
            yield row


class _Cli(click.Group):
    """Errors as one line on stderr (``error: ...``), usage errors included, with their exit codes; a closed
    pipe (``| head``) ends the command quietly."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            output.echo_error("aborted")
            sys.exit(EXIT_FAILED)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # the help text a bare command asks for, as click prints it
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            output.echo_error(f"{exc.format_message()}{hint}")
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            # the reader is gone: nothing more to say, and Python's own flush at exit must not complain either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_FAILED)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="audience-pipeline", prog_name="audience-pipeline")
@click.option("--config", "config", envvar="AUDIENCE_PIPELINE_CONFIG", default=None,
              help="Workspace configuration file, for every command (default: ./feeds.yaml, or "
                   "$AUDIENCE_PIPELINE_CONFIG); a command's own --config wins.")
@click.option("-q", "--quiet", is_flag=True, help="Print only data and errors: no progress, notes or hints.")
@click.option("-v", "--verbose", count=True,
              help="Log to stderr: -v at INFO, -vv at DEBUG, with the Dagster runs' own log lines.")
def main(config: str | None, quiet: bool, verbose: int) -> None:
    """Import audience membership files into tracked Dagster runs, DuckDB snapshots and analyst views."""
    if quiet and verbose:
        raise click.UsageError("-q and -v contradict each other: give one")
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        # Dagster's beta and deprecation notices speak to this code's authors, not to whoever runs a command
        warnings.filterwarnings("ignore", module=r"dagster(\.|$)")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init(directory: Path) -> None:
    """Write a fresh workspace into DIRECTORY: feeds.yaml, dagster.yaml, a drop folder with sample files."""
    from audience_pipeline.workspace_setup import init_workspace, prepare

    written = init_workspace(directory)
    prepare(load_workspace(directory / "feeds.yaml"))
    printer = _printer()
    for path in written:
        printer.info(f"wrote {path}")
    printer.info(f"workspace ready: cd {directory} && audience-pipeline demo (sample deliveries), "
                 "or audience-pipeline poll")


@main.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--feed", required=True, help="Feed whose format and rules apply to the files.")
@click.option("--dry-run", is_flag=True, help="Compute the diff and the removal gate's verdict; apply nothing.")
@click.option("--profile", metavar="NAME", default=None,
              help="One of the feed's profiles (Loymax): its mode, audience, identifier and action apply.")
@config_option
def import_(files: tuple[Path, ...], feed: str, dry_run: bool, profile: str | None, config: str | None) -> None:
    """Import FILES now, as the feed's sensor would (runs show in the Dagster UI): one line per file on
    stdout; at a terminal, stderr shows the file's phase, rows parsed and time taken while it runs."""
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
        with _import_progress(f"importing {path.name}"):
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
        click.echo(f"import {record.import_id}: {_outcome_line(record, reason, color=True)} "
                   f"({time.monotonic() - started:.1f} s)")
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
    printer = _printer()
    codes, problems = [], []
    for name in feeds:
        try:
            workspace.feed(name)
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        with _import_progress(f"polling {name}"):
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
            click.echo(output.one_line(f"{name}: {problem}"), err=True)
            codes.append(EXIT_RETRY if problem.retry_later else EXIT_FAILED)
            problems.append(f"{name}: {problem}")
        runner.unrecorded.clear()
        if not records:
            printer.info(f"{name}: no new files")
        for record in records:
            reason = runner.reasons.get(record.import_id)
            click.echo(f"{name}: import {record.import_id}: {_outcome_line(record, reason, color=True)}")
            codes.append(exit_code(record))
            if codes[-1] in (EXIT_FAILED, EXIT_RETRY):
                problems.append(f"{name}: import {record.import_id} ({record.file_name}): {reason or record.error}")
    _finish(codes, problems)


@main.command()
@config_option
def demo(config: str | None) -> None:
    """Deliver the staged sample files of data/demo/ step by step into the drop folders, import them with the
    feeds' sensors, then show what changed and where to look."""
    from audience_pipeline import demo as sample

    invoked_from = Path.cwd()
    workspace = _workspace(config)
    runner = _runner(workspace)
    problems = []

    def step(name: str, files: list) -> None:
        click.echo(f"delivery {name}: {len(files)} files into the drop folders")

    def imported(step_name: str, feed: str, record: ImportRecord) -> None:
        reason = runner.reasons.get(record.import_id)
        click.echo(f"  {feed}: import {record.import_id}: {_outcome_line(record, reason, color=True)}")
        if exit_code(record) in (EXIT_FAILED, EXIT_RETRY):
            problems.append(f"import {record.import_id} ({record.file_name}): {reason or record.error}")

    try:
        run = sample.deliver(workspace, runner.service.catalog, runner, step, imported)
    except sample.DemoError as exc:
        raise CliError(str(exc)) from None
    problems.extend(str(problem) for problem in runner.unrecorded)
    if not run.imports:
        click.echo(f"nothing new to import: the {len(run.staged)} staged files of {sample.DEMO_FOLDER}/ "
                   "were all imported before")
    con = _analytics(workspace)
    for section in sample.summary(con, run):
        click.echo(_table(section.title, section.cursor))
    for line in sample.where_to_look(workspace, sample.held_imports(con), invoked_from):
        click.echo(line)
    _finish([EXIT_FAILED] if problems else [], problems)


@main.command()
@format_option
@config_option
def audiences(fmt: str | None, config: str | None) -> None:
    """List the audiences with their member counts."""
    con = _analytics(_workspace(config))
    _print_query(con, "SELECT audience_id, name, feed, status, member_count, created_at, updated_at "
                      "FROM audiences ORDER BY feed, name", [], fmt, title="audiences")


@main.command()
@click.argument("name")
@click.option("--as-of", "as_of", default=None,
              help="An instant (ISO 8601, UTC if no offset); prints user_id only (members_as_of's one column).")
@limit_option(100)
@format_option
@config_option
def members(name: str, as_of: str | None, limit: int | None, fmt: str | None, config: str | None) -> None:
    """The members of audience NAME, sorted by user id: user_id, qualified_at, expires_at (empty: none).
    With --as-of, the user ids of the list valid at that instant."""
    con = _analytics(_workspace(config))
    if as_of:
        try:
            ts = datetime.fromisoformat(as_of)
        except ValueError:
            raise CliError(f"--as-of {as_of!r} is not an ISO 8601 timestamp") from None
        sql, params = "SELECT user_id FROM members_as_of(?, ?) ORDER BY user_id", [name, ts]
    else:
        sql, params = ("SELECT user_id, qualified_at, expires_at FROM members WHERE audience_name = ? "
                       "ORDER BY user_id", [name])
    if not _print_query(con, sql, params, fmt, limit, 100, title=f"members of {name}"):
        _printer().note(f"no members for {name!r}" + (f" as of {as_of}" if as_of else ""))


@main.command("user-audiences")
@click.argument("user_id")
@click.option("--as-of", "as_of", default=None,
              help="An instant (ISO 8601, UTC if no offset) within storage.retention_days.")
@format_option
@config_option
def user_audiences(user_id: str, as_of: str | None, fmt: str | None, config: str | None) -> None:
    """The audiences USER_ID is in, now or as of a past instant: feed, audience, qualified_at, expires_at
    (empty: none)."""
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
        sql, params = ("""SELECT a.feed, m.audience_name AS audience, m.qualified_at, m.expires_at
                          FROM members m JOIN audiences a USING (audience_id) WHERE m.user_id = ?
                          ORDER BY ALL""", [user_id])
    else:
        sql, params = ("""SELECT feed, audience_name AS audience, qualified_at, expires_at
                          FROM user_audiences_as_of(?, ?) ORDER BY ALL""", [user_id, ts])
    if not _print_query(con, sql, params, fmt, title=f"audiences of {user_id}"):
        _printer().note(f"{user_id!r} is in no audience" + (f" as of {as_of}" if as_of else ""))


@main.command()
@limit_option(20)
@format_option
@config_option
def activity(limit: int | None, fmt: str | None, config: str | None) -> None:
    """The activity log: the latest imports with their outcome and counts, newest first."""
    con = _analytics(_workspace(config))
    _print_query(con, """SELECT import_id, feed, file_name, status, rows_total AS rows, rows_rejected AS rejected,
                                unmatched, qualified, disqualified, finished_at, error
                         FROM imports ORDER BY import_id DESC""", [], fmt, limit, 20, title="imports")


@main.command()
@click.argument("import_id", type=int)
@limit_option(100)
@format_option
@config_option
def rejects(import_id: int, limit: int | None, fmt: str | None, config: str | None) -> None:
    """The rejected rows of import IMPORT_ID: line number, reason and the raw line."""
    con = _analytics(_workspace(config))
    _print_query(con, "SELECT line_number, reason, raw FROM rejected_rows WHERE import_id = ? ORDER BY line_number",
                 [import_id], fmt, limit, 100, title=f"rejected rows of import {import_id}")


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
    click.echo(f"deleted {name!r} ({feed}): {record.disqualified} members disqualified, import {record.import_id}")


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
    click.echo(f"removed from {sum(r.disqualified or 0 for r in records)} audience(s) in {len(records)} "
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
                click.echo(line)
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
        click.echo(f"import {record.import_id}: {record.status} {record.file_name}")
    for record in applied.member_imports:
        click.echo(f"import {record.import_id}: {_outcome_line(record, color=True)}")
    _finish([exit_code(r) for r in applied.renames + applied.member_imports],
            [f"import {r.import_id}: {r.error}" for r in applied.renames + applied.member_imports])


@main.command()
@click.argument("import_id", type=int)
@config_option
def approve(import_id: int, config: str | None) -> None:
    """Apply held import IMPORT_ID now (and the imports queued behind it), as a run of audience_approve_job."""
    from audience_pipeline.importer import ImportFailed

    runner = _runner(_workspace(config))
    try:
        record = runner.decide(import_id, approve=True)
    except (ValueError, KeyError) as exc:
        raise CliError(str(exc).strip("'")) from None
    except CatalogBusy as exc:
        raise CliError(str(exc), exit_code=EXIT_RETRY) from None
    except ImportFailed as exc:
        record = exc.record
    click.echo(f"import {record.import_id}: {_outcome_line(record, color=True)}")
    _finish([exit_code(record)], [f"import {record.import_id}: {record.error}"])


@main.command()
@click.argument("import_id", type=int)
@config_option
def reject(import_id: int, config: str | None) -> None:
    """Drop held import IMPORT_ID: nothing of it is applied (a run of audience_reject_job)."""
    runner = _runner(_workspace(config))
    try:
        record = runner.decide(import_id, approve=False)
    except (ValueError, KeyError) as exc:
        raise CliError(str(exc).strip("'")) from None
    click.echo(f"import {record.import_id}: {record.status}")


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
    click.echo(f"import {record.import_id}: {_outcome_line(record, reason, color=True)}")
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
    click.echo(f"{'wrote' if written else 'kept'} {target}")


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
        click.echo(f"feed {problem.feed}: column {problem.column!r} ({problem.kind}): {problem.count} value(s) "
                      "fail to normalize and match nothing")
        for line, value, reason in problem.examples:
            click.echo(f"  line {line}: {value!r} ({reason})")
    if problems:
        raise CliError(f"{users.path}: {sum(p.count for p in problems)} registry value(s) fail to normalize")
    click.echo(f"{users.path}: every value normalizes for {len(feeds)} feed(s)")


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
        click.echo("no feed has eligible: (with a users registry): nothing to sweep")
        return
    try:
        results = sweep.sweep(list(feeds) or None)
    except RegistryError as exc:
        raise CliError(str(exc)) from None
    except CatalogBusy as exc:
        raise CliError(str(exc), exit_code=EXIT_RETRY) from None
    if not results:
        click.echo("every feed with eligible: is already swept against the current registry")
    for result in results:
        if result.record is None:
            click.echo(f"{result.feed}: every member is eligible (registry {result.users_sha256[:12]})")
            continue
        click.echo(f"{result.feed}: import {result.record.import_id}: {_outcome_line(result.record, color=True)}")
        for drop in result.large_drops:
            click.echo(f"{result.feed}: {click.style('large drop', fg='yellow')} (admins e-mailed): {drop}")
    _finish([exit_code(r.record) for r in results if r.record is not None],
            [f"{r.feed}: import {r.record.import_id}: {r.record.error}" for r in results if r.failed])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; put a TLS reverse proxy in front before listening beyond this machine.")
@click.option("--port", default=8000, show_default=True, type=int)
@config_option
def serve(host: str, port: int, config: str | None) -> None:
    """Accept uploads over HTTP: mediarithmics' bulk-import calls, POST /api/feeds/FEED/files, and an upload
    page at /. Each upload is imported as a run of the import job (it shows in the Dagster UI)."""
    import uvicorn

    from audience_pipeline.api.app import create_app

    workspace = _workspace(config)
    if not workspace.config.api.tokens:
        raise CliError(f"{workspace.path}: no api.tokens: every request needs a token "
                       "('audience-pipeline token-hash' makes one)")
    # the server's own lines (uploads received, refused, cut off) beside uvicorn's; never a token in them.
    # With -v the root logger already prints them.
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logging.getLogger("audience_pipeline.api").addHandler(handler)
        logging.getLogger("audience_pipeline.api").setLevel(logging.INFO)
    uvicorn.run(create_app(workspace), host=host, port=port, log_level="info")


@main.command("token-hash")
@click.argument("token", required=False)
def token_hash(token: str | None) -> None:
    """Print the sha256 of TOKEN for api.tokens (a new random token, printed too, when none is given)."""
    from audience_pipeline.api.auth import hash_token, new_token

    if token is None:
        token = new_token()
        click.echo(f"token:  {token}")
        click.echo("give the token to its client; only the sha256 below goes into the config")
    click.echo(f"sha256: {hash_token(token)}")


if __name__ == "__main__":
    sys.exit(main())
