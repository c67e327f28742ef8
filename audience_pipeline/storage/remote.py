"""The lake's copy on S3, for ``storage.lake: s3://bucket/prefix``: every lake file is uploaded (with
server-side encryption) under the same relative path it has in the local cache, and fetched back on demand."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from audience_pipeline.sources.s3 import parse_s3_uri


class RemoteStore:
    def __init__(self, client: Any, uri: str, sse: str = "AES256", kms_key_id: str | None = None):
        self.client = client
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        self.extra = {"ServerSideEncryption": sse}
        if kms_key_id:
            self.extra["SSEKMSKeyId"] = kms_key_id

    def key(self, relative: str) -> str:
        return self.prefix + relative

    def upload(self, path: Path, relative: str) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(relative), ExtraArgs=self.extra)

    def download(self, relative: str, path: Path) -> bool:
        """Fetch into ``path`` (atomically); False when the object does not exist."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            self.client.download_file(self.bucket, self.key(relative), str(tmp))
        except ClientError as exc:
            tmp.unlink(missing_ok=True)
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        os.replace(tmp, path)
        return True

    def exists(self, relative: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(relative))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete(self, relative: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(relative))
