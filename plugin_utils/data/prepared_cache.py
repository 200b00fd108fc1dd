"""The prepared-data cache: a folder of prepared datasets, one per key, shared by every run on the machine.

    <root>/<key>/               a prepared dataset, published whole by one rename (stats.json is in it)
    <root>/<key>.tmp-<pid>-*/   a preparation under way; renamed to <key> when done

Each folder holds in_use.lock: a run reading the folder (or building it) holds a shared lock on it for its whole
life, and a folder is removed only under an exclusive one, so nothing in use is ever removed. The cache keeps the
SFT_PREPARED_CACHE_KEEP most recently used datasets, at most SFT_PREPARED_CACHE_MAX_GIB in all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidConfig, problem
from ..machine import GIB

log = logging.getLogger("sft")

DEFAULT_KEEP = 20
DEFAULT_MAX_GIB = 20.0
IN_USE = "in_use.lock"
STAGING = ".tmp-"
# A staging folder nobody holds is removed once it is this old (younger, its preparation may be starting).
STALE_STAGING_S = 3600
# Lock descriptors held until this process exits: the prepared folders this run reads.
_held: list[int] = []


def cache_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "sft_trainer_trl", "prepared")
    return os.environ.get("SFT_PREPARED_CACHE", default)


@dataclass(frozen=True)
class CacheBounds:
    entries: int
    bytes: int


def _env_number(name: str, default: float, kind: type, what: str) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise InvalidConfig([problem(name, f"{raw!r} is not {what}", f"Set it to one, or unset it for {default:g}")])
    return value


def cache_bounds() -> CacheBounds:
    """How much the cache keeps: the SFT_PREPARED_CACHE_KEEP most recently used datasets, at most
    SFT_PREPARED_CACHE_MAX_GIB in all, whichever is smaller."""
    entries = _env_number("SFT_PREPARED_CACHE_KEEP", DEFAULT_KEEP, int, "a whole number of datasets above 0")
    gib = _env_number("SFT_PREPARED_CACHE_MAX_GIB", DEFAULT_MAX_GIB, float, "a size in GiB above 0")
    return CacheBounds(entries, int(gib * GIB))


def _lock(folder: Path, exclusive: bool) -> int | None:
    """A lock on folder's in_use.lock, checked to be still at that path once taken (a remover may have moved
    the folder away meanwhile): its descriptor, or None when the folder is gone or (exclusive) in use."""
    try:
        fd = os.open(folder / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        if os.path.samestat(os.fstat(fd), os.stat(folder / IN_USE)):
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _remove(folder: Path) -> bool:
    """Remove a folder nobody holds: moved away from its name at once, then deleted. False when it is in use
    or already gone (a concurrent remover took it)."""
    try:
        fd = _lock(folder, exclusive=True)
    except PermissionError:  # a cache this user may only read
        return False
    if fd is None:
        return False
    trash = folder.with_name(f"{folder.name}{STAGING}removed-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _size(folder: Path) -> int:
    total = 0
    for top, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(top, name)).st_size
    return total


class PreparedCache:
    """Use a prepared dataset, publish a new one, and evict the least recently used beyond the bounds."""

    def __init__(self, root: Path, bounds: CacheBounds):
        self.root = root
        self.bounds = bounds
        self._building: dict[Path, int | None] = {}  # staging folder -> the lock held on it while it is built

    @classmethod
    def from_env(cls) -> PreparedCache:
        """The cache SFT_PREPARED_CACHE names (default ~/.cache/sft_trainer_trl/prepared), with its bounds: a bad
        bound is an error before any work."""
        return cls(Path(cache_root()), cache_bounds())

    def path(self, key: str) -> Path:
        return self.root / key

    def use(self, key: str) -> dict[str, Any] | None:
        """The statistics of the complete prepared dataset `key`, now held in use by this process and marked as
        just used; None when there is none."""
        folder = self.path(key)
        if not (folder / "stats.json").is_file():
            return None
        try:
            fd = _lock(folder, exclusive=False)
        except PermissionError:  # a cache this user may only read: usable, not marked
            return json.loads((folder / "stats.json").read_text())
        if fd is None:
            return None
        try:
            stats = json.loads((folder / "stats.json").read_text())
            os.utime(folder / "stats.json")  # its last use (the folder's own time moves with what is created in it)
        except FileNotFoundError:
            os.close(fd)
            return None
        _held.append(fd)
        return stats

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[Path]:
        """A staging folder for `key`'s dataset, held while it is built (evictors leave it alone) and removed
        afterwards, unless `publish` gave it the key."""
        self.root.mkdir(parents=True, exist_ok=True)
        # Named first and made inside the try: a stop raised from a signal handler the moment the folder exists
        # (a SIGTERM can land between mkdtemp's mkdir and its return) still removes it.
        staging = self.root / f"{key}{STAGING}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir(mode=0o700)
            self._building[staging] = _lock(staging, exclusive=False)
            yield staging
        finally:
            fd = self._building.pop(staging, None)
            if fd is not None:
                os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, staging: Path, key: str) -> dict[str, Any]:
        """Give the finished staging folder its key in one rename, so that no half-written folder is ever under
        the key. When an identical preparation published first, its folder is used and this one dropped: a
        published folder is never replaced, as another run may be reading it. Returns the statistics of the
        dataset now under the key, which this process holds in use."""
        target = self.path(key)
        for _ in range(10):
            try:
                os.rename(staging, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            else:
                fd = self._building.pop(staging, None)
                if fd is not None:
                    _held.append(fd)  # the lock moved with the folder: ours, in use until this process exits
                return json.loads((target / "stats.json").read_text())
            stats = self.use(key)
            if stats is not None:
                return stats
            # A folder at the key with no complete dataset in it (or one just removed): nobody reads it.
            _remove(target)
        raise RuntimeError(f"could not publish the prepared dataset at {target}")

    def evict(self, using: str) -> None:
        """Remove the least recently used prepared datasets beyond the bounds, and staging folders that nobody
        holds any more (a preparation that was killed). `using` (this run's) and every folder another process
        holds stay, and count; folders a concurrent evictor removes first are skipped."""
        entries = []
        now = time.time()
        keep = self.path(using)
        for folder in self.root.iterdir() if self.root.is_dir() else []:
            try:
                info = folder.stat()
            except FileNotFoundError:
                continue
            if not folder.is_dir() or folder.name.startswith(".") or folder == keep:
                continue
            if STAGING in folder.name:
                if now - info.st_mtime > STALE_STAGING_S:
                    _remove(folder)
                continue
            # Last used: stats.json's time (see `use`), never the folder's, which taking a lock in it may move.
            # Without stats.json it holds no dataset: first to go.
            try:
                used = (folder / "stats.json").stat().st_mtime
            except FileNotFoundError:
                used = 0.0
            entries.append((used, folder))
        count, size, full = 1, _size(keep), False
        for _, folder in sorted(entries, reverse=True):
            folder_size = _size(folder)
            full = full or count >= self.bounds.entries or size + folder_size > self.bounds.bytes
            if full and _remove(folder):
                log.info("data: removed the least recently used prepared dataset %s", folder)
                continue
            count, size = count + 1, size + folder_size
