"""Progress events: rank 0 appends JSON lines to a file in the run folder; the parent tails it.

Only the parent talks to the host, so the host's job files (read-modify-write, no lock) have one writer.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

SPEC_FILE = "spec.json"
EVENTS_FILE = "events.jsonl"
STOP_FILE = "STOP"


def process_start() -> float:
    """When this process started (epoch seconds): start-up stages are timed from it, in parent and ranks."""
    import psutil

    return psutil.Process().create_time()


def error_file(run_dir: str, rank: int) -> str:
    """Where a failing rank leaves its exception for the parent."""
    return os.path.join(run_dir, f"error-rank{rank}.txt")


class EventWriter:
    def __init__(self, path: str):
        self._handle = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the rank

    def emit(self, kind: str, **fields: Any) -> None:
        self._handle.write(json.dumps({"type": kind, "time": time.time(), **fields}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class EventReader:
    """Reads whole new lines since the last call; a half-written last line waits for the next read."""

    def __init__(self, path: str):
        self.path = path
        self._offset = 0
        self._pending = b""

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        events = []
        for line in lines:
            if line.strip():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events
