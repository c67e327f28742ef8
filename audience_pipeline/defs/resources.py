import dagster as dg

from audience_pipeline.config import Workspace, load_workspace
from audience_pipeline.importer import ImportService


class AudienceWorkspace(dg.ConfigurableResource):
    """The audience_pipeline workspace: its feeds.yaml, and through it the lake, catalog and feeds.

    ``config_path`` is the workspace's feeds.yaml; set it with the AUDIENCE_PIPELINE_CONFIG environment
    variable, or leave it to the definitions loader, which resolves it from the working directory.
    """

    config_path: str

    def workspace(self) -> Workspace:
        return load_workspace(self.config_path)

    def service(self) -> ImportService:
        return ImportService(self.workspace())
