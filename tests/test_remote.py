"""A remote workspace: the TransformerLab workspace in a bucket, as on cloud providers
(TFL_STORAGE_URI=s3://...). The run trains in local folders, uploads each checkpoint, the adapter and the loss
plot through the lab SDK, and downloads a checkpoint it is asked to resume from.

There is no bucket to reach here, so the "s3" filesystem is a FAKE: an fsspec filesystem that maps
s3://bucket/key onto the local file <tmp>/s3/bucket/key and returns names as s3fs does ("bucket/key"). It is
registered over s3fs (which the lab SDK installs) in the child processes only, by a sitecustomize.py put first
on their PYTHONPATH; the lab SDK's own storage code (copy_dir, find, ls, exists, makedirs, open, rm_tree) runs
on it unchanged. TFL_STORAGE_PROVIDER and TFL_REMOTE_STORAGE_ENABLED stay unset: aws, with no organisation
context to set (the SDK asks for one only with remote storage enabled, localfs or juicefs)."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from pathlib import Path

import pytest

from plugin_utils import host

from .conftest import ROOT, base_config, last_json, params_of
from .task_host import make_lab_job
from .test_e2e import read_job
from .test_lifecycle import Running

FAKE_S3 = '''\
"""A fake "s3" filesystem for tests/test_remote.py (no bucket is reachable there): s3://bucket/key is the file
$SFT_FAKE_S3_ROOT/bucket/key."""

import os

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class FakeS3(DirFileSystem):
    protocol = "s3"

    def __init__(self, *args, **storage_options):  # the SDK's profile, caching and asynchronous options
        super().__init__(path=os.environ["SFT_FAKE_S3_ROOT"], fs=LocalFileSystem(auto_mkdir=True))


if os.environ.get("SFT_FAKE_S3_ROOT"):
    fsspec.register_implementation("s3", FakeS3, clobber=True)
'''


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> Path:
    """The fake bucket's folder; every process the test starts sees the workspace at s3://bucket."""
    root = tmp_path / "s3"
    (root / "bucket").mkdir(parents=True)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_S3)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SFT_FAKE_S3_ROOT", str(root))
    monkeypatch.setenv("TFL_STORAGE_URI", "s3://bucket")
    for name in ("TFL_STORAGE_PROVIDER", "TFL_REMOTE_STORAGE_ENABLED", "SFT_LOCAL_DIR"):
        monkeypatch.delenv(name, raising=False)
    return root / "bucket"


def local(bucket: Path, uri: str) -> Path:
    """The fake bucket's file for an s3://bucket/... URI."""
    assert uri.startswith("s3://bucket/"), uri
    return bucket / uri.removeprefix("s3://bucket/")


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class LocalStorage:
    """The part of the lab SDK's storage API the sink uses, on local folders (a stand-in for a bucket)."""

    join = staticmethod(posixpath.join)

    async def exists(self, path):
        return os.path.exists(path)

    async def ls(self, path, detail=False):
        return [os.path.join(path, name) for name in os.listdir(path)]

    async def rm_tree(self, path):
        shutil.rmtree(path)


class FakeLab:
    """lab.save_checkpoint (a copy into the job's checkpoints folder) and the job's fields; `failing`: names whose
    first upload fails."""

    def __init__(self, folder: Path, failing=()):
        self.folder, self.failing, self.fields = folder, set(failing), {}
        self.job = self

    def update_job_data_field(self, key, value):
        self.fields[key] = value

    def save_checkpoint(self, path, name):
        if name in self.failing:
            self.failing.discard(name)
            raise OSError("connection reset")
        shutil.copytree(path, self.folder / name, dirs_exist_ok=True)
        return str(self.folder / name)


def _remote_sdk(lab, checkpoints_dir: str) -> host.LabSdk:
    sdk = host.LabSdk(None)
    sdk.lab, sdk._checkpoints_dir, sdk._remote = lab, checkpoints_dir, True
    return sdk


def test_the_remote_checkpoints_folder_follows_the_local_one_and_a_failed_upload_is_retried(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(host, "_storage", LocalStorage)
    remote, here = tmp_path / "bucket" / "checkpoints", tmp_path / "local"
    (remote / "checkpoint-1").mkdir(parents=True)  # left by an earlier attempt of the job
    (remote / "notes.txt").write_text("not a checkpoint")
    for step in (2, 4, 6):
        (here / f"checkpoint-{step}").mkdir(parents=True)
        (here / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    lab = FakeLab(remote, failing={"checkpoint-2"})
    sink = host.TaskJob(_remote_sdk(lab, str(remote)))

    with caplog.at_level(logging.WARNING, logger="sft"):
        sink.checkpoints([str(here / "checkpoint-2")])
    assert "could not upload checkpoint-2" in caplog.text and "tried again at the next save" in caplog.text
    assert lab.fields == {"checkpoints": [], "latest_checkpoint": None}, "the job lists what is there: nothing"
    assert sorted(p.name for p in remote.iterdir()) == ["notes.txt"]

    sink.checkpoints([str(here / "checkpoint-2"), str(here / "checkpoint-4")])
    assert lab.fields["checkpoints"] == [str(remote / "checkpoint-2"), str(remote / "checkpoint-4")]

    # save_total_limit=2 rotated checkpoint-2 away here: it goes there too.
    sink.checkpoints([str(here / "checkpoint-4"), str(here / "checkpoint-6")])
    assert lab.fields["checkpoints"] == [str(remote / "checkpoint-4"), str(remote / "checkpoint-6")]
    assert lab.fields["latest_checkpoint"] == str(remote / "checkpoint-6")
    assert sorted(p.name for p in remote.iterdir()) == ["checkpoint-4", "checkpoint-6", "notes.txt"]
    assert (remote / "checkpoint-6" / "trainer_state.json").is_file()


def test_a_job_of_a_remote_workspace_has_local_folders_named_by_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_LOCAL_DIR", str(tmp_path / "jobs"))
    sdk = _remote_sdk(object(), "s3://bucket/experiments/e/jobs/7/checkpoints")
    where = host.LabJobPlaces(sdk).locations(params_of(adaptor_name="a"))
    work = tmp_path / "jobs" / "7"
    assert (where.adapter_dir, where.checkpoint_dir, where.run_dir) == (
        str(work / "adaptor" / "a"),
        str(work / "checkpoints"),
        str(work / "sft"),
    )
    assert host.LabJobPlaces(sdk).merged_location(params_of(adaptor_name="a")) == str(work / "merged" / "a-merged")
    assert sdk.job_dir() == "s3://bucket/experiments/e/jobs/7"
    monkeypatch.delenv("SFT_LOCAL_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert host.local_jobs_dir() == str(tmp_path / "home" / ".cache" / "sft_trainer_trl" / "jobs")


@pytest.mark.slow
def test_a_job_of_a_remote_workspace_trains_locally_uploads_and_a_new_job_resumes_from_its_checkpoint(
    tiny_model, tmp_path, bucket
):
    home = tmp_path / "tflhome"
    params = base_config(tiny_model, tmp_path, max_steps=4, save_steps=2, logging_steps=1, save_total_limit=1)
    params.pop("output_dir")
    first = make_lab_job(home, params)
    job_uri = f"s3://bucket/experiments/exp1/jobs/{first}"
    user_home = tmp_path / "home"  # the machine's HOME: the local folders go under ~/.cache by default
    user_home.mkdir()
    env = {"_TFL_JOB_ID": first, "_TFL_EXPERIMENT_ID": "exp1", "HOME": str(user_home)}
    run = Running(["--json"], env=env)
    assert run.finish() == 0, run.stderr[-4000:]
    result = last_json(run.stdout)
    assert result["status"] == "COMPLETE" and result["steps"] == 4
    assert "earlier jobs are not searched" in run.stderr

    job = read_job(local(bucket, f"{job_uri}/index.json"))
    data = job["job_data"]
    assert job["status"] == "COMPLETE" and job["progress"] == 100, json.dumps(job)[-3000:]
    # Saves at steps 2 and 4; save_total_limit=1 rotated checkpoint-2 away here and in the bucket.
    assert "checkpoint saved: step 2" in run.stderr
    checkpoint = f"{job_uri}/checkpoints/checkpoint-4"
    assert data["checkpoints"] == [checkpoint] and data["latest_checkpoint"] == checkpoint
    assert [p.name for p in local(bucket, f"{job_uri}/checkpoints").iterdir()] == ["checkpoint-4"]
    saved = local(bucket, checkpoint)
    for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "run_params.json"):
        assert (saved / name).is_file(), name
    # The adapter went to the job's models through lab.save_model; the run's result names it there.
    [model] = data["models"]
    assert model == f"{job_uri}/models/{first}_test-adaptor" and result["adaptor_path"] == model
    assert (local(bucket, model) / "adapter_model.safetensors").is_file()
    assert json.loads((local(bucket, model) / "training_summary.json").read_text())["steps"] == 4
    # The loss plot is beside the job, where the host reads it through its storage.
    assert data["plot_data_path"] == f"{job_uri}/sft/loss_plot.json"
    assert json.loads(local(bucket, data["plot_data_path"]).read_text())["data"][0]["x"] == [1, 2, 3, 4]
    # The job names nothing on this machine; it trained in ~/.cache/sft_trainer_trl/jobs/<job id>.
    work = user_home / ".cache" / "sft_trainer_trl" / "jobs" / first
    assert not [s for s in _strings(data) if s.startswith(str(tmp_path))]
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["checkpoint-4"]
    assert json.loads((work / "sft" / "run.json").read_text())["finished"] is True
    assert not (work / "adaptor" / "test-adaptor").exists(), "the uploaded adapter is not kept twice"
    assert not (ROOT / "s3:").exists(), "no bucket path was taken for a local one"

    # "Restart from checkpoint": a new job names the first one's checkpoint; it is downloaded, its identity
    # compared, and training goes on from its step (max_steps raised: a soft change). SFT_LOCAL_DIR moves
    # the local folders.
    params["max_steps"] = 6
    second = make_lab_job(home, params, parent_job_id=first, resumed_from_checkpoint="checkpoint-4")
    folders = tmp_path / "local-jobs"
    env = {"_TFL_JOB_ID": second, "_TFL_EXPERIMENT_ID": "exp1", "HOME": str(user_home), "SFT_LOCAL_DIR": str(folders)}
    run = Running(["--json"], env=env)
    assert run.finish() == 0, run.stderr[-4000:]
    downloaded = folders / second / "resume" / "checkpoint-4"
    assert f"downloading the checkpoint to resume from: {checkpoint} -> {downloaded}" in run.stderr
    assert f"continuing job {first} from step 4 ({downloaded})" in run.stderr
    assert "resuming at step 4" in run.stderr
    assert "warning: max_steps: changed since the checkpoint" in run.stderr, "the identity was read"
    assert (downloaded / "run_params.json").is_file() and (downloaded / "trainer_state.json").is_file()
    result = last_json(run.stdout)
    assert result["status"] == "COMPLETE" and result["steps"] == 6
    second_uri = f"s3://bucket/experiments/exp1/jobs/{second}"
    job = read_job(local(bucket, f"{second_uri}/index.json"))
    assert job["status"] == "COMPLETE"
    assert job["job_data"]["checkpoints"] == [f"{second_uri}/checkpoints/checkpoint-6"]
    summary = json.loads((local(bucket, job["job_data"]["models"][0]) / "training_summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    assert not (ROOT / "s3:").exists()
