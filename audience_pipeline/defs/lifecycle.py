import dagster as dg

from audience_pipeline.defs.audiences import report_audiences
from audience_pipeline.defs.resources import AudienceWorkspace


class DeleteAudienceConfig(dg.Config):
    feed: str
    name: str


@dg.op
def delete_audience(context: dg.OpExecutionContext, config: DeleteAudienceConfig,
                    audience_workspace: AudienceWorkspace) -> dg.Output:
    """Disqualify every member of the audience (with events) and mark it deleted."""
    service = audience_workspace.service()
    record = service.delete_audience(config.feed, config.name)
    if record.status != "succeeded":
        raise dg.Failure(description=f"deleting {config.name!r} failed: {record.error}")
    report_audiences(context, service, record, deleted=True)
    context.log.info(f"audience {config.name!r} deleted: -{record.disqualified} members")
    return dg.Output(None, metadata={"import_id": record.import_id, "disqualified": record.disqualified or 0})


@dg.job(description="Delete an audience: every member is disqualified with events, and files naming it "
                    "afterwards fail (a deleted name cannot be re-created). Same as "
                    "`audience-pipeline delete-audience`.")
def audience_delete_job():
    delete_audience()


class ImportDecisionConfig(dg.Config):
    import_id: int


@dg.op
def approve_import(context: dg.OpExecutionContext, config: ImportDecisionConfig,
                   audience_workspace: AudienceWorkspace) -> dg.Output:
    """Apply a held import (diffed again against the current lists), then the imports queued behind it."""
    service = audience_workspace.service()
    record = service.approve(config.import_id)
    report_audiences(context, service, record)
    context.log.info(f"import {record.import_id} {record.status}: +{record.qualified} -{record.disqualified}")
    return dg.Output(None, metadata={"import_id": record.import_id, "status": record.status})


@dg.job(description="Approve a held import: it is applied now. Same as `audience-pipeline approve IMPORT_ID`.")
def audience_approve_job():
    approve_import()


@dg.op
def reject_import(context: dg.OpExecutionContext, config: ImportDecisionConfig,
                  audience_workspace: AudienceWorkspace) -> dg.Output:
    """Drop a held import (status rejected), then apply the imports queued behind it."""
    service = audience_workspace.service()
    record = service.reject(config.import_id)
    report_audiences(context, service, record)
    return dg.Output(None, metadata={"import_id": record.import_id, "status": record.status})


@dg.job(description="Reject a held import: nothing of it is applied. Same as `audience-pipeline reject IMPORT_ID`.")
def audience_reject_job():
    reject_import()
