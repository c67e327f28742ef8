"""An S3 (or S3-compatible: MinIO, Ceph) prefix as a drop location, read with a boto3 client."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import urllib3
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
)

from audience_pipeline.sources.base import SourceChanged, SourceError, SourceObject, SourceRefused, SourceTransient

LIST_PAGE_SIZE = 1000

# Error codes that stay until someone fixes credentials, a policy or the configured bucket. A HEAD has no
# body, so its errors carry only the status ("403"); "301" is a bucket in another region than configured.
REFUSED_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
    "InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed", "ExpiredToken", "InvalidToken",
    "AccountProblem", "403", "301",
})
TRANSIENT_CODES = frozenset({
    "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "InternalError", "ServiceUnavailable", "503", "500",
})
REFUSED_BOTOCORE = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, ProfileNotFound,
                    NoRegionError)


def source_error(exc: ClientError | BotoCoreError, message: str) -> SourceError:
    """``message`` and the reason, as the class that says what to do about it: SourceRefused for denied
    credentials or a missing bucket, SourceTransient for an unreachable endpoint, throttling and 5xx."""
    text = f"{message}: {_reason(exc)}"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in REFUSED_CODES:
            return SourceRefused(text)
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return SourceTransient(text)
        return SourceError(text)
    if isinstance(exc, REFUSED_BOTOCORE):
        return SourceRefused(text)
    if isinstance(exc, ParamValidationError):
        return SourceError(text)
    # connection refused, DNS, timeouts, a connection closed mid-response: the endpoint may come back
    return SourceTransient(text)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise SourceError(f"not an s3:// location: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise SourceError(f"no bucket in {uri!r}")
    return bucket, key


def _etag(value: str) -> str:
    return value.strip('"')


class S3DropSource:
    """Objects under ``s3://bucket/prefix/``.

    LastModified is when an upload *started* (for a multipart upload, when it was initiated) and has
    whole-second resolution, so the cursor looks back 15 minutes by default. An object's version is its
    VersionId on a versioned bucket, else its ETag plus LastModified (a rewrite with identical bytes is
    still a new delivery; its import is then skipped as identical content).
    """

    default_lookback_seconds = 900.0

    def __init__(self, client: Any, location: str):
        self.client = client
        self.bucket, self.prefix = parse_s3_uri(location)
        self.location = location

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def close(self) -> None:
        return None

    def list(self) -> Iterator[SourceObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                       PaginationConfig={"PageSize": LIST_PAGE_SIZE})
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    relative = key[len(self.prefix):]
                    if not relative or key.endswith("/") or relative.rsplit("/", 1)[-1].startswith("."):
                        continue
                    modified = item["LastModified"]
                    yield SourceObject(
                        key=relative,
                        size=item["Size"],
                        arrived_ns=int(modified.timestamp()) * 1_000_000_000,
                        version=f"etag:{_etag(item['ETag'])}@{int(modified.timestamp())}",
                        uri=self._uri(key),
                    )
        except (ClientError, BotoCoreError) as exc:
            raise source_error(exc, f"cannot list {self.location}") from None

    def _object(self, key: str, meta: dict) -> SourceObject:
        modified = int(meta["LastModified"].timestamp())
        version_id = meta.get("VersionId")
        version = (f"vid:{version_id}" if version_id and version_id != "null"
                   else f"etag:{_etag(meta['ETag'])}@{modified}")
        return SourceObject(key=key, size=meta["ContentLength"], arrived_ns=modified * 1_000_000_000,
                            version=version, uri=self._uri(self.prefix + key))

    def fingerprint(self, key: str) -> tuple[str, SourceObject]:
        try:
            meta = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (ClientError, BotoCoreError) as exc:
            raise source_error(exc, f"cannot read {self._uri(self.prefix + key)}") from None
        digest = _etag(meta["ETag"]).split("-")[0]
        return digest, self._object(key, meta)

    @contextmanager
    def open(self, key: str, version: str | None = None) -> Iterator[tuple[BinaryIO, SourceObject]]:
        request = {"Bucket": self.bucket, "Key": self.prefix + key}
        if version and version.startswith("vid:"):
            request["VersionId"] = version[len("vid:"):]
        elif version and version.startswith("etag:"):
            request["IfMatch"] = '"' + version[len("etag:"):].rsplit("@", 1)[0] + '"'
        try:
            response = self.client.get_object(**request)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "NoSuchVersion"):
                raise SourceChanged(f"{self._uri(self.prefix + key)} was replaced after it was listed") from None
            raise source_error(exc, f"cannot read {self._uri(self.prefix + key)}") from None
        except BotoCoreError as exc:
            raise source_error(exc, f"cannot read {self._uri(self.prefix + key)}") from None
        body = response["Body"]
        try:
            yield _Guarded(body, self._uri(self.prefix + key)), self._object(key, response)
        finally:
            body.close()


class _Guarded:
    """A response body whose read errors (a connection cut mid-download) become SourceTransient."""

    def __init__(self, body, uri: str):
        self.body = body
        self.uri = uri

    def read(self, size: int = -1) -> bytes:
        try:
            return self.body.read(size)
        except (BotoCoreError, OSError, urllib3.exceptions.HTTPError) as exc:
            raise SourceTransient(f"reading {self.uri} broke off: {type(exc).__name__}") from None


def _reason(exc: Exception) -> str:
    """The error code and message only: botocore messages never carry credentials, but request dumps can."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip()
    return type(exc).__name__
