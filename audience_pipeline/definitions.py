"""Dagster entry point (workspace.yaml loads this module); the config comes from feeds.yaml."""

from audience_pipeline.defs import build_definitions

defs = build_definitions()
