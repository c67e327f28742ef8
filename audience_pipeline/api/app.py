"""The ASGI app of ``audience-pipeline serve``: mediarithmics' bulk-import calls, a generic upload endpoint,
and the upload page. Every upload is staged, stored as an upload of the server's own, and imported by the
worker as a run of the import job (``worker.py``)."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from datetime import datetime
from urllib.parse import parse_qsl

import anyio
import duckdb
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from audience_pipeline.api import page
from audience_pipeline.api.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Client,
    Sessions,
    Tokens,
    same_secret,
    token_from_header,
)
from audience_pipeline.api.receiving import BadUpload, FormStream, StagedFile, base_name, stage_body
from audience_pipeline.api.store import IdempotencyConflict, Upload, UploadStore
from audience_pipeline.config import ConfigError, FeedConfig, Workspace
from audience_pipeline.formats import get_format

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024
MAX_KEY_CHARS = 255
DOCUMENT_TYPE = "USER_SEGMENT"
# mediarithmics' mime_type -> the body's Content-Types it takes, and the suffix its file gets
MIME_TYPES = {
    "APPLICATION_X_NDJSON": ({"application/x-ndjson", "application/ndjson"}, ".ndjson"),
    "TEXT_CSV": ({"text/csv"}, ".csv"),
}
# a body of the generic endpoint is the file itself, never a form encoding of it
FORM_TYPES = {"application/x-www-form-urlencoded", "multipart/form-data"}
# the import's status -> mediarithmics' execution status; others are passed as they are
EXECUTION_STATUS = {"succeeded": "SUCCEEDED", "skipped": "SUCCEEDED", "dry_run": "SUCCEEDED",
                    "failed": "FAILED", "rejected": "FAILED", "held": "HELD", "waiting": "HELD"}
# the sign-in page shows only its own messages: a link cannot make it display text of the linker's choosing
SIGN_IN_PROBLEMS = {"token": "That token is not valid."}
REJECTS_SHOWN = 20
MEMBERS_SHOWN = 50


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def ok(data: dict, status: int = 200) -> JSONResponse:
    return JSONResponse({"status": "ok", "data": data}, status_code=status)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": "error", "error": message}, status_code=status)


def media_type(request: Request) -> tuple[str, str | None]:
    """The Content-Type's media type (lower case) and its charset."""
    value = request.headers.get("content-type", "")
    media, _, params = value.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, val = param.strip().partition("=")
        if key.lower() == "charset":
            charset = val.strip().strip('"').lower()
    return media.strip().lower(), charset


def upload_status(upload: Upload) -> tuple[str, str]:
    """mediarithmics' status of an upload, and ours: the upload's state until its import has one."""
    if upload.state == "received":
        return "PENDING", "received"
    if upload.state == "running":
        return "RUNNING", "running"
    if upload.state == "not_recorded":
        return "FAILED", "not_recorded"
    ours = upload.outcome["status"]
    return EXECUTION_STATUS.get(ours, ours), ours


def upload_data(upload: Upload) -> dict:
    status, ours = upload_status(upload)
    outcome = upload.outcome or {}
    counts = {k: outcome.get(k) for k in ("rows", "valid", "rejected", "duplicates", "unmatched", "qualified",
                                           "disqualified", "members")} if outcome else None
    return {
        "id": str(upload.id), "status": status, "audience_pipeline_status": ours, "feed": upload.feed,
        "file_name": upload.file_name, "profile": upload.profile, "size_bytes": upload.size_bytes,
        "sha256": upload.sha256, "import_id": upload.import_id, "counts": counts,
        "rejected_rows": outcome.get("rejected") if outcome else None,
        "audiences": outcome.get("audiences") if outcome else None,
        "error": upload.error or outcome.get("error"), "run_id": outcome.get("run_id"),
        "creation_date": upload.created_at, "start_date": upload.started_at, "end_date": upload.finished_at,
    }


def _millis(value: str | None) -> int | None:
    return None if value is None else int(datetime.fromisoformat(value).timestamp() * 1000)


class UploadServer:
    def __init__(self, workspace: Workspace, store: UploadStore, worker):
        self.workspace = workspace
        self.store = store
        self.worker = worker
        self.tokens = Tokens(workspace.config.api)
        self.sessions = Sessions()
        self.staging = workspace.lake / "staging" / "uploads"

    # -- who asks ---------------------------------------------------------------------------------------------

    def client(self, request: Request) -> Client:
        client = self.tokens.client(token_from_header(request.headers.get("authorization")))
        if client is None:
            raise ApiError(401, "a valid token is required: Authorization: <token> or Authorization: Bearer <token>")
        return client

    def feed_for(self, client: Client, feed: str) -> FeedConfig:
        if not client.may_write(feed):
            raise ApiError(403, f"token {client.name!r} may not write feed {feed!r}")
        return self.workspace.feed(feed)

    # -- one upload -------------------------------------------------------------------------------------------

    def target(self, client: Client, feed_name: str, file_name: str | None, profile: str | None,
               audience: str | None) -> tuple[FeedConfig, str]:
        """The feed's options for the upload, and the delivery's file name; BadUpload if they do not fit."""
        feed = self.feed_for(client, feed_name)
        try:
            options = feed.for_profile(profile or None)
        except ConfigError as exc:
            raise BadUpload(f"feed {feed_name!r}: {exc}") from None
        name = base_name(file_name)
        if audience:
            # Loymax mode 1 names its audience after the file when the feed sets none, as its import page
            # asks for the audience: the file is delivered under the audience's name
            if options.format != "loymax" or options.mode != "single" or options.audience is not None:
                raise BadUpload(f"an audience can be chosen only for a Loymax feed in mode single without an "
                                f"audience of its own; feed {feed_name!r} decides its audiences itself")
            if "/" in audience or "\\" in audience:
                raise BadUpload(f"the audience name {audience!r} holds a '/' or '\\', which a file name cannot")
            suffix = "." + name.rsplit(".", 1)[1] if "." in name else ".csv"
            name = base_name(audience.strip() + suffix)
        if not get_format(options.format).accepts(name, options):
            raise BadUpload(f"feed {feed_name!r} ({options.format}) does not take a file named {name!r}")
        return options, name

    def check_length(self, request: Request, feed: FeedConfig) -> None:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > feed.max_file_bytes:
            raise BadUpload(f"the file ({length} bytes) is over the feed's limit of {feed.max_file_bytes} bytes "
                            "(max_file_bytes)", 413)

    def store_upload(self, client: Client, feed: str, file_name: str, profile: str | None, key: str | None,
                     document_import_id: int | None, staged: StagedFile, sha256: str) -> tuple[Upload, bool]:
        try:
            upload, new = self.store.add_upload(feed, file_name, profile, client.name, key, document_import_id,
                                                sha256, staged.size, staged.path)
        except IdempotencyConflict as exc:
            staged.discard()
            raise ApiError(409, str(exc)) from None
        if new:
            self.worker.submit(upload.id)
            log.info("upload %s: %s (%s bytes) for feed %s by %s", upload.id, file_name, staged.size, feed,
                     client.name)
        else:
            staged.discard()  # the retried upload's bytes are the ones already stored
        return upload, new

    async def receive_file(self, request: Request, client: Client, feed_name: str, file_name: str | None,
                           profile: str | None, audience: str | None,
                           document_import_id: int | None = None) -> tuple[Upload, bool]:
        options, name = self.target(client, feed_name, file_name, profile, audience)
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= MAX_KEY_CHARS:
            raise BadUpload(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters")
        self.check_length(request, options)
        staged = StagedFile(self.staging, options.max_file_bytes)
        sha256 = await stage_body(request.stream(), staged)
        return self.store_upload(client, feed_name, name, profile or None, key, document_import_id, staged, sha256)

    def visible_upload(self, client: Client, upload_id: str) -> Upload:
        upload = self.store.get(int(upload_id)) if upload_id.isdigit() else None
        if upload is None:
            raise ApiError(404, f"no upload {upload_id}")
        if not client.may_write(upload.feed):
            raise ApiError(403, f"token {client.name!r} may not read uploads of feed {upload.feed!r}")
        return upload

    # -- generic endpoints ------------------------------------------------------------------------------------

    async def post_file(self, request: Request) -> Response:
        client = self.client(request)
        feed = request.path_params["feed"]
        self.feed_for(client, feed)
        mtype, _ = media_type(request)
        if mtype in FORM_TYPES:
            raise BadUpload(f"the body must be the file itself (e.g. Content-Type: application/octet-stream or "
                            f"text/csv), not {mtype} (curl: --data-binary @file -H 'Content-Type: text/csv')", 415)
        q = request.query_params
        upload, new = await self.receive_file(request, client, feed, q.get("name"), q.get("profile"),
                                              q.get("audience"))
        return ok(upload_data(upload), 202 if new else 200)

    async def get_import(self, request: Request) -> Response:
        client = self.client(request)
        return ok(upload_data(self.visible_upload(client, request.path_params["upload_id"])))

    # -- mediarithmics --------------------------------------------------------------------------------------------

    def datamart_feed(self, client: Client, datamart_id: str) -> str:
        feed = self.workspace.config.api.datamarts.get(datamart_id)
        if feed is None:
            raise ApiError(404, f"no datamart {datamart_id} (api.datamarts)")
        self.feed_for(client, feed)
        return feed

    async def post_document_import(self, request: Request) -> Response:
        client = self.client(request)
        datamart_id = request.path_params["datamart_id"]
        feed = self.datamart_feed(client, datamart_id)
        if media_type(request)[0] != "application/json":
            raise ApiError(415, "a document import is created with a JSON body (Content-Type: application/json)")
        body = await _small_body(request)
        try:
            spec = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ApiError(400, "the body must be a JSON object")
        if spec.get("document_type") != DOCUMENT_TYPE:
            raise ApiError(400, f"document_type {spec.get('document_type')!r} is not supported: only {DOCUMENT_TYPE} "
                                "(segment commands) imports audiences")
        mime = spec.get("mime_type")
        if mime not in MIME_TYPES:
            raise ApiError(400, f"mime_type {mime!r} is not supported: {' or '.join(MIME_TYPES)}")
        encoding = spec.get("encoding", "utf-8")
        if not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
            raise ApiError(400, f"encoding {encoding!r} is not supported: utf-8 only")
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "name is required: the document import's name (its files are named after it)")
        file_type = self.workspace.feed(feed).file_type
        if file_type != "auto" and MIME_TYPES[mime][1] != f".{file_type}":
            raise ApiError(400, f"feed {feed!r} reads only {file_type} files (file_type), not {mime}")
        execution_name(name, mime)
        row = self.store.add_document_import(datamart_id, feed, client.name, name, mime, encoding)
        return ok(_document_import_data(row), 201)

    def document_import(self, client: Client, request: Request) -> dict:
        datamart_id = request.path_params["datamart_id"]
        self.datamart_feed(client, datamart_id)
        doc_id = request.path_params["document_import_id"]
        row = self.store.document_import(int(doc_id), datamart_id) if doc_id.isdigit() else None
        if row is None:
            raise ApiError(404, f"no document import {doc_id} in datamart {datamart_id}")
        return row

    async def post_execution(self, request: Request) -> Response:
        client = self.client(request)
        doc = self.document_import(client, request)
        accepted, _ = MIME_TYPES[doc["mime_type"]]
        mtype, charset = media_type(request)
        if mtype not in accepted:
            raise ApiError(415, f"document import {doc['id']} is {doc['mime_type']}: send the commands with "
                                f"Content-Type: {sorted(accepted)[-1]}, not {mtype or 'none'}")
        if charset not in (None, "utf-8", "utf8"):
            raise ApiError(415, f"charset {charset} is not supported: utf-8 only")
        upload, new = await self.receive_file(request, client, doc["feed"], execution_name(doc["name"],
                                              doc["mime_type"]), None, None, document_import_id=doc["id"])
        return ok(_execution_data(upload, doc), 201 if new else 200)

    async def get_execution(self, request: Request) -> Response:
        client = self.client(request)
        doc = self.document_import(client, request)
        upload = self.visible_upload(client, request.path_params["execution_id"])
        if upload.document_import_id != doc["id"]:
            raise ApiError(404, f"no execution {upload.id} of document import {doc['id']}")
        return ok(_execution_data(upload, doc))

    # -- the page -------------------------------------------------------------------------------------------------

    def session(self, request: Request):
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    async def index(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            login = secrets.token_urlsafe(32)
            response = HTMLResponse(page.sign_in(login, SIGN_IN_PROBLEMS.get(request.query_params.get("problem"))))
            response.set_cookie(LOGIN_COOKIE, login, httponly=True, samesite="strict", path="/",
                                secure=request.url.scheme == "https")
            return response
        return HTMLResponse(page.upload_form(session, self.targets(session.client), secrets.token_urlsafe(16), None))

    def targets(self, client: Client) -> list[tuple[str, str]]:
        """The upload form's choices: each feed, and each Loymax profile of it, as (value, label)."""
        choices = []
        for name in client.feeds:
            feed = self.workspace.feed(name)
            choices.append((name, f"{name} ({feed.format})"))
            choices += [(f"{name}/{p}", f"{name} ({feed.format}), profile {p}") for p in sorted(feed.profiles)]
        return choices

    async def sign_in(self, request: Request) -> Response:
        form = await _small_form(request)
        if not same_secret(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
            return HTMLResponse(page.message("The sign-in form expired: open the page again."), 403)
        client = self.tokens.client(form.get("token", "").strip())
        if client is None:
            return RedirectResponse("/?problem=token", 303)
        session_id, _ = self.sessions.open(client)
        response = RedirectResponse("/", 303)
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    async def sign_out(self, request: Request) -> Response:
        session = self.session(request)
        form = await _small_form(request)
        if session is not None and same_secret(form.get("csrf"), session.csrf):
            self.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def upload_page(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return HTMLResponse(page.message("Sign in first."), 401)

        chosen: dict[str, str] = {}  # the delivery's file name, once the file part begins

        def open_file(fields: dict[str, str], filename: str | None) -> StagedFile:
            if not same_secret(fields.get("csrf"), session.csrf):
                raise BadUpload("the form expired or did not come from this page: open the page again", 403)
            feed_name, _, profile = fields.get("target", "").partition("/")
            if not feed_name:
                raise BadUpload("choose a feed")
            try:
                options, name = self.target(session.client, feed_name, filename, profile or None,
                                            fields.get("audience", "").strip() or None)
            except ApiError as exc:
                raise BadUpload(str(exc), exc.status) from None
            chosen["name"] = name
            return StagedFile(self.staging, options.max_file_bytes)

        form = FormStream(request.headers.get("content-type", ""), open_file)
        try:
            sha256 = await form.read(request.stream())
        except BadUpload as exc:
            return HTMLResponse(page.upload_form(session, self.targets(session.client), secrets.token_urlsafe(16),
                                                 str(exc)), exc.status)
        fields = form.fields
        feed_name, _, profile = fields["target"].partition("/")
        upload, _ = self.store_upload(session.client, feed_name, chosen["name"], profile or None,
                                      fields.get("upload_key") or None, None, form.staged, sha256)
        return RedirectResponse(f"/uploads/{upload.id}", 303)

    async def upload_outcome(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return RedirectResponse("/", 303)
        upload = self.visible_upload(session.client, request.path_params["upload_id"])
        rejects, added = [], []
        if upload.import_id is not None:
            rejects, added = await anyio.to_thread.run_sync(self._details, upload.import_id)
        return HTMLResponse(page.outcome(session, upload, upload_status(upload), rejects, added))

    def _details(self, import_id: int) -> tuple[list[tuple], list[tuple]]:
        """The import's first rejected rows and the members it added, through the analysts' views."""
        if self.workspace.lake_is_remote or not self.workspace.analytics.exists():
            return [], []
        con = duckdb.connect(str(self.workspace.analytics), read_only=True)
        try:
            rejects = con.execute("SELECT line_number, reason, raw FROM rejected_rows WHERE import_id = ? "
                                  "ORDER BY line_number LIMIT ?", [import_id, REJECTS_SHOWN]).fetchall()
            added = con.execute("SELECT audience_name, user_id FROM membership_events WHERE import_id = ? AND "
                                "action = 'qualify' ORDER BY ALL LIMIT ?", [import_id, MEMBERS_SHOWN]).fetchall()
        finally:
            con.close()
        return rejects, added


def execution_name(name: str, mime: str) -> str:
    """The file name of a document import's executions: its name, with the suffix of its mime type."""
    suffix = MIME_TYPES[mime][1]
    try:
        base = base_name(name)
    except BadUpload as exc:
        raise ApiError(400, f"name: {exc}") from None
    return base if base.lower().endswith(suffix) else base + suffix


def _document_import_data(row: dict) -> dict:
    return {"id": str(row["id"]), "datamart_id": row["datamart_id"], "document_type": DOCUMENT_TYPE,
            "mime_type": row["mime_type"], "encoding": row["encoding"], "name": row["name"],
            "creation_date": _millis(row["created_at"])}


def _execution_data(upload: Upload, doc: dict) -> dict:
    data = upload_data(upload)
    return {**data, "parent_id": str(doc["id"]), "datamart_id": doc["datamart_id"],
            "creation_date": _millis(upload.created_at), "start_date": _millis(upload.started_at),
            "end_date": _millis(upload.finished_at)}


async def _small_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise ApiError(413, f"the body is over {MAX_JSON_BYTES} bytes")
    return bytes(body)


async def _small_form(request: Request) -> dict[str, str]:
    if media_type(request)[0] != "application/x-www-form-urlencoded":
        raise ApiError(415, "the form must be sent as application/x-www-form-urlencoded")
    return dict(parse_qsl((await _small_body(request)).decode("utf-8", "replace")))


def _handler(method, html: bool = False):
    async def endpoint(request: Request) -> Response:
        try:
            return await method(request)
        except (ApiError, BadUpload) as exc:
            status = getattr(exc, "status", 400)
            if html:
                return HTMLResponse(page.message(str(exc)), status)
            response = error(status, str(exc))
            if status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="audience-pipeline"'
            return response
        except ClientDisconnect:
            log.info("%s %s: the client went away before the whole body arrived; nothing stored",
                     request.method, request.url.path)
            return Response(status_code=400)

    return endpoint


def create_app(workspace: Workspace) -> Starlette:
    """The server for ``workspace``: its upload store, and the worker that imports through the Runner."""
    from audience_pipeline.api.worker import ImportWorker
    from audience_pipeline.runner import Runner, instance_for

    store = UploadStore(workspace.resolve(workspace.config.api.database))
    runner = Runner(workspace, instance_for(workspace))
    worker = ImportWorker(runner, store)
    server = UploadServer(workspace, store, worker)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            store.close()

    mics = "/v1/datamarts/{datamart_id}/document_imports"
    routes = [
        Route("/", _handler(server.index, html=True), methods=["GET"]),
        Route("/signin", _handler(server.sign_in, html=True), methods=["POST"]),
        Route("/signout", _handler(server.sign_out, html=True), methods=["POST"]),
        Route("/upload", _handler(server.upload_page, html=True), methods=["POST"]),
        Route("/uploads/{upload_id}", _handler(server.upload_outcome, html=True), methods=["GET"]),
        Route(mics, _handler(server.post_document_import), methods=["POST"]),
        Route(mics + "/{document_import_id}/executions", _handler(server.post_execution), methods=["POST"]),
        Route(mics + "/{document_import_id}/executions/{execution_id}", _handler(server.get_execution),
              methods=["GET"]),
        Route("/api/feeds/{feed}/files", _handler(server.post_file), methods=["POST"]),
        Route("/api/imports/{upload_id}", _handler(server.get_import), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
