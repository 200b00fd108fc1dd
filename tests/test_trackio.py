"""Trackio when the host asks for it (TransformerLab's "Enable Trackio metrics tracking for this run"): the rows
the job gets go into the Trackio run `lab.init` started, that run is finished at the end, and its database is
where the job's Trackio button reads it; a broken Trackio costs one warning, never the run.

Each case runs the sink in a process of its own, with the real lab SDK and trackio and the variables TransformerLab
0.40's `apply_trackio_launch_env` sets; Trackio's database is read back with trackio's own reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_host import config

PROJECT = "sft-project"
RUN = "sft-run-1"

SINK_RUN = """
import sys
from plugin_utils import host
sink = host.TaskJob(host.LabSdk(None))
sink.start({})
if sys.argv[1] == "finished-elsewhere":  # the Trackio run ended under us: trackio.log raises from now on
    import trackio
    trackio.finish()
sink.progress([host.StepRow(1, 10, {"loss": 2.0}), host.StepRow(2, 20, {}), host.StepRow(3, 30, {"loss": 1.5})])
sink.progress([host.StepRow(4, 40, {"loss": 1.25, "eval_loss": 1.2, "eta_seconds": 3.0})])
getattr(sink, sys.argv[2])(*([sys.argv[3]] if sys.argv[2] != "complete" else ["Done", {"train/loss": 1.25}, None]))
"""

READ_LOGS = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])))
"""


def run_sink(home: Path, trackio_dir: Path, *args: str) -> subprocess.CompletedProcess:
    from .task_host import EXPERIMENT, make_lab_job

    job_id = make_lab_job(home, config())
    env = {**os.environ, "TFL_HOME_DIR": str(home), "_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": EXPERIMENT}
    env.update(PYTHONPATH=str(ROOT), **host_trackio_env(trackio_dir))
    return subprocess.run(
        [sys.executable, "-c", SINK_RUN, *args], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120
    )


def trackio_rows(folder: Path) -> list[tuple[int, dict]]:
    """The run's logged rows in a Trackio folder, as trackio's reader gives them: (step, metrics)."""
    env = {**os.environ, "TRACKIO_DIR": str(folder)}
    out = subprocess.run(
        [sys.executable, "-c", READ_LOGS, PROJECT, RUN], capture_output=True, text=True, env=env, check=True
    ).stdout
    return [
        (row["step"], {k: v for k, v in row.items() if "/" in k}) for row in json.loads(out.strip().splitlines()[-1])
    ]


def job_status(home: Path) -> str:
    from .task_host import EXPERIMENT

    [index] = (home / "workspace" / "experiments" / EXPERIMENT / "jobs").glob("*/index.json")
    return json.loads(index.read_text())["status"]


EXPECTED = [(1, {"train/loss": 2.0}), (3, {"train/loss": 1.5}), (4, {"train/loss": 1.25, "eval/loss": 1.2})]


@pytest.mark.parametrize(("end", "status"), [("complete", "COMPLETE"), ("fail", "FAILED"), ("stopped", "STOPPED")])
def test_each_row_reaches_the_hosts_trackio_run_and_its_dashboard_whatever_the_end(tmp_path, end, status):
    """Every measured row with its step, under the job's names (eta_seconds is no measure), in the run's own
    database and in the shared project folder the job's Trackio button reads, once the run ends."""
    from .task_host import EXPERIMENT

    home, trackio_dir = tmp_path / "tflhome", tmp_path / "trackio"
    proc = run_sink(home, trackio_dir, "as-asked", end, "It ended")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the job's Trackio run" not in proc.stderr, proc.stderr[-3000:]  # no warning of ours
    assert job_status(home) == status
    assert trackio_rows(trackio_dir) == EXPECTED
    assert trackio_rows(home / "workspace" / "trackio_runs" / EXPERIMENT / PROJECT) == EXPECTED


MID_RUN_COPY = """
import os, sqlite3, sys, time
from plugin_utils import host
from trackio.sqlite_storage import SQLiteStorage
from trackio.utils import TRACKIO_DIR
def logged(count):  # trackio writes from a thread of its own: wait for the rows to be in its database
    deadline = time.time() + 30
    while len(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])) < count:
        assert time.time() < deadline, "trackio never wrote the rows"
        time.sleep(0.05)
sink = host.TaskJob(host.LabSdk(None))
sink.start({})
sink.progress([host.StepRow(1, 10, {"loss": 2.0})])
logged(1)
# Another reader of the database (the host's dashboard, a copy in progress) keeps its write-ahead log alive while
# the next rows are written, and the SDK copies the folder then, as it does at every progress call.
reader = sqlite3.connect(os.path.join(str(TRACKIO_DIR), sys.argv[1] + ".db"))
reader.execute("SELECT count(*) FROM sqlite_master").fetchall()
sink.progress([host.StepRow(2, 20, {"loss": 1.5})])
logged(2)
sink.sdk.lab.capture_active_trackio_run()
reader.close()
sink.progress([host.StepRow(3, 30, {"loss": 1.25})])
sink.complete("Done", {"train/loss": 1.25}, None)
"""


def test_a_copy_taken_mid_run_leaves_no_write_ahead_log_that_rolls_the_dashboard_back(tmp_path):
    """SQLite replays a `-wal` file it finds beside a database: one left in the host's folder by a copy taken
    while the run wrote (the SDK merges each copy into the last) would show the dashboard the rows of that moment
    instead of the final ones. The run's end removes it."""
    from .task_host import EXPERIMENT, make_lab_job

    home, trackio_dir = tmp_path / "tflhome", tmp_path / "trackio"
    job_id = make_lab_job(home, config())
    env = {**os.environ, "TFL_HOME_DIR": str(home), "_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": EXPERIMENT}
    env.update(PYTHONPATH=str(ROOT), **host_trackio_env(trackio_dir))
    proc = subprocess.run(
        [sys.executable, "-c", MID_RUN_COPY, PROJECT, RUN],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = home / "workspace" / "trackio_runs" / EXPERIMENT / PROJECT
    expected = [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.5}), (3, {"train/loss": 1.25})]
    assert trackio_rows(trackio_dir) == expected
    assert trackio_rows(shared) == expected
    assert not list(shared.glob("*-wal"))


def test_a_trackio_run_that_fails_under_us_costs_one_warning_and_never_the_run(tmp_path):
    home = tmp_path / "tflhome"
    proc = run_sink(home, tmp_path / "trackio", "finished-elsewhere", "complete")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("could not log to the job's Trackio run") == 1, proc.stderr[-3000:]
    assert job_status(home) == "COMPLETE"


def test_a_trackio_run_that_never_started_costs_one_warning_and_never_the_run(tmp_path):
    home, not_a_folder = tmp_path / "tflhome", tmp_path / "trackio"
    not_a_folder.write_text("TRACKIO_DIR names a file: no database can live there")
    proc = run_sink(home, not_a_folder, "as-asked", "complete")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("the host asked for a Trackio run") == 1, proc.stderr[-3000:]
    assert "did not start one" in proc.stderr
    assert job_status(home) == "COMPLETE"


def host_trackio_env(trackio_dir: Path) -> dict[str, str]:
    """What TransformerLab 0.40's `apply_trackio_launch_env` sets in a job's environment when its Queue form's
    "Enable Trackio metrics tracking for this run" is ticked."""
    return {
        "TLAB_TRACKIO_AUTO_INIT": "true",
        "TLAB_TRACKIO_PROJECT_NAME": PROJECT,
        "TLAB_TRACKIO_RUN_NAME": RUN,
        "TRACKIO_DIR": str(trackio_dir),
    }


def check_a_completed_task_jobs_page(index: Path, home: Path, trackio_dir: Path, stderr: str, adapter: str) -> None:
    """What the job page of a task job that completed with Trackio tracking on and report_to trackio shows, beyond
    its status (test_lifecycle's resumed task job runs it, to share that launch): the ranks' rows, through the
    parent's sink, in the job's Trackio run and its dashboard's copy, once; the loss curve and the adapter whole
    among its artifacts (what `lab job download` zips); the sample answers as its evals."""
    import csv
    import zipfile

    from .task_host import EXPERIMENT

    job_rows = [json.loads(line) for line in (index.parent / "metrics.jsonl").read_text().splitlines()]
    measured = [(row["step"], row.get("metrics") or {}) for row in job_rows if "step" in row]
    losses = [(step, metrics["train/loss"]) for step, metrics in measured if "train/loss" in metrics]
    assert losses, job_rows
    for folder in (trackio_dir, home / "workspace" / "trackio_runs" / EXPERIMENT / PROJECT):
        rows = trackio_rows(folder)
        assert [(step, metrics["train/loss"]) for step, metrics in rows if "train/loss" in metrics] == losses
    # report_to trackio adds no second copy from the ranks: the job's run already has every row.
    assert "report_to trackio: the job's own Trackio run has the rows; the ranks log no second copy" in stderr
    assert not [path for path in home.parent.rglob("*.db") if adapter in path.name]
    assert not list(home.parent.rglob("logs/trackio"))

    artifacts = index.parent / "artifacts"
    assert sorted(p.name for p in artifacts.iterdir()) == ["loss_curve.png", f"{adapter}.zip"]
    [registered] = (index.parent / "models").glob(f"*_{adapter}")
    with zipfile.ZipFile(artifacts / f"{adapter}.zip") as bundle:
        inside = {name.removeprefix(f"{adapter}/") for name in bundle.namelist()}
        wanted = {"adapter_model.safetensors", "adapter_config.json", "README.md", "loss_curve.png", "samples.jsonl"}
        assert wanted <= inside, inside
        assert "library_name: peft" in bundle.read(f"{adapter}/README.md").decode()
        weights = bundle.read(f"{adapter}/adapter_model.safetensors")
    assert weights == (registered / "adapter_model.safetensors").read_bytes()

    # The sample answers are the task job's evals (the Evals tab reads job_data.eval_results), scored 0/1 by exact
    # match.
    [evals] = json.loads(index.read_text())["job_data"]["eval_results"]
    with open(evals, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and set(table[0]) == {"input", "expected_output", "output", "score"}
    assert {row["score"] for row in table} <= {"0", "1"} and all(row["input"].startswith("Question: ") for row in table)
