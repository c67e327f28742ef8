"""A process that holds one audience the way an import does in the middle of its commit, until it is killed
or its standard input closes: the live, then dead, holder of the lock and liveness tests.

python -m audience_pipeline_tests.holder <feeds.yaml> <feed> <audience>  (prints its import id when held)
"""

import os
import sys
from datetime import UTC, datetime

from audience_pipeline.config import load_workspace
from audience_pipeline.importer import ImportService


def main() -> None:
    config, feed, audience = sys.argv[1:4]
    catalog = ImportService(load_workspace(config)).catalog
    record = catalog.begin_import(
        partition_key=f"{feed}:{audience}.csv:00000000", delivery=f"holder:{os.getpid()}", feed=feed,
        source_uri="file:///held.csv", file_name=f"{audience}.csv", sha256=None, size_bytes=None,
        semantics="replace", run_id="holder", received_at=datetime.now(UTC))
    catalog.set_audiences(record.import_id, [audience])
    with catalog.audience_locks(record, catalog.audience_ids(feed, [audience])):
        sys.stdout.write(f"{record.import_id}\n")
        sys.stdout.flush()
        sys.stdin.read()


if __name__ == "__main__":
    main()
