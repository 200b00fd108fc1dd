"""plugin_utils/host.py: reading a headless config, choosing the host for each way of starting, where
each host puts the adapter and checkpoints, and a missing lab home as a clear error (README, "Run it headless").

Nothing here imports `lab` (a test that needs it runs it in a process of its own): the end-to-end tests drive the
real SDK."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plugin_utils import host, params
from plugin_utils.errors import InvalidConfig
from tests.conftest import ROOT, resolve


def args(**given) -> argparse.Namespace:
    values = {"input_file": None, "config": None, "set": None, "experiment": None}
    values.update(given)
    return argparse.Namespace(**values)


def typed(**overrides) -> params.Params:
    """The same values, read as a run reads them."""
    return params.defaults().replace(**config(**overrides))


def config(**overrides) -> dict:
    """A host's raw parameter values: the defaults as a user gives them, with these."""
    p = params.defaults().as_dict()
    p.update(model_name="/models/tiny", dataset_name="/data/rows.jsonl", adaptor_name="my-adaptor")
    p.update(overrides)
    return p


def write_json(path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def write_json_tmp(value) -> str:
    import tempfile

    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    with open(path, "w") as out:
        json.dump(value, out)
    return path


def only_error(caught) -> tuple[str, str]:
    [found] = caught.value.errors
    return found.parameter, found.message


# --- read_config() -------------------------------------------------------------------------------------------


def test_read_config_returns_the_object(tmp_path):
    path = write_json(tmp_path / "run.json", {"adaptor_name": "a", "lora_r": 8})
    assert host.read_config(path, []) == {"adaptor_name": "a", "lora_r": 8}


def test_read_config_missing_file_names_config(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(InvalidConfig) as caught:
        host.read_config(missing, [])
    parameter, message = only_error(caught)
    assert parameter == "--config"
    assert missing in message
    assert "Check the path" in message


def test_read_config_invalid_json_names_config(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"adaptor_name": "a",}')
    with pytest.raises(InvalidConfig) as caught:
        host.read_config(str(path), [])
    parameter, message = only_error(caught)
    assert parameter == "--config"
    assert "is not valid JSON" in message


@pytest.mark.parametrize("value", [[1, 2], "text", 3, None])
def test_read_config_non_object_names_config(tmp_path, value):
    path = write_json(tmp_path / "run.json", value)
    with pytest.raises(InvalidConfig) as caught:
        host.read_config(path, [])
    parameter, message = only_error(caught)
    assert parameter == "--config"
    assert "is not a JSON object" in message


@pytest.mark.parametrize("item", ["lora_r", "=8", ""])
def test_read_config_bad_set_names_set(tmp_path, item):
    path = write_json(tmp_path / "run.json", {})
    with pytest.raises(InvalidConfig) as caught:
        host.read_config(path, [item])
    parameter, message = only_error(caught)
    assert parameter == "--set"
    assert "is not key=value" in message
    assert "--set learning_rate=1e-4" in message


def test_set_overrides_and_adds_values(tmp_path):
    path = write_json(tmp_path / "run.json", {"lora_r": 8, "adaptor_name": "a"})
    found = host.read_config(path, ["lora_r=32", " packing =true", "formatting_template={{ a }}={{ b }}", "seed="])
    assert found == {
        "lora_r": "32",  # strings, coerced later like any other value
        "adaptor_name": "a",
        "packing": "true",
        "formatting_template": "{{ a }}={{ b }}",
        "seed": "",
    }


def test_set_values_resolve_like_form_values(tmp_path):
    path = write_json(tmp_path / "run.json", {"adaptor_name": "a"})
    raw = host.read_config(path, ["lora_r=32", "learning_rate=2e-4", "packing=on"])
    values, _ = resolve(raw, headless=True)
    assert (values.lora_r, values.learning_rate, values.packing) == (32, 2e-4, True)


# --- choose() -----------------------------------------------------------------------------------------------


def test_choose_picks_the_legacy_host_for_an_input_file(tmp_path):
    path = write_json(
        tmp_path / "input.json",
        {"experiment": {"name": "alpha"}, "config": {"job_id": 12, "adaptor_name": "a", "type": "trainer"}},
    )
    chosen = host.choose(args(input_file=path))
    assert (type(chosen.params_from), type(chosen.places), type(chosen.sink)) == (
        host.InputFile,
        host.LegacyPlaces,
        host.LegacyJob,
    )
    assert not chosen.headless
    assert chosen.sink.job_id == "12"
    assert chosen.params_from.raw_params() == {"job_id": 12, "adaptor_name": "a", "type": "trainer"}


def test_legacy_host_with_an_unreadable_input_file_names_input_file(tmp_path):
    with pytest.raises(InvalidConfig) as caught:
        host.choose(args(input_file=str(tmp_path / "missing.json")))
    assert only_error(caught)[0] == "input_file"


def test_choose_picks_the_headless_host_for_config(tmp_path):
    path = write_json(tmp_path / "run.json", {"adaptor_name": "a"})
    chosen = host.choose(args(config=path, set=["lora_r=4"]))
    assert (type(chosen.params_from), type(chosen.places), type(chosen.sink)) == (
        host.ConfigFile,
        host.OutputDir,
        host.HeadlessJob,
    )
    assert chosen.headless and chosen.sink.stopped_exit_code == 3 and chosen.sink.kill_grace_seconds() is None
    assert chosen.sink.sdk.experiment == "alpha"
    assert chosen.params_from.raw_params() == {"adaptor_name": "a", "lora_r": "4"}


def test_headless_host_takes_the_experiment_flag(tmp_path):
    path = write_json(tmp_path / "run.json", {})
    assert host.choose(args(config=path, experiment="beta")).sink.sdk.experiment == "beta"


def test_choose_picks_the_lab_host_when_a_job_id_is_set(monkeypatch):
    monkeypatch.setenv("_TFL_JOB_ID", "42")
    chosen = host.choose(args())
    assert (type(chosen.params_from), type(chosen.places), type(chosen.sink)) == (
        host.LabConfig,
        host.LabJobPlaces,
        host.TaskJob,
    )
    assert not chosen.headless and chosen.sink.stopped_exit_code == 0 and chosen.sink.kill_grace_seconds() == 3.0
    assert not chosen.sink.sdk.attached  # nothing imported or attached yet
    # One SDK adapter serves all three.
    assert chosen.params_from.sdk is chosen.places.sdk is chosen.sink.sdk


def test_a_headless_job_that_never_started_is_never_touched():
    # A run refused before it started made no job: failing or stopping it creates none.
    sink = host.choose(args(config=write_json_tmp({}))).sink
    sink.fail("Invalid configuration")
    sink.stopped("Stopped on request")
    assert not sink.sdk.attached


def test_the_null_sink_has_no_job():
    sink = host.NullSink()
    assert sink.job_id == "" and not sink.should_stop()
    assert sink.register_model("/x/a", {}) == "/x/a"


def test_choose_without_anything_is_invalid_config():
    with pytest.raises(InvalidConfig) as caught:
        host.choose(args())
    parameter, message = only_error(caught)
    assert parameter == "--config"
    assert "no parameters given" in message


def test_choose_with_an_empty_job_id_is_invalid_config(monkeypatch):
    monkeypatch.setenv("_TFL_JOB_ID", "")
    with pytest.raises(InvalidConfig):
        host.choose(args())


def test_choose_with_a_bad_config_reports_it_before_any_job(tmp_path):
    path = write_json(tmp_path / "run.json", [])
    with pytest.raises(InvalidConfig) as caught:
        host.choose(args(config=path))
    assert only_error(caught)[0] == "--config"


# --- locations() ------------------------------------------------------------------------------------------


def test_legacy_locations_use_adaptor_output_dir_and_output_dir_checkpoints(tmp_path):
    legacy = host.LegacyPlaces()
    p = typed(adaptor_output_dir=str(tmp_path / "models" / "adaptor"), output_dir=str(tmp_path / "job"))
    where = legacy.locations(p)
    adapter, checkpoints = where.adapter_dir, where.checkpoint_dir
    assert adapter == str(tmp_path / "models" / "adaptor")
    assert checkpoints == str(tmp_path / "job" / "checkpoints" / "my-adaptor")


def test_legacy_locations_without_adaptor_output_dir_fall_back_to_output_dir(tmp_path):
    where = host.LegacyPlaces().locations(typed(output_dir=str(tmp_path / "job")))
    adapter, checkpoints = where.adapter_dir, where.checkpoint_dir
    assert adapter == str(tmp_path / "job" / "my-adaptor")
    assert checkpoints == str(tmp_path / "job" / "checkpoints" / "my-adaptor")


def test_headless_locations_are_under_output_dir(tmp_path):
    where = host.OutputDir().locations(typed(output_dir=str(tmp_path / "out")))
    adapter, checkpoints = where.adapter_dir, where.checkpoint_dir
    assert adapter == str(tmp_path / "out" / "my-adaptor")
    assert checkpoints == str(tmp_path / "out" / "checkpoints" / "my-adaptor")
    # The run's own files (its lock, the loss plot, saves in progress) are never in the checkpoints folder.
    assert where.run_dir == str(tmp_path / "out" / "runs" / "my-adaptor")
    assert os.path.dirname(where.lock_path) == where.run_dir


def test_headless_locations_are_absolute_for_a_relative_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = host.OutputDir().locations(typed())  # output_dir ./outputs
    adapter, checkpoints = where.adapter_dir, where.checkpoint_dir
    assert adapter == str(tmp_path / "outputs" / "my-adaptor")
    assert checkpoints == str(tmp_path / "outputs" / "checkpoints" / "my-adaptor")


def test_host_locations_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    adapter = host.OutputDir().locations(typed(output_dir="~/runs")).adapter_dir
    assert adapter == str(tmp_path / "runs" / "my-adaptor")


def test_empty_output_dir_means_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter = host.OutputDir().locations(typed(output_dir="")).adapter_dir
    assert adapter == str(tmp_path / "outputs" / "my-adaptor")


# --- the lab home -----------------------------------------------------------------------------------------


def test_check_lab_home_accepts_existing_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("TFL_WORKSPACE_DIR", str(tmp_path))
    host._check_lab_home()


@pytest.mark.parametrize("var", ["TFL_HOME_DIR", "TFL_WORKSPACE_DIR"])
def test_a_lab_folder_that_does_not_exist_is_invalid_config_not_an_exit(tmp_path, monkeypatch, var):
    missing = str(tmp_path / "no-such-folder")
    monkeypatch.setenv(var, missing)
    with pytest.raises(InvalidConfig) as caught:
        host._check_lab_home()
    parameter, message = only_error(caught)
    assert parameter == var
    assert f"{missing} does not exist" in message
    assert f"unset {var}" in message


def test_a_missing_lab_home_stops_before_lab_is_imported(tmp_path, monkeypatch):
    monkeypatch.setenv("TFL_HOME_DIR", str(tmp_path / "gone"))
    imported_before = "lab" in sys.modules
    with pytest.raises(InvalidConfig):
        host.LabConfig(host.LabSdk(None)).raw_params()
    assert ("lab" in sys.modules) == imported_before
    assert not os.path.exists(tmp_path / "gone")


def test_task_parameters_read_mid_rewrite_are_read_again():
    # The lab SDK rewrites a job's record in place; a read landing in between finds no parameters (get_config
    # returns {}), as another node of a multi-node run can see while the main node writes the job.
    answers = iter([{}, {}, {"adaptor_name": "x"}])

    class Lab:
        def get_config(self):
            return next(answers)

    sdk = host.LabSdk(None)
    sdk.lab = Lab()
    assert host.LabConfig(sdk).raw_params() == {"adaptor_name": "x"}


def test_another_node_reads_the_task_job_without_writing_it(tmp_path):
    # Every node of a multi-node task attaches to the same job; lab.init writes its record, and two nodes doing
    # so at once left it corrupt ("Corrupt JSON ... treating as empty": no parameters on either node).
    import subprocess

    from .task_host import make_lab_job

    home = tmp_path / "tflhome"
    job_id = make_lab_job(home, {"adaptor_name": "x"})
    [index] = (home / "workspace" / "experiments" / "exp1" / "jobs").glob("*/index.json")
    before = index.read_bytes()
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from plugin_utils import host\n"
        "sdk = host.LabSdk(None, read_only=True)\n"
        "print(host.LabConfig(sdk).raw_params()['adaptor_name'], sdk.job_id)\n"
    )
    env = {**os.environ, "TFL_HOME_DIR": str(home), "_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": "exp1"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    assert out.stdout.split() == ["x", job_id]
    assert index.read_bytes() == before, "the job's record is untouched"


# --- a job a dead process left open, closed by the next run (legacy job store of 0.31/0.32) --------------------

CLOSE_LEFT_OPEN = """
import json, sys
from plugin_utils import host, params, stages
source = host.InputFile(sys.argv[1])
chosen = host.Host(source, host.LegacyPlaces(), host.LegacyJob(source))
p = params.read(source.raw_params(), headless=False).params
stages.close_left_open_jobs(chosen, p, chosen.sink)
"""


@pytest.mark.parametrize("lab_dir", [".legacy-lab", ".legacy-lab-0.1.1"])
@pytest.mark.parametrize(
    ("job_data", "checkpoint", "expected"),
    [
        ({}, True, "STOPPED"),  # the 0.31/0.32 host marked it COMPLETE once its process was gone
        ({}, False, "FAILED"),
        ({"completion_status": "success"}, True, "COMPLETE"),  # concluded by the plugin: left alone
    ],
)
def test_the_next_legacy_run_closes_a_job_a_killed_process_left(tmp_path, lab_dir, job_data, checkpoint, expected):
    import subprocess

    home = tmp_path / "tflhome"
    output_dir = tmp_path / "tensorboards" / "demo"
    for job_id, status in (("7", "COMPLETE"), ("8", "RUNNING")):
        folder = home / "workspace" / "jobs" / job_id
        folder.mkdir(parents=True)
        record = {"id": job_id, "experiment_id": "1", "status": status, "type": "TRAIN", "progress": 40}
        (folder / "index.json").write_text(json.dumps({**record, "job_data": job_data if job_id == "7" else {}}))
    # Job 7's run: its record says unfinished, nothing holds its lock, and (maybe) its ranks saved on the way out.
    run_dir = output_dir / "runs" / "my-adaptor"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"adaptor_name": "my-adaptor", "job_id": "7", "finished": False}))
    if checkpoint:
        saved = output_dir / "checkpoints" / "my-adaptor" / "checkpoint-4"
        saved.mkdir(parents=True)
        (saved / "trainer_state.json").write_text("{}")
    given = config(job_id="8", output_dir=str(output_dir), adaptor_output_dir=str(tmp_path / "adaptors" / "a"))
    input_file = write_json(tmp_path / "plugin_input_8.json", {"experiment": {"name": "alpha"}, "config": given})
    env = {**os.environ, "TFL_HOME_DIR": str(home), "PYTHONPATH": os.pathsep.join([str(ROOT / lab_dir), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", CLOSE_LEFT_OPEN, input_file], capture_output=True, text=True, env=env, cwd=str(ROOT)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads((home / "workspace" / "jobs" / "7" / "index.json").read_text())
    assert job["status"] == expected, (job, proc.stderr[-2000:])
    if expected != "COMPLETE":
        details = job["job_data"]["completion_details"]
        assert details.startswith("The process running this job ended without concluding it") and "job 8" in details
        assert ("checkpoint at step 4" in details) == checkpoint
        assert f"job 7 was left open by a process that died; marked {expected}" in proc.stderr
    assert json.loads((home / "workspace" / "jobs" / "8" / "index.json").read_text())["status"] == "RUNNING"


STOP_AFTER_A_LOST_LISTING = """
import asyncio
from plugin_utils import host
sink = host.TaskJob(host.LabSdk(None))
sink.start({})
sink.checkpoints(["/ckpt/checkpoint-2", "/ckpt/checkpoint-4"])
job = sink.sdk.attach().job
async def lost():  # the host's Stop rewrote the record from a copy read before the listing: the listing is gone
    data = await job.get_job_data()
    data.pop("checkpoints"), data.pop("latest_checkpoint")
    await job.set_job_data(data)
asyncio.run(lost())
sink.stopped("Stopped on request at step 5")
"""


def test_a_stop_lists_the_checkpoints_again_with_the_final_status(tmp_path):
    from .task_host import EXPERIMENT, make_lab_job

    home = tmp_path / "tflhome"
    job_id = make_lab_job(home, config())
    env = {**os.environ, "TFL_HOME_DIR": str(home), "_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": EXPERIMENT}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", STOP_AFTER_A_LOST_LISTING], capture_output=True, text=True, env=env, cwd=str(ROOT)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [index] = (home / "workspace" / "experiments" / EXPERIMENT / "jobs").glob("*/index.json")
    job = json.loads(index.read_text())
    assert job["status"] == "STOPPED"
    assert job["job_data"]["checkpoints"] == ["/ckpt/checkpoint-2", "/ckpt/checkpoint-4"]
    assert job["job_data"]["latest_checkpoint"] == "/ckpt/checkpoint-4"


RELAY_ROWS = """
import json, sys
from plugin_utils import host
if sys.argv[1] == "no-append":  # an SDK without the job's own row append: every row through update_progress
    host._row_appender = lambda job: None
sink = host.TaskJob(host.LabSdk(None))
sink.start({})
sink.progress([host.StepRow(1, 10, {"loss": 2.0}), host.StepRow(2, 20, {}), host.StepRow(3, 30, {"loss": 1.5})])
sink.progress([host.StepRow(4, 40, {"eval_loss": 1.2, "eta_seconds": 3.0})])
"""


@pytest.mark.parametrize("sdk", ["as-installed", "no-append"])
def test_a_batch_of_rows_reaches_the_jobs_metrics_in_order_and_the_last_is_current(tmp_path, sdk):
    """The watcher sends one pump's rows together; the rows before the last are appended to metrics.jsonl alone
    (the SDK's update_progress rewrites the job's record twice a row). What the job shows is the same either way:
    every row in order with its own step and percent, the last as progress and current metrics."""
    from .task_host import EXPERIMENT, make_lab_job

    home = tmp_path / "tflhome"
    job_id = make_lab_job(home, config())
    env = {**os.environ, "TFL_HOME_DIR": str(home), "_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": EXPERIMENT}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", RELAY_ROWS, sdk], capture_output=True, text=True, env=env, cwd=str(ROOT)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [index] = (home / "workspace" / "experiments" / EXPERIMENT / "jobs").glob("*/index.json")
    rows = [json.loads(line) for line in (index.parent / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["progress"], row.get("metrics")) for row in rows] == [
        (1, 10, {"train/loss": 2.0}),
        (2, 20, None),
        (3, 30, {"train/loss": 1.5}),
        (4, 40, {"eval/loss": 1.2, "eta_seconds": 3.0}),
    ]
    job = json.loads(index.read_text())
    assert job["progress"] == 40
    assert job["job_data"]["current_metrics"] == {"eval/loss": 1.2, "eta_seconds": 3.0}


# --- the job's record survives a kill of the process writing it -------------------------------------------------

WRITE_THE_JOB_IN_A_LOOP = """
import sys
from pathlib import Path
from plugin_utils import host
sdk = host.LabSdk(None)
sdk.attach()
print("attached", flush=True)
step = 0
while True:
    step += 1
    sdk.progress([host.StepRow(step, step % 100, {"train/loss": 1.0 / step})])
    sdk.set_fields({"step": step, "padding": "x" * 20000})
"""


def test_the_job_record_is_never_seen_half_written_and_survives_a_kill_9(tmp_path):
    """The lab SDK rewrites the job's index.json in place (truncate, then write). A reader in between (the host's
    job page) found it empty, and main.py killed outright in between left it empty for good: the host could not
    show the job, and the next run could not close it (found by test_lifecycle's kill -9 of main.py, which failed
    under load). Read while a process does nothing but write the record, it is always whole; killed, it stays
    whole. (A kill can leave the staging file it was writing, index.json.<pid>.<thread>.tmp, which nothing
    reads.)"""
    import signal
    import time

    from .task_host import EXPERIMENT, make_lab_job

    home = tmp_path / "tflhome"
    job_id = make_lab_job(home, {"adaptor_name": "x"})
    [index] = (home / "workspace" / "experiments" / EXPERIMENT / "jobs").glob("*/index.json")
    env = {**os.environ, "TFL_HOME_DIR": str(home), "_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": EXPERIMENT}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITE_THE_JOB_IN_A_LOOP], stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT)
    )
    try:
        assert proc.stdout.readline().strip() == "attached"
        reads, torn, deadline = 0, 0, time.time() + 3
        while time.time() < deadline:
            text = index.read_text()
            reads += 1
            try:
                json.loads(text)
            except ValueError:
                torn += 1
        assert torn == 0, f"{torn} of {reads} reads found the record half written"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    job = json.loads(index.read_text())
    assert str(job["id"]) == job_id and job["job_data"]["step"] > 0


# --- what `lab job download` gives of the trained model ---------------------------------------------------------

PUBLISH_MODELS = """
import json, logging, os, sys
from plugin_utils import downloads, host, params
logging.basicConfig(level=logging.INFO)
bound, root = int(sys.argv[1]), sys.argv[2]
downloads.WHOLE_BOUND = bound
def folder(name, files):
    path = os.path.join(root, name)
    os.makedirs(os.path.join(path, "sub"), exist_ok=True)
    for relative, content in files.items():
        with open(os.path.join(path, relative), "wb") as handle:
            handle.write(content)
    return path
adapter = folder("my-adaptor", {"adapter_config.json": b"{}", "adapter_model.safetensors": os.urandom(4096),
                                "README.md": b"# card", "sub/tokenizer.json": b"{}"})
merged = folder("merged", {"config.json": b"{}", "model.safetensors": os.urandom(8192), "README.md": b"# merged"})
sink = host.TaskJob(host.LabSdk(None))
sink.start({})
p = params.defaults().replace(adaptor_name="my-adaptor", model_name="/models/tiny")
saved = {"merged": sink.register_merged(merged, p), "adapter": sink.register_model(adapter, p)}
print(json.dumps(saved))
"""


@pytest.mark.parametrize("bound", [1 << 30, 1000])
def test_the_jobs_artifacts_hold_a_small_adapter_whole_and_else_its_card_and_where_the_weights_are(tmp_path, bound):
    """What `lab job download` and the Artifacts pane give (TransformerLab 0.40 zips the job's artifacts folder; its
    SDK lists files only): `<name>.zip`, the adapter whole under the bound; a merged model, or an adapter over the
    bound, its files without the weights and WHERE.md naming the job's model that holds them, which is where the
    registration put them. Nothing is left beside the outputs."""
    import zipfile

    from .task_host import EXPERIMENT, make_lab_job

    home = tmp_path / "tflhome"
    job_id = make_lab_job(home, config())
    env = {**os.environ, "TFL_HOME_DIR": str(home), "_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": EXPERIMENT}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", PUBLISH_MODELS, str(bound), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(proc.stdout.splitlines()[-1])
    [index] = (home / "workspace" / "experiments" / EXPERIMENT / "jobs").glob("*/index.json")
    artifacts = index.parent / "artifacts"
    job = json.loads(index.read_text())
    zips = ["my-adaptor-merged.zip", "my-adaptor.zip"]
    assert sorted(os.path.basename(a) for a in job["job_data"]["artifacts"]) == zips
    assert sorted(p.name for p in artifacts.iterdir()) == zips

    def listed(bundle):
        with zipfile.ZipFile(artifacts / bundle) as opened:
            return sorted(opened.namelist()), {name: opened.read(name) for name in opened.namelist()}

    names, merged = listed("my-adaptor-merged.zip")
    assert names == ["my-adaptor-merged/README.md", "my-adaptor-merged/WHERE.md", "my-adaptor-merged/config.json"]
    where = merged["my-adaptor-merged/WHERE.md"].decode()
    assert "a whole model" in where and saved["merged"] in where
    assert f"lab job publish model {job_id} {os.path.basename(saved['merged'])}" in where
    assert (Path(saved["merged"]) / "model.safetensors").stat().st_size == 8192  # the weights, registered
    names, adapter = listed("my-adaptor.zip")
    if bound > 10000:
        inside = ["README.md", "adapter_config.json", "adapter_model.safetensors", "sub/tokenizer.json"]
        assert names == [f"my-adaptor/{name}" for name in inside]
        assert (
            adapter["my-adaptor/adapter_model.safetensors"]
            == (Path(saved["adapter"]) / "adapter_model.safetensors").read_bytes()
        )
        assert "artifacts: my-adaptor.zip, the whole adapter (0.0 MiB)" in proc.stderr
    else:
        inside = ["README.md", "WHERE.md", "adapter_config.json", "sub/tokenizer.json"]
        assert names == [f"my-adaptor/{name}" for name in inside]
        assert "more than the" in adapter["my-adaptor/WHERE.md"].decode()
    assert not list((tmp_path / "out").iterdir())  # a task's models moved into its job, and no temporary zip left
    assert not (tmp_path / "out" / "my-adaptor").exists()  # a task's models are moved into its job


def test_a_zip_that_fails_half_written_leaves_nothing_beside_the_model(tmp_path):
    """A zip that cannot be finished (here a file that vanished: a link to nothing; for a user, a full disk) is
    removed with its temporary folder: nothing half-written is left beside the outputs."""
    from plugin_utils import downloads

    model = tmp_path / "out" / "my-adaptor"
    model.mkdir(parents=True)
    (model / "adapter_config.json").write_text("{}")
    (model / "gone.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(OSError):
        downloads.archive(str(model), "my-adaptor", weights=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["my-adaptor"]
