"""The checkpoints folder, which parent and ranks share: it holds `checkpoint-N` folders and nothing else, and
each of them is complete. The ranks save into a staging folder elsewhere (the run's own folder), and the first
rank moves a save into the checkpoints folder in one rename once every rank has written its part, so a save
cut off by SIGKILL (a task host's Stop, 3 s after its SIGTERM) is never taken for a checkpoint. Each
checkpoint carries `run_params.json`, the identity of the run that saved it, which a resume is compared with.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

from .runfolder import IDENTITY_FILE

PREFIX = "checkpoint-"


def step_of(path: str) -> int:
    return int(os.path.basename(path.rstrip(os.sep)).removeprefix(PREFIX))


def listed(folder: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N folder in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.listdir(folder):
        step = entry.removeprefix(PREFIX)
        if entry.startswith(PREFIX) and step.isdigit() and os.path.isdir(os.path.join(folder, entry)):
            found.append((int(step), os.path.join(folder, entry)))
    return sorted(found)


def is_complete(path: str, world_size: int = 1) -> bool:
    """A finished save: trainer_state.json (written last by the first rank) parses, and every rank's RNG state
    is there."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    if world_size > 1:
        return all(os.path.isfile(os.path.join(path, f"rng_state_{rank}.pth")) for rank in range(world_size))
    return True


def complete(folder: str, world_size: int = 1) -> list[str]:
    """The complete checkpoints of `folder`, oldest first."""
    return [path for _, path in listed(folder) if is_complete(path, world_size)]


def latest(folder: str, world_size: int = 1) -> str | None:
    """The newest complete checkpoint; a save cut off midway (by an older version) is skipped."""
    found = complete(folder, world_size)
    return found[-1] if found else None


def publish(staged: str, checkpoint_dir: str, identity_file: str | None) -> str:
    """Move a finished save from staging into the checkpoints folder in one rename (the identity written into
    it first). An older folder of the same step (a save cut off by an earlier run) is replaced."""
    if identity_file and os.path.isfile(identity_file):
        shutil.copyfile(identity_file, os.path.join(staged, IDENTITY_FILE))
    os.makedirs(checkpoint_dir, exist_ok=True)
    final = os.path.join(checkpoint_dir, os.path.basename(staged.rstrip(os.sep)))
    if os.path.exists(final):
        shutil.rmtree(final)
    try:
        os.replace(staged, final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # staging on another filesystem: copy beside the target, then rename
            raise
        hidden = os.path.join(checkpoint_dir, f".{os.path.basename(final)}.copying")
        shutil.rmtree(hidden, ignore_errors=True)
        shutil.copytree(staged, hidden)
        os.replace(hidden, final)
        shutil.rmtree(staged, ignore_errors=True)
    return final


def rotate(checkpoint_dir: str, keep: int, world_size: int = 1) -> list[str]:
    """Keep the newest `keep` complete checkpoints (0 or less: all); returns the removed ones."""
    if keep <= 0:
        return []
    found = complete(checkpoint_dir, world_size)
    removed = found[: max(0, len(found) - keep)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
