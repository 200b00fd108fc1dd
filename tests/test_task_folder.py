"""The task folder (tools/task_folder.py, `make task-folder`): what current TransformerLab adds from a folder.

TransformerLab 0.40.1 adds a folder (`lab task add`, `lab task edit --from-dir`, the web UI's upload) through
TaskService.create_task_from_zip_path (api/transformerlab/services/task_service.py at v0.40.1): it parses the
folder's task.yaml (routers/experiment/task.py, _parse_yaml_to_task_data), writes the task's record
(TaskTemplate.create + set_metadata: `<task dir>/index.json`), copies the folder's files over the task dir
(lab.storage.copy_dir) and sets `file_mounts`. A run's setup then copies the task dir, record included, into the
run's working directory beside main.py (lab.copy_file_mounts, lab SDK 0.1.46). `_upload` below does those steps
with the real lab SDK on a temporary workspace; only the API server is missing (it is not installed here, nor is
the `lab` CLI, transformerlab-cli), so its few lines of glue are restated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, base_config, last_json, write_config
from tests.task_host import EXPERIMENT, make_lab_job

TOOL = ROOT / "tools" / "task_folder.py"
COPY = "plugin_manifest.json"

# create_task_from_zip_path (task_service.py, v0.40.1) with _parse_yaml_to_task_data's mapping of our task.yaml's
# keys, run through the lab SDK as the server runs it. Prints the task's id and what the experiment lists.
UPLOAD = """
import asyncio, json, os, sys, tempfile, uuid, zipfile
import pytest
import yaml
from lab import storage
from lab.task_template import TaskTemplate
from werkzeug.utils import secure_filename

folder, experiment = sys.argv[1], sys.argv[2]

async def main():
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "task.zip")
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:  # the CLI's zip of the folder
            for root, _dirs, names in os.walk(folder):
                for name in names:
                    zf.write(os.path.join(root, name), os.path.relpath(os.path.join(root, name), folder))
        extracted = os.path.join(tmp, "x")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(extracted)
        task_yaml = next(os.path.join(r, n) for r, _d, ns in os.walk(extracted) for n in ns if n == "task.yaml")
        spec = yaml.safe_load(open(task_yaml, encoding="utf-8"))
        data = {"name": secure_filename(spec["name"]), "setup": spec["setup"], "run": spec["run"],
                "parameters": spec["parameters"], "experiment_id": experiment}
        data.setdefault("type", "REMOTE")
        data.setdefault("plugin", "remote_orchestrator")
        task_id = str(uuid.uuid4())
        task = await TaskTemplate.create(task_id, experiment_id=experiment)
        await task.set_metadata(**data)
        task_dir = await task.get_dir()
        await storage.makedirs(task_dir, exist_ok=True)
        await storage.copy_dir(os.path.dirname(task_yaml), task_dir)
        task = await TaskTemplate.get(task_id, experiment_id=experiment)
        await task.set_metadata(file_mounts=True)
        listed = await TaskTemplate.list_by_experiment(experiment)
        print(json.dumps({"id": task_id, "dir": task_dir, "listed": listed}, default=str))

asyncio.run(main())
"""

COPY_FILE_MOUNTS = "from lab import lab; lab.copy_file_mounts()"  # what a task's setup runs first (0.40.1)


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)


def _upload(folder: Path, home: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", UPLOAD, str(folder), EXPERIMENT],
        capture_output=True,
        text=True,
        env={**os.environ, "TFL_HOME_DIR": str(home)},
        check=True,
    )
    return last_json(proc.stdout)


def _check_from(folder: Path, config: str) -> subprocess.CompletedProcess:
    """`python main.py --check --json` with the folder as the working directory and its own copy of the code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "main.py", "--config", config, "--check", "--json"],
        capture_output=True,
        text=True,
        cwd=str(folder),
        env=env,
        timeout=120,
    )


def _manifest_read_in(folder: Path) -> str:
    script = "from plugin_utils import params; print(params.MANIFEST)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=folder, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_folder_holds_the_code_task_yaml_and_the_manifest_copy_but_no_index_json(tmp_path):
    folder = tmp_path / "task"
    assert _tool(str(folder)).returncode == 0
    top = {p.name for p in folder.iterdir()}
    assert top == {"main.py", "setup.sh", "requirements.txt", "info.md", "README.md", "plugin_utils", "task.yaml", COPY}
    assert (folder / COPY).read_bytes() == (ROOT / "index.json").read_bytes()
    task = yaml.safe_load((folder / "task.yaml").read_text())
    assert task["parameters"] == yaml.safe_load((ROOT / "task.yaml").read_text())["parameters"]
    assert "github_repo_url" not in task, "the code travels with the folder"
    assert not list(folder.rglob("__pycache__"))
    assert os.access(folder / "setup.sh", os.X_OK)
    # The legacy gallery still finds its manifest at the repo root, and the repository reads it.
    assert "parameters" in json.loads((ROOT / "index.json").read_text())
    assert not (ROOT / COPY).exists()
    assert _manifest_read_in(ROOT) == str(ROOT / "index.json")


def test_check_fails_while_the_folder_differs_from_the_repository(tmp_path):
    folder = tmp_path / "task"
    _tool(str(folder))
    assert _tool("--check", str(folder)).returncode == 0
    manifest = json.loads((folder / COPY).read_text())
    manifest["parameters"]["lora_r"]["default"] = 8  # a copy left from an older index.json
    (folder / COPY).write_text(json.dumps(manifest))
    shutil.copy(ROOT / "index.json", folder / "index.json")
    (folder / "plugin_utils" / "params.py").unlink()
    proc = _tool("--check", str(folder))
    assert proc.returncode == 1
    for line in (f"out of date: {COPY}", "not in the repository: index.json", "missing: plugin_utils/params.py"):
        assert line in proc.stderr
    assert _tool(str(folder)).returncode == 0 and _tool("--check", str(folder)).returncode == 0


def test_writing_never_removes_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    proc = _tool(str(tmp_path))
    assert proc.returncode != 0 and "not a task folder" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_an_uploaded_folder_keeps_its_task_record_and_its_runs_read_the_manifest_copy(tmp_path, tiny_model):
    folder, home = tmp_path / "task", Path(os.environ["TFL_HOME_DIR"])
    _tool(str(folder))
    config = write_config(tmp_path, base_config(tiny_model, tmp_path))
    checked = _check_from(folder, config)
    assert checked.returncode == 0 and last_json(checked.stdout)["ok"], checked.stderr

    uploaded = _upload(folder, home)
    listed = {task["id"]: task for task in uploaded["listed"]}
    record = listed[uploaded["id"]]  # `lab task list` shows it
    assert record["name"] == "sft_trainer_trl" and record["type"] == "REMOTE" and record["file_mounts"] is True
    assert {"model_name", "dataset_name"} <= set(record["parameters"])  # what `lab task queue` accepts
    assert record["run"] == "python main.py" and record["setup"] == "bash setup.sh"

    # A run's setup lands the task's files, the record's index.json among them, in its working directory.
    run_home = tmp_path / "run-home"
    run_home.mkdir()
    job = make_lab_job(home, {}, task_id=uploaded["id"])
    lab_env = {"TFL_HOME_DIR": str(home), "_TFL_JOB_ID": job, "_TFL_EXPERIMENT_ID": EXPERIMENT, "HOME": str(run_home)}
    subprocess.run([sys.executable, "-c", COPY_FILE_MOUNTS], env={**os.environ, **lab_env}, check=True)
    assert json.loads((run_home / "index.json").read_text())["id"] == uploaded["id"]
    assert _manifest_read_in(run_home) == str(run_home / COPY)
    checked = _check_from(run_home, config)
    assert checked.returncode == 0 and last_json(checked.stdout)["ok"], checked.stderr


def test_the_same_folder_with_the_gallery_manifest_as_index_json_loses_its_task_record(tmp_path):
    """Why the folder exists: uploading index.json replaces the record, as TransformerLab 0.40.1 does it."""
    folder = tmp_path / "task"
    _tool(str(folder))
    shutil.copy(ROOT / "index.json", folder / "index.json")
    uploaded = _upload(folder, Path(os.environ["TFL_HOME_DIR"]))
    assert uploaded["id"] not in {task.get("id") for task in uploaded["listed"]}


# The tool run where PyYAML cannot be imported: a machine with Python alone, where `lab` may run.
WITHOUT_YAML = """
import runpy, sys
sys.modules["yaml"] = None  # `import yaml` raises ImportError
tool = sys.argv.pop(1)
sys.argv[0] = tool
runpy.run_path(tool, run_name="__main__")
"""


@pytest.mark.parametrize("git", ["", "https://github.com/example/sft-trainer"])
def test_python_alone_writes_the_same_folder(tmp_path, git):
    """Without PyYAML the folder's task.yaml is the repository's (kept equal to index.json's rendering by
    test_task_yaml) less its github_repo_url line: byte for byte what the rendering gives, with `git` empty and
    with it set (a copy of the repository whose task.yaml was rendered with it)."""
    from tools import task_yaml

    repo = tmp_path / "repo"
    manifest = json.loads((ROOT / "index.json").read_text())
    for name in (*manifest["files"], "README.md", "tools"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    (repo / "index.json").write_text(json.dumps({**manifest, "git": git}, indent=2))
    (repo / "task.yaml").write_text(task_yaml.render({**manifest, "git": git}))
    assert ("github_repo_url:" in (repo / "task.yaml").read_text()) == bool(git)
    tool = str(repo / "tools" / "task_folder.py")
    rendered, copied = tmp_path / "rendered", tmp_path / "copied"
    subprocess.run([sys.executable, tool, str(rendered)], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-c", WITHOUT_YAML, tool, str(copied)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.relative_to(rendered).as_posix() for p in rendered.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*") if p.is_file())
    assert all((rendered / f).read_bytes() == (copied / f).read_bytes() for f in files)
    assert "github_repo_url" not in (copied / "task.yaml").read_text()
    proc = subprocess.run([sys.executable, "-c", WITHOUT_YAML, tool, "--check", str(rendered)], capture_output=True)
    assert proc.returncode == 0, proc.stderr
