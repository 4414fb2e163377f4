"""What the terminal shows of Prefect's logs (``flows/logging.yml`` installs the filter).

Prefect logs a line per task and flow run as it finishes ("Finished in state
Completed()"), a "View at http://127.0.0.1:PORT/runs/..." link per flow run (dead once
the temporary server of a ``kface run`` stops) and a banner when a temporary server
starts or stops. Our stages log one line each with what they did, so these are noise on
the terminal; the Prefect UI still receives them. Failures are never dropped here.
"""

from __future__ import annotations

import logging
from pathlib import Path

LOGGING_CONFIG = Path(__file__).with_name("logging.yml")
ROUTINE = ("Finished in state Completed(", "Finished in state Cached(", "View at http",
           "Starting temporary server on", "Stopping temporary server on")


class QuietConsole(logging.Filter):
    """Drops Prefect's routine lines (``ROUTINE``) from the console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(text) for text in ROUTINE)


class UserErrorFilter(logging.Filter):
    """Drops Prefect's log records (tracebacks, 'Finished in state Failed') about errors
    that the CLI reports in one line anyway (``kface --debug`` keeps them)."""

    def __init__(self, types: tuple[type[BaseException], ...]):
        super().__init__()
        self.types, self.names = types, tuple(t.__name__ for t in types)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, self.types):
            return False
        message = record.getMessage()
        return not (("Finished in state Failed" in message
                     or "exception during execution" in message
                     or "failed with exception" in message)
                    and any(name in message for name in self.names))


def quiet_user_errors(types: tuple[type[BaseException], ...]) -> None:
    """Install ``UserErrorFilter`` for ``types`` on Prefect's run loggers."""
    quiet = UserErrorFilter(types)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(quiet)
