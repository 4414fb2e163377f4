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
