import dagster as dg

from audience_pipeline.config import S3Options, Workspace, load_workspace
from audience_pipeline.importer import ImportService
from audience_pipeline.sources import DropSource, S3ClientFactory, open_source


class AudienceWorkspace(dg.ConfigurableResource):
    """The audience_pipeline workspace: its feeds.yaml, and through it the lake, catalog and feeds.

    ``config_path`` is the workspace's feeds.yaml (AUDIENCE_PIPELINE_CONFIG, or ./feeds.yaml when the
    definitions are loaded). S3 feeds get their clients from dagster-aws's S3Resource with the feed's
    endpoint and region; credentials come from the standard AWS chain, never from the config file.
    """

    config_path: str

    def workspace(self) -> Workspace:
        return load_workspace(self.config_path)

    @staticmethod
    def s3_client_factory(options: S3Options) -> S3ClientFactory:
        def client():
            # Imported on first use: dagster_aws takes ~0.8 s to import, paid by every CLI import otherwise,
            # though only S3 feeds and S3 lakes need it.
            from dagster_aws.s3 import S3Resource

            return S3Resource(endpoint_url=options.endpoint_url, region_name=options.region,
                              profile_name=options.profile).get_client()

        return client

    def service(self) -> ImportService:
        return ImportService(self.workspace(), self.s3_client_factory)

    def source(self, feed: str) -> DropSource:
        workspace = self.workspace()
        options = workspace.feed(feed)
        return open_source(workspace.source_location(feed), self.s3_client_factory(options.s3), options.sftp)
