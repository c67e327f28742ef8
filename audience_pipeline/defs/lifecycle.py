import dagster as dg

from audience_pipeline.defs.resources import AudienceWorkspace


class DeleteAudienceConfig(dg.Config):
    feed: str
    name: str


@dg.op
def delete_audience(context: dg.OpExecutionContext, config: DeleteAudienceConfig,
                    audience_workspace: AudienceWorkspace) -> dg.Output:
    """Disqualify every member of the audience (with events) and mark it deleted."""
    record = audience_workspace.service().delete_audience(config.feed, config.name)
    if record.status != "succeeded":
        raise dg.Failure(description=f"deleting {config.name!r} failed: {record.error}")
    context.log.info(f"audience {config.name!r} deleted: -{record.disqualified} members")
    return dg.Output(None, metadata={"import_id": record.import_id, "disqualified": record.disqualified or 0})


@dg.job(description="Delete an audience: every member is disqualified with events, and files naming it "
                    "afterwards fail (a deleted name cannot be re-created). Same as "
                    "`audience-pipeline delete-audience`.")
def audience_delete_job():
    delete_audience()
