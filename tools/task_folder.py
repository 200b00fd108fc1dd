"""Write the folder current TransformerLab (0.40.1) adds a task from: `lab task add`, `lab task edit --from-dir`
and the web UI's folder upload.

Why not the repository itself: TransformerLab keeps a task's own record in the task's index.json, and its
create_task_from_zip_path (api/transformerlab/services/task_service.py, v0.40.1) writes that record, then copies
the uploaded files over it. The repo root's index.json, the legacy gallery's manifest, would replace the record:
the task vanishes from `lab task list` and its queue refuses model_name and dataset_name.

The folder holds what a run needs (index.json's `files`: main.py, setup.sh, requirements.txt, info.md,
plugin_utils/), README.md, task.yaml as tools/task_yaml.py renders it (without `github_repo_url`: the code
travels with the folder), and index.json itself under the name plugin_utils/params.py reads first
(plugin_manifest.json), never as index.json. index.json at the repo root stays the one home of the schema.

It needs Python alone, as the machine `lab` runs on may have nothing else (`make task-folder` installs nothing):
without PyYAML, task.yaml is the repository's own (which tests/test_task_yaml.py keeps equal to what index.json
renders), less its `github_repo_url` line.

`python tools/task_folder.py [DEST]` (default dist/task) writes the folder afresh; `--check [DEST]` exits 1,
naming each file that differs from what the repository gives now (a folder written before index.json or the code
changed). Python's __pycache__ folders, which running the folder's main.py leaves, are neither written nor checked.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugin_utils.params import TASK_FOLDER_MANIFEST  # noqa: E402

DEFAULT_DEST = ROOT / "dist" / "task"
ALSO = ("README.md",)  # for whoever opens the task's files; a run does not need it


def _members(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def task_yaml(manifest: dict) -> str:
    """The folder's task.yaml: without `github_repo_url`, as the code travels with the folder."""
    try:
        from tools.task_yaml import render
    except ImportError:  # no PyYAML here: the repository's task.yaml is the same rendering
        text = (ROOT / "task.yaml").read_text(encoding="utf-8")
        return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("github_repo_url:"))
    return render({**manifest, "git": ""})


def contents() -> dict[str, bytes]:
    """Every file of the task folder, by its path inside the folder."""
    raw = (ROOT / "index.json").read_bytes()
    manifest = json.loads(raw)
    files = {
        TASK_FOLDER_MANIFEST.name: raw,
        "task.yaml": task_yaml(manifest).encode(),
    }
    for name in (*manifest["files"], *ALSO):
        for member in _members(ROOT / name):
            files[member.relative_to(ROOT).as_posix()] = member.read_bytes()
    return files


def write(dest: Path) -> None:
    """Replace `dest` with the task folder; a folder this script did not write is never removed."""
    if dest.exists():
        if any(dest.iterdir()) and not (dest / TASK_FOLDER_MANIFEST.name).is_file():
            raise SystemExit(f"{dest} exists and is not a task folder this script wrote: choose another folder")
        shutil.rmtree(dest)
    for relative, data in contents().items():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        source = ROOT / relative
        if source.is_file() and source.stat().st_mode & stat.S_IXUSR:
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def differences(dest: Path) -> list[str]:
    """What `dest` holds that a fresh task folder would not, one line each; empty when it is current."""
    expected = contents()
    found = {
        p.relative_to(dest).as_posix(): p
        for p in (dest.rglob("*") if dest.is_dir() else ())
        if p.is_file() and "__pycache__" not in p.parts
    }
    lines = [f"missing: {name}" for name in sorted(set(expected) - set(found))]
    lines += [f"not in the repository: {name}" for name in sorted(set(found) - set(expected))]
    lines += [
        f"out of date: {name}"
        for name in sorted(set(expected) & set(found))
        if found[name].read_bytes() != expected[name]
    ]
    return lines


def main(argv: list[str]) -> int:
    check = "--check" in argv
    rest = [a for a in argv if a != "--check"]
    dest = Path(rest[0]).resolve() if rest else DEFAULT_DEST
    if check:
        stale = differences(dest)
        for line in stale:
            sys.stderr.write(f"{dest}: {line}\n")
        if stale:
            sys.stderr.write("the task folder differs from the repository: run `make task-folder`\n")
        return 1 if stale else 0
    write(dest)
    sys.stderr.write(f"wrote {dest}: add it with `lab task add {dest}` or upload it in the web UI\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
