"""Log output: readable lines on a terminal, or one JSON object per line (`--log-json`)."""

from __future__ import annotations

import datetime
import json
import logging
import sys


class JsonLines(logging.Formatter):
    """A log record as one JSON object: time (UTC, ISO 8601), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, json_lines: bool = False) -> None:
    """One line per event on stderr, tagged with its component's logger (`sharedllm.mesh`,
    `sharedllm.engine.llama-server`, ...): as text, or as JSON objects with `--log-json`."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    for noisy in ("httpx", "httpcore", "hpack", "multiaddr", "libp2p", "async_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
