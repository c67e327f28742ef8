"""The upload page: plain server-rendered HTML, no JavaScript. Every value shown is escaped."""

from __future__ import annotations

from html import escape

from audience_pipeline.api.auth import Session
from audience_pipeline.api.store import Upload

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
label { display: block; margin: .8rem 0 .2rem; font-weight: 600; }
input, select, button { font-size: 1rem; padding: .3rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
td, th { border: 1px solid #ccc; padding: .2rem .6rem; text-align: left; }
.error { color: #a00; } .held { color: #a60; } .ok { color: #070; } .hint { color: #666; font-size: .9rem; }
header { display: flex; justify-content: space-between; align-items: center; }
"""


def _document(title: str, body: str, refresh: bool = False) -> str:
    meta = '<meta http-equiv="refresh" content="1">' if refresh else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _header(session: Session) -> str:
    return (f"<header><h1>Upload an audience file</h1><form method=post action=/signout>"
            f'<input type=hidden name=csrf value="{escape(session.csrf)}">'
            f"<span class=hint>signed in as {escape(session.client.name)}</span> "
            f"<button type=submit>Sign out</button></form></header>")


def message(text: str) -> str:
    return _document("audience-pipeline", f'<p class=error>{escape(text)}</p><p><a href="/">Back</a></p>')


def sign_in(csrf: str, problem: str | None) -> str:
    error = f'<p class=error role=alert>{escape(problem)}</p>' if problem else ""
    return _document("Sign in", f"""<h1>Sign in</h1>{error}
<form method=post action=/signin>
<input type=hidden name=csrf value="{escape(csrf)}">
<label for=token>API token</label><input id=token name=token type=password autocomplete=off required size=50>
<p><button type=submit>Sign in</button></p></form>""")


def upload_form(session: Session, targets: list[tuple[str, str]], upload_key: str, problem: str | None) -> str:
    error = f'<p class=error role=alert>{escape(problem)}</p>' if problem else ""
    options = "".join(f'<option value="{escape(value)}">{escape(label)}</option>' for value, label in targets)
    # the file input comes last: the server checks the other fields before it accepts any byte of the file
    return _document("Upload", f"""{_header(session)}{error}
<form method=post action=/upload enctype="multipart/form-data">
<input type=hidden name=csrf value="{escape(session.csrf)}">
<input type=hidden name=upload_key value="{escape(upload_key)}">
<label for=target>Feed (and Loymax profile: mode, identifier type, action)</label>
<select id=target name=target>{options}</select>
<label for=audience>Audience</label><input id=audience name=audience size=40>
<div class=hint>Loymax mode 1 (one audience for the whole file) when the feed sets none: the file's customers
go to this audience. Empty: the audience is named after the file.</div>
<label for=file>File</label><input id=file name=file type=file required>
<p><button type=submit>Upload</button></p></form>""")


def _counts_table(outcome: dict) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{'' if outcome.get(k) is None else outcome[k]}</td></tr>" for k in (
        "rows", "valid", "rejected", "duplicates", "unmatched", "qualified", "disqualified", "members"))
    return f"<table id=counts>{rows}</table>"


def outcome(session: Session, upload: Upload, statuses: tuple[str, str], rejects: list[tuple],
            added: list[tuple]) -> str:
    status, ours = statuses
    pending = upload.state in ("received", "running")
    head = (f"<h2>Upload {upload.id}: {escape(upload.file_name)} &rarr; {escape(upload.feed)}"
            f"{' (profile ' + escape(upload.profile) + ')' if upload.profile else ''}</h2>")
    css = "ok" if status == "SUCCEEDED" else "held" if status == "HELD" else "error" if status == "FAILED" else ""
    body = [head, f'<p>Status: <strong id=status class="{css}">{escape(ours)}</strong>'
                  f"{' &mdash; this page refreshes until the import is done' if pending else ''}</p>"]
    error = upload.error or (upload.outcome or {}).get("error")
    if error and not pending:
        body.append(f'<p id=reason class="{css or "error"}">{escape(error)}</p>')
    if upload.outcome:
        body.append(f"<p>Import {upload.import_id}; audiences: "
                    f"{escape(', '.join(upload.outcome.get('audiences') or [])) or 'none'}</p>")
        body.append(_counts_table(upload.outcome))
    if rejects:
        lines = "".join(f"<tr><td>{n}</td><td>{escape(str(reason))}</td><td><code>{escape(str(raw))}</code></td></tr>"
                        for n, reason, raw in rejects)
        body.append(f"<h3>First rejected rows</h3><table id=rejects><tr><th>line</th><th>reason</th><th>row</th>"
                    f"</tr>{lines}</table>")
    if added:
        lines = "".join(f"<tr><td>{escape(str(a))}</td><td>{escape(str(u))}</td></tr>" for a, u in added)
        body.append(f"<h3>Members it added</h3><table id=added><tr><th>audience</th><th>user id</th></tr>{lines}"
                    "</table>")
    body.append('<p><a href="/">Upload another file</a></p>')
    return _document(f"Upload {upload.id}", _header(session) + "".join(body), refresh=pending)
