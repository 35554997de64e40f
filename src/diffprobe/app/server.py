"""``diffprobe inspect``: a local web inspector on Python's own ``http.server``.

Why the standard library and not Streamlit, Gradio or Flask: it adds no dependency, sends no
telemetry, loads nothing from a CDN and binds exactly the address it is given (Streamlit listens
on every interface and reports usage by default; Gradio pulls fonts from the network); the pages
are static HTML with a little JavaScript (``static/``), and the server answers a handful of
JSON and PNG requests, so tests drive it with a plain HTTP client or a real browser.

Routes (all GET but the label POST):
``/`` and ``/static/<name>``: the pages; ``/api/runs``: runs and stages;
``/files/<run>/<path>``: a file inside run ``<run>`` (checked by :mod:`diffprobe.app.safety`);
``/api/anomalies``, ``/api/normmap.png``, ``POST /api/labels``: the labelling tool;
``/api/features``, ``/api/activity``, ``/api/top``, ``/api/item.png``, ``/api/dreams``,
``/api/priors``: the feature browser.
"""

from __future__ import annotations

import json
import mimetypes
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from diffprobe.app.safety import Refused, check_bind
from diffprobe.app.views import RunRef, Views

STATIC = Path(__file__).with_name("static")
PAGES = {"index.html", "app.js", "style.css"}
# The pages load only from this server: no other origin, no inline script.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
SAFE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
              ".json": "application/json", ".csv": "text/csv; charset=utf-8",
              ".txt": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8"}  # fmt: skip
MAX_BODY = 1 << 20


class Handler(BaseHTTPRequestHandler):
    server_version = "diffprobe-inspect"
    sys_version = ""
    views: Views  # set on the subclass made by make_server
    quiet = True

    def log_message(self, format: str, *args: Any) -> None:
        if not self.quiet:
            sys.stderr.write("inspect: " + format % args + "\n")

    # ------------------------------------------------------------- answers

    def _send(self, status: int, body: bytes, kind: str, cache: bool = False) -> None:
        try:
            self._answer(status, body, kind, cache)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away (a page changed before its images came)

    def _answer(self, status: int, body: bytes, kind: str, cache: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, reason: str) -> None:
        self._json({"error": reason}, status)

    # ------------------------------------------------------------- routing

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._route_get()
        except Refused as refused:
            self._error(refused.status, refused.reason)
        except UnicodeDecodeError:
            self._error(403, "bad encoding in path")
        except Exception as err:  # one bad request must not stop the server
            self._error(500, f"{type(err).__name__}: {err}")

    def do_POST(self) -> None:
        try:
            if urlsplit(self.path).path != "/api/labels":
                raise Refused(404, "no such page")
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                raise Refused(400, "a label request is a JSON body under 1 MB")
            try:
                body = json.loads(self.rfile.read(length))
            except json.JSONDecodeError:
                raise Refused(400, "the body is not JSON") from None
            if not isinstance(body, dict):
                raise Refused(400, "the body is a JSON object")
            scores = self.views.save_labels(body.get("run"), body.get("stage"), str(body.get("key")),
                                            body.get("item"), body.get("groups") or [])  # fmt: skip
            self._json(scores)
        except Refused as refused:
            self._error(refused.status, refused.reason)
        except Exception as err:
            self._error(500, f"{type(err).__name__}: {err}")

    def _route_get(self) -> None:
        parts = urlsplit(self.path)
        raw = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        views = self.views
        if raw in ("/", "/index.html"):
            return self._static("index.html")
        if raw.startswith("/static/"):
            return self._static(unquote(raw.removeprefix("/static/")))
        if raw.startswith("/files/"):
            run, _, relative = raw.removeprefix("/files/").partition("/")
            path = views.file(run, relative)
            kind = SAFE_TYPES.get(path.suffix.lower(), "application/octet-stream")
            return self._send(200, path.read_bytes(), kind)
        if raw == "/api/runs":
            return self._json(views.listing())
        if raw == "/api/anomalies":
            return self._json(views.anomalies(query.get("run"), query.get("stage")))
        if raw == "/api/normmap.png":
            png = views.norm_png(query.get("run"), query.get("stage"), query.get("key", ""),
                                 query.get("item"))  # fmt: skip
            return self._send(200, png, "image/png", cache=True)
        if raw == "/api/features":
            return self._json(views.feature_axes(query.get("run"), query.get("stage")))
        if raw == "/api/activity":
            return self._json(views.activity(query.get("run"), query.get("stage"),
                                             query.get("site", ""), query.get("condition", "")))  # fmt: skip
        if raw == "/api/top":
            return self._json(views.top_items(
                query.get("run"), query.get("stage"), query.get("site", ""),
                query.get("condition", ""), _int(query.get("channel")), _int(query.get("noise")),
                window=query.get("window") or None,
            ))  # fmt: skip
        if raw == "/api/dreams":
            return self._json(views.dreams(_int(query.get("channel")), query.get("site"),
                                           query.get("kind") or None))  # fmt: skip
        if raw == "/api/priors":
            return self._json(views.priors(_int(query.get("channel")), query.get("site") or None))
        if raw == "/api/item.png":
            png = views.item_png(query.get("run"), query.get("stage"), query.get("item"))
            return self._send(200, png, "image/png", cache=True)
        raise Refused(404, "no such page")

    def _static(self, name: str) -> None:
        if name not in PAGES:
            raise Refused(404, "no such page")
        kind = mimetypes.guess_type(name)[0] or "text/plain"
        self._send(200, (STATIC / name).read_bytes(), f"{kind}; charset=utf-8")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Refused(400, f"expected a whole number, got {value!r}") from None


def make_server(runs: list[RunRef], host: str = "127.0.0.1", port: int = 8765, *,
                allow_remote: bool = False, quiet: bool = True) -> ThreadingHTTPServer:  # fmt: skip
    """A server (not yet serving) for ``runs``; ``port`` 0 picks a free one. A non-loopback
    ``host`` is refused unless ``allow_remote`` (then a warning goes to stderr)."""
    warning = check_bind(host, allow_remote)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    handler = type("BoundHandler", (Handler,), {"views": Views(runs), "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Serve in a daemon thread (tests, notebooks); ``server.shutdown()`` stops it (within
    50 ms: the serving loop checks for shutdown that often, not every 0.5 s)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="diffprobe-inspect", daemon=True)  # fmt: skip
    thread.start()
    return thread


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
