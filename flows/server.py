"""Make sure a Prefect API is reachable for the whole run, workers included.

With no ``PREFECT_API_URL`` configured, Prefect's ephemeral mode starts a temporary server
in *every* process that talks to the API, so each spawned worker of the process pool
started its own (measured ~4x slower than a shared server). ``prefect_api()`` starts one
temporary local server (SQLite in ``PREFECT_HOME``, 127.0.0.1, free port) for the run and
exports its URL, so the spawned workers inherit it. If an API URL is configured (a
``kface server``/``prefect server start`` or Prefect Cloud), it is used unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect waits 20 s for a temporary server. Its first start in a new PREFECT_HOME migrates
# the database: 18 s on this 2-core machine when idle, 62 s with three busy processes per
# core (measured), and over 120 s once in CI. So wait up to 300 s, and start a second
# server once if the first never answers.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
START_ATTEMPTS = 2


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not answer; the message says what to do."""


def server_env(host: str, port: int) -> dict[str, str]:
    """The environment of ``kface server``'s ``prefect server start``: host and port as
    settings, not flags (the UI derives the API address it calls from them)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_UI_API_URL", None)
    env.pop("PREFECT_API_URL", None)
    return env


@contextmanager
def prefect_api(warm_up: Callable[[], object] | None = None) -> Iterator[str]:
    """Yield the API URL in use, starting a temporary local server if none is configured.

    ``warm_up`` (e.g. importing the flow's modules) runs while the server starts, in this
    thread; the server's start-up (a few seconds) then costs no extra wall time.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        if warm_up:
            warm_up()
        yield str(configured)
        return
    from prefect.server.api.server import SubprocessASGIServer

    if threading.current_thread() is threading.main_thread():
        # a plain `kill` (SIGTERM) unwinds this context, so the server is stopped too
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    server = SubprocessASGIServer()
    failure: list[BaseException] = []

    def start() -> None:
        nonlocal server
        for attempt in range(START_ATTEMPTS):
            try:
                server.start()
                return
            except BaseException as exc:  # re-raised in the caller's thread
                server.stop()  # a server that never answered: a fresh one, new port
                if attempt + 1 == START_ATTEMPTS or not isinstance(exc, RuntimeError):
                    failure.append(exc)
                    return
                server = SubprocessASGIServer()

    starter = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    starter.start()
    try:
        if warm_up:
            warm_up()
    finally:
        starter.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, RuntimeError):
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

            wait = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
            raise ServerStartError(
                f"the temporary Prefect server did not answer in {wait} s, twice "
                f"({str(exc).split('.')[0]}): start one with `kface server` and set "
                "PREFECT_API_URL, or allow longer with "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") from exc
        raise exc
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # ship the last log lines before the server stops
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        server.stop()
