"""``audience-pipeline serve``: uploads over HTTP (mediarithmics' bulk-import calls, a generic endpoint and an
upload page), each imported as a delivery of a feed through the same Dagster job as the sensors' files."""
