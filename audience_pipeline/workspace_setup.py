"""Preparing a workspace's storage, and writing a fresh one (``audience-pipeline init``)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from audience_pipeline.config import Workspace, load_workspace
from audience_pipeline.storage.catalog import Catalog
from audience_pipeline.storage.lake import Lake
from audience_pipeline.storage.views import analytics_script, write_analytics


def prepare(workspace: Workspace, lake: Lake | None = None, replace_views: bool = False) -> bool:
    """Create the lake, publish the catalog and write the analysts' views if missing.

    For an S3 lake the views are a SQL script (``<analytics>.sql``) for DuckDB with httpfs: this
    machine's DuckDB cannot read S3, so it cannot create (bind) those views itself.
    """
    if lake is None:
        if workspace.lake_is_remote:
            raise ValueError("an S3 lake is prepared through the import service, which holds its client")
        lake = Lake(workspace.lake)
    lake.ensure()
    catalog = Catalog(workspace.catalog, lake, workspace.config.storage.lock_timeout_seconds)
    catalog.publisher.ensure()
    if not catalog.publisher.published():
        # a fresh workspace, or one upgraded from whole-catalog snapshots: its rows are all dirty
        catalog.publish()
    if lake.remote is not None:
        script = workspace.analytics.with_suffix(".sql")
        if script.exists() and not replace_views:
            return False
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(analytics_script(lake))
        return True
    return write_analytics(workspace.analytics, lake, replace=replace_views)


def init_workspace(target: Path) -> list[Path]:
    """Copy the bundled template (config, instance config, users registry, drop folders, the demo's staged
    deliveries under data/demo/) into ``target``, and create every local feed's drop folder: a sensor
    refuses a folder that does not exist, and a package keeps no empty folders."""
    template = resources.files("audience_pipeline") / "template"
    written: list[Path] = []
    target.mkdir(parents=True, exist_ok=True)

    def copy(node, dest: Path) -> None:
        if node.is_dir():
            dest.mkdir(exist_ok=True)
            for child in node.iterdir():
                copy(child, dest / child.name)
        elif not dest.exists():
            with resources.as_file(node) as src:
                shutil.copyfile(src, dest)
            written.append(dest)

    for child in template.iterdir():
        copy(child, target / child.name)
    workspace = load_workspace(target / "feeds.yaml")
    for feed in workspace.config.feeds:
        location = workspace.source_location(feed)
        if "://" not in location or location.startswith("file://"):
            Path(location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    return written
