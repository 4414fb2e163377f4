"""``kface dashboard``: a web page of the visitors store's counts, served by kface itself
(Python's ``http.server``: nothing to install, nothing fetched from the internet; the
page's script and style ship in ``inference/static/``).

Routes: ``/`` the page; ``/api/counts?day=YYYY-MM-DD&period=hour|day|week&camera=NAME``
the counts (``inference.shop_counts.shop_counts``, JSON, docs/data-contracts.md);
``/api/counts.csv?...`` the same as CSV; ``/static/...`` the page's files. Bound to
127.0.0.1 by default; bound to any other address it requires a token (``?token=`` on the
page's address, which the page passes on, or ``Authorization: Bearer TOKEN``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import mimetypes
import threading
from datetime import date
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from inference.shop_counts import CountsError, counts_csv, shop_counts
from inference.store import Store, short_error

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("kface.dashboard")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: Store, token: str | None = None,
                 reference: Path | None = None, tz: str | None = None):
        self.store, self.token, self.reference, self.tz = store, token, reference, tz
        self.lock = threading.Lock()  # one estimate at a time: 2 cores, and the cache
        super().__init__(address, DashboardHandler)


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "kface-dashboard"

    def log_message(self, format: str, *args) -> None:  # no tokens in logs
        log.debug("%s %s", self.address_string(), self.path.split("?")[0])

    def _send(self, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _allowed(self, query: dict) -> bool:
        token = self.server.token
        if not token:
            return True
        given = query.get("token", [""])[0]
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[7:]
        return hmac.compare_digest(given.encode(), token.encode())

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if not self._allowed(query):
            self._error(HTTPStatus.UNAUTHORIZED, "this dashboard needs its token: open the "
                        "address kface dashboard printed (…?token=…)")
            return
        if url.path in ("/", "/index.html"):
            self._file(STATIC / "dashboard.html")
        elif url.path.startswith("/static/"):
            name = url.path[len("/static/"):]
            path = (STATIC / name).resolve()
            if STATIC.resolve() not in path.parents or not path.is_file():
                self._error(HTTPStatus.NOT_FOUND, f"no file {name}")
                return
            self._file(path)
        elif url.path in ("/api/counts", "/api/counts.csv"):
            self._counts(query, csv=url.path.endswith(".csv"))
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def _file(self, path: Path) -> None:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, path.read_bytes(), kind + "; charset=utf-8"
                   if kind.startswith("text/") or kind.endswith("javascript") else kind)

    def _counts(self, query: dict, csv: bool) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            day = date.fromisoformat(query.get("day", [date.today().isoformat()])[0])
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "day: give YYYY-MM-DD")
            return
        period = query.get("period", ["hour"])[0]
        camera = query.get("camera", [""])[0] or None
        try:
            with self.server.lock:
                counts = shop_counts(self.server.store, day, period, camera,
                                     self.server.reference, self.server.tz)
        except CountsError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        except SQLAlchemyError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"store: {short_error(exc)}")
            return
        if csv:
            name = f"kface-{day.isoformat()}-{period}{'-' + camera if camera else ''}.csv"
            self._send(HTTPStatus.OK, counts_csv(counts).encode(), "text/csv; charset=utf-8",
                       {"Content-Disposition": f'attachment; filename="{name}"'})
        else:
            self._send(HTTPStatus.OK, json.dumps(counts).encode(), "application/json")


def serve_dashboard(store: Store, host: str = "127.0.0.1", port: int = 8765,
                    token: str | None = None, reference: Path | None = None,
                    tz: str | None = None) -> DashboardServer:
    """The dashboard's server, bound (``serve_forever`` runs it)."""
    return DashboardServer((host, port), store, token, reference, tz)
