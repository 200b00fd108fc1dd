"""The host, by composition: where parameters come from (a `ParamSource`), where outputs and checkpoints live
(`Places`), and where progress, logs, the final status and models go (a `Sink`). Each is a Protocol with one
implementation per host:

| start | ParamSource | Places | Sink |
|---|---|---|---|
| TransformerLab 0.31/0.32 plugin harness (`--input_file`) | InputFile | LegacyPlaces | LegacyJob (`lab.Job(job_id)`) |
| lab SDK with `_TFL_JOB_ID` (current TransformerLab tasks) | LabConfig | LabJobPlaces | TaskJob (the task's job) |
| headless `main.py --config` | ConfigFile | OutputDir | HeadlessJob, created when the run starts |
| another node of a multi-node run | (as above) | (as above) | OtherNode: the main node alone reports |
| `--check`, `--dry-run` | (as above) | (as above) | NullSink: never creates or changes a job |

Training code never knows which host it runs under. Only the parent process uses this module, and only `LabSdk`
touches the current lab SDK (its prints kept off stdout, and the one private attribute it needs).

A remote workspace (the lab SDK's storage in a bucket: s3://, gs://, gcs://, abfs://, as on cloud providers)
is reached through the SDK's storage alone: the run trains in local folders (`LabSdk.work_dir`), a
`RemoteMirror` uploads each new checkpoint and removes those rotated away there, the adapter and the loss plot
are uploaded when the run completes, and a checkpoint the host names for resuming is downloaded first. Every
path the rest of the plugin opens is local.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import posixpath
import shutil
import sys
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

from . import checkpoints, downloads, samples
from .errors import EXIT_OK, EXIT_STOPPED, InvalidConfig, RunFailed, problem
from .outputs import Continued, Where, unfinished_run
from .params import Params
from .sources import model_config, workspace_dir, write_whole

log = logging.getLogger("sft")


def _sync(value):
    """The legacy job API is async in lab 0.0.98/0.1.1; run a coroutine to completion, pass values through."""
    if not inspect.iscoroutine(value):
        return value
    import asyncio  # only where a legacy host calls: 40 ms that `--check` never needs

    return asyncio.run(value)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def _end_job(job, status: str, completion: str, message: str, extra: dict[str, Any] | None = None) -> None:
    """Close a job the way TransformerLab's job store reads it: details first, then the final status."""
    for key, value in {"completion_status": completion, "completion_details": message, "end_time": _now()}.items():
        _sync(job.update_job_data_field(key, value))
    for key, value in (extra or {}).items():
        _sync(job.update_job_data_field(key, value))
    _sync(job.update_status(status))


def _stop_asked(job) -> bool:
    """The job's own stop request, as its Stop button leaves it: job_data.stop, or the status STOPPING (the
    legacy job API of lab 0.0.98 has no status to read)."""
    data = _sync(job.get_job_data()) or {}
    status = _sync(job.get_status()) if hasattr(job, "get_status") else None
    return bool(data.get("stop")) or status == "STOPPING"


def _close_left_open(job, status: str, message: str) -> bool:
    """End a job a dead process left open: still RUNNING, or COMPLETE without the completion we always write (the
    0.31/0.32 host marks a RUNNING job COMPLETE once its process is gone). False: it was concluded, left alone."""
    current = _sync(job.get_status()) if hasattr(job, "get_status") else None
    data = _sync(job.get_job_data()) or {}
    if not (current == "RUNNING" or (current == "COMPLETE" and "completion_status" not in data)):
        return False
    if status == "FAILED":
        _sync(job.update_job_data_field("error_msg", message))
    _end_job(job, status, "failed" if status == "FAILED" else "success", message)
    return True


def _check_lab_home() -> None:
    # Importing `lab` exits the process when these name a missing folder; say so instead.
    for var in ("TFL_HOME_DIR", "TFL_WORKSPACE_DIR"):
        folder = os.environ.get(var)
        if folder and not os.path.isdir(folder):
            raise InvalidConfig([problem(var, f"{folder} does not exist", f"Create it, or unset {var}")])


def _import_lab():
    _check_lab_home()
    with contextlib.redirect_stdout(sys.stderr):
        import lab
    return lab


def _storage():
    """The lab SDK's storage (local folders and buckets alike); None in SDKs older than remote workspaces."""
    return getattr(_import_lab(), "storage", None)


def _is_remote(path: str) -> bool:
    storage = _storage()
    return bool(storage is not None and storage.is_remote_path(path))


def _whole_record_writes(job) -> None:
    """Make the SDK write the job's record (index.json) whole: it truncates the file, then writes it, so a kill
    of this process in between (the OOM killer, kill -9, a node that dies) left the job an empty file for good,
    which the host then cannot show and the next run cannot close. In a local workspace the record is now
    written beside itself and renamed over it, as the run's own files are; a bucket's objects are replaced
    whole already. An SDK without this write method is left as it is."""
    write = getattr(job, "_set_json_data", None)
    locate = getattr(job, "_get_json_file", None)
    if not (inspect.iscoroutinefunction(write) and inspect.iscoroutinefunction(locate)):
        return
    sanitize = getattr(sys.modules.get("lab.labresource"), "_sanitize_non_finite", None)

    async def written_whole(json_data):
        path = await locate()
        if not isinstance(json_data, dict) or _is_remote(path):
            return await write(json_data)
        if sanitize is not None:
            json_data, _ = sanitize(json_data)
        write_whole(path, json.dumps(json_data, ensure_ascii=False))

    job._set_json_data = written_whole


def _row_appender(job):
    """The SDK job's own append of one row to its metrics.jsonl (private: `_append_metrics_row`), which
    `update_progress` also calls after rewriting the job's record twice; None where the SDK has no such method."""
    append = getattr(job, "_append_metrics_row", None)
    if not inspect.iscoroutinefunction(append):
        return None
    if not {"progress", "metrics", "step"} <= set(inspect.signature(append).parameters):
        return None
    return append


def _is_checkpoint_name(name: str) -> bool:
    return name.startswith(checkpoints.PREFIX) and name.removeprefix(checkpoints.PREFIX).isdigit()


def local_jobs_dir() -> str:
    """Where jobs of a remote workspace train on this machine, one folder per job: SFT_LOCAL_DIR, else
    ~/.cache/sft_trainer_trl/jobs."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "sft_trainer_trl", "jobs")
    return os.path.abspath(os.path.expanduser(os.environ.get("SFT_LOCAL_DIR") or default))


# --- the lab SDK, behind one adapter -----------------------------------------------------------------------


class _SdkOutput(io.TextIOBase):
    """The lab SDK's prints while it attaches, passed on to stderr (stdout carries --json's report), all but its
    own debugging line about Trackio, printed for every job."""

    NOISE = ("Trackio available:",)

    def __init__(self) -> None:
        self._line = ""

    def write(self, text: str) -> int:
        self._line += text
        *whole, self._line = self._line.split("\n")
        for line in whole:
            if not line.startswith(self.NOISE):
                sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._line and not self._line.startswith(self.NOISE):
            sys.stderr.write(self._line)
        self._line = ""
        sys.stderr.flush()


@contextlib.contextmanager
def _quiet():
    out = _SdkOutput()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        out.flush()


RECORD_READS = 20
TRACKIO_SKIPS = frozenset({"eta_seconds"})  # the job's estimate of time left: no measure of the training


SQLITE_SIDECARS = ("-wal", "-shm")


def _drop_stale_sidecars(source: str, copy: str) -> None:
    """Remove from `copy` the SQLite write-ahead logs that `source` no longer has. The SDK copies Trackio's folder
    to the host's at every progress call, merging into what is there, so a copy taken while the database was being
    written leaves its `-wal` beside the final database, and SQLite replays it over that database: the dashboard
    then shows the rows of that moment (none, at the first step). A finished run's folder has no write-ahead log."""
    storage = _storage()
    if storage is None:
        return
    for path in _sync(storage.ls(copy, detail=False)):
        name = posixpath.basename(str(path).rstrip("/"))
        if name.endswith(SQLITE_SIDECARS) and not os.path.exists(os.path.join(source, name)):
            _sync(storage.rm(str(path)))


def trackio_requested() -> bool:
    """The host asked for a Trackio run of the job (TLAB_TRACKIO_AUTO_INIT=true, as TransformerLab's "Enable
    Trackio metrics tracking" sets it), which this process fills."""
    return os.environ.get("TLAB_TRACKIO_AUTO_INIT", "").lower() == "true"


def _trackio_run_started():
    """The trackio module when the host asked for a Trackio run and `lab.init` started it; None otherwise. The SDK
    swallows a run that would not start (an unwritable TRACKIO_DIR): say so once, as the job's dashboard will be
    empty."""
    if not trackio_requested():
        return None
    try:
        import trackio
        from trackio import context_vars
    except ImportError as exc:
        log.warning("the host asked for a Trackio run, but trackio cannot be imported: %s", exc)
        return None
    if context_vars.current_run.get() is None:
        log.warning("the host asked for a Trackio run, but the lab SDK did not start one (is TRACKIO_DIR writable?)")
        return None
    return trackio


class LabSdk:
    """The lab SDK of current TransformerLab, imported and attached on first use (`lab.init` attaches to
    _TFL_JOB_ID's job, or creates a job in the local workspace). Every call keeps the SDK's prints off stdout
    (which carries --json's report)."""

    def __init__(self, experiment: str | None, *, read_only: bool = False):
        self.experiment = experiment
        # Another node of a multi-node run reads the job and never writes it: `lab.init` writes the job's record
        # (start time, status, live status), and two nodes writing it at once leave it corrupt for good.
        self.read_only = read_only
        self.lab = None
        self.metrics_api = True
        self._append_row = None  # the SDK job's own metrics.jsonl append, where it has one (_row_appender)
        self._checkpoints_dir: str | None = None
        self._remote: bool | None = None
        self._trackio = None  # the trackio module while the run `lab.init` started for the host takes our rows

    def attach(self):
        """The SDK's `lab`, attached to the job. A read-only attachment reads the job without `lab.init`, through
        the SDK's private `_experiment` and `_job`: the one place the plugin touches them."""
        if self.lab is None:
            module = _import_lab()
            lab = module.lab
            with _quiet():
                if self.read_only and hasattr(lab, "_job") and hasattr(lab, "_experiment"):
                    experiment = self.experiment or os.environ.get("_TFL_EXPERIMENT_ID") or "alpha"
                    lab._experiment = _sync(module.Experiment.create_or_get(experiment, create_new=False))
                    lab._job = _sync(module.Job.get(os.environ["_TFL_JOB_ID"], lab._experiment.id))
                else:
                    lab.init(experiment_id=self.experiment)
                    _whole_record_writes(lab.job)
                    self._trackio = _trackio_run_started()
            self.metrics_api = "metrics" in inspect.signature(lab.update_progress).parameters
            self._append_row = _row_appender(lab.job)
            self.lab = lab
        return self.lab

    @property
    def attached(self) -> bool:
        return self.lab is not None

    @property
    def job_id(self) -> str:
        return str(self.lab.job.id) if self.lab is not None else ""

    def config(self) -> dict[str, Any]:
        """What the task or the job was given. The job's record is rewritten in place (truncated, then written): a
        read that lands in between (another node of the run, or the host, writing the job) finds no parameters. A
        task always has some: read again."""
        lab = self.attach()
        for _ in range(RECORD_READS - 1):
            with _quiet():
                config = lab.get_config()
            if config:
                return dict(config)
            time.sleep(0.1)
        with _quiet():
            return dict(lab.get_config())

    def set_parameters(self, params: dict[str, Any]) -> None:
        with _quiet():
            self.attach().set_config({"parameters": params})

    def log(self, text: str) -> None:
        with _quiet():
            self.lab.log(text)

    def progress(self, rows: list[StepRow]) -> None:
        """Every row into the job's metrics.jsonl, the last as its progress and current metrics. Each
        `update_progress` rewrites the job's record twice (progress, then current_metrics), about 8 ms of this
        process's CPU, which on a machine whose cores all train is taken from the ranks: the rows before the last
        are appended alone, where the SDK lets us."""
        *earlier, last = rows
        with _quiet():
            if not self.metrics_api:
                self.lab.update_progress(last.percent)
                return
            append = self._append_row if earlier else None
            if append is not None:

                async def appended():
                    for row in earlier:
                        await append(progress=row.percent, metrics=row.metrics or None, step=row.step)

                _sync(appended())
            else:
                for row in earlier:
                    self.lab.update_progress(row.percent, metrics=row.metrics or None, step=row.step)
            self.lab.update_progress(last.percent, metrics=last.metrics or None, step=last.step)

    def trackio_log(self, rows: list[StepRow]) -> None:
        """Each measured row into the Trackio run the host asked for, with its step, before the SDK's
        `update_progress` copies Trackio's database to where the job's Trackio button reads it."""
        if self._trackio is None:
            return
        try:
            with _quiet():
                for row in rows:
                    metrics = {name: value for name, value in row.metrics.items() if name not in TRACKIO_SKIPS}
                    if metrics:
                        self._trackio.log(metrics, step=row.step)
        except Exception as exc:
            self._trackio_failed("log to", exc)

    def trackio_finish(self) -> None:
        """End the Trackio run (its last rows written) and copy its database where the host's dashboard reads it;
        `lab.finish` does both for a completed run, nothing does for a failed or stopped one."""
        if self._trackio is None:
            return
        try:
            with _quiet():
                self._trackio.finish()
                capture = getattr(self.lab, "capture_trackio_metadata", None)
                if capture is None:
                    self.lab.capture_active_trackio_run()
                else:
                    from trackio.utils import TRACKIO_DIR

                    _drop_stale_sidecars(str(TRACKIO_DIR), capture(db_path=str(TRACKIO_DIR)))
        except Exception as exc:
            self._trackio_failed("finish", exc)
        self._trackio = None

    def _trackio_failed(self, doing: str, exc: Exception) -> None:
        """One warning, then no more Trackio calls: the job's own metrics carry on, the run never fails for it."""
        log.warning("could not %s the job's Trackio run; its Trackio dashboard stops here: %s", doing, exc)
        self._trackio = None

    def set_fields(self, fields: dict[str, Any]) -> None:
        """Fields of the job's job_data."""
        with _quiet():
            for key, value in fields.items():
                _sync(self.lab.job.update_job_data_field(key, value))

    def stop_asked(self) -> bool:
        with _quiet():
            return _stop_asked(self.lab.job)

    def resume_request(self) -> tuple[str | None, dict[str, Any]]:
        """The checkpoint the job was asked to resume from (None: none), and the job's data."""
        lab = self.attach()
        with _quiet():
            return lab.get_checkpoint_to_resume(), lab.get_job_data() or {}

    def save_checkpoint(self, path: str, name: str) -> str:
        with _quiet():
            return self.lab.save_checkpoint(path, name)

    def save_model(self, path: str, name: str, parent_model: str | None, architecture: str | None) -> str:
        with _quiet():
            return self.lab.save_model(
                path,
                name=name,
                parent_model=parent_model,
                architecture=architecture,
                pipeline_tag="text-generation",  # else the SDK asks the Hub about the parent model
            )

    def save_artifact(self, path: str) -> str:
        with _quiet():
            return self.lab.save_artifact(path)

    def save_evals(self, answered: list[dict[str, str]]) -> str:
        """The trained model's sample answers as the job's evals (its Evals tab), scored by exact match."""
        import pandas  # here: only a lab SDK job's evals need it (it comes with datasets)

        table = pandas.DataFrame([{**sample, "score": samples.exact_match(sample)} for sample in answered])
        columns = {"input": "input", "output": "output", "expected_output": "expected_output", "score": "score"}
        with _quiet():
            return self.lab.save_artifact(table, name="sample_generations", type="evals", config={"evals": columns})

    def finish(self, message: str, score: dict[str, float], plot_path: str | None) -> None:
        with _quiet():
            self.lab.finish(message, score=score, plot_data_path=plot_path)

    def error(self, message: str) -> None:
        with _quiet():
            # error_msg is the text the job card shows for a failed job; the final status comes last.
            _sync(self.lab.job.update_job_data_field("error_msg", message))
            self.lab.error(message)

    def end(self, status: str, completion: str, message: str, extra: dict[str, Any]) -> None:
        with _quiet():
            _end_job(self.lab.job, status, completion, message, extra)

    def close_other(self, job_id: str, status: str, message: str) -> bool:
        """End another job of the experiment that a dead process left open; False when it was concluded (or is
        not a job of this experiment any more)."""
        lab = self.attach()
        with _quiet():
            try:
                job = _sync(_import_lab().Job.get(job_id, lab._experiment.id))
            except Exception:
                return False
            _whole_record_writes(job)
            return _close_left_open(job, status, message)

    def checkpoints_dir(self) -> str:
        """The job's checkpoints folder as the SDK names it: a local path, or a URI in a remote workspace."""
        if self._checkpoints_dir is None:
            lab = self.attach()
            with _quiet():
                self._checkpoints_dir = lab.get_checkpoints_dir()
        return self._checkpoints_dir

    def job_dir(self) -> str:
        """The job's folder in the workspace (a URI in a remote workspace)."""
        return posixpath.dirname(self.checkpoints_dir().rstrip("/"))

    @property
    def remote(self) -> bool:
        """Whether the job's folders are in a bucket (the workspace of a cloud provider)."""
        if self._remote is None:
            storage = _storage()
            self._remote = bool(storage is not None and storage.is_remote_path(str(_sync(self.attach().job.get_dir()))))
        return self._remote

    def work_dir(self) -> str:
        """The job's folder this machine trains in: the job's own, or for a job of a remote workspace a local
        folder named by the job (see `local_jobs_dir`)."""
        job_dir = self.job_dir()
        if not self.remote:
            return job_dir
        return os.path.join(local_jobs_dir(), posixpath.basename(job_dir))


# --- where parameters come from ------------------------------------------------------------------------


class ParamSource(Protocol):
    headless: bool  # every key must be known (a host adds keys of its own)

    def raw_params(self) -> dict[str, Any]: ...


class ConfigFile:
    """A headless run's JSON config (with --set overrides): every key must be known."""

    headless = True

    def __init__(self, params: dict[str, Any]):
        self.params = params

    def raw_params(self) -> dict[str, Any]:
        return dict(self.params)


class InputFile:
    """The legacy harness's input file: {"experiment": {...}, "config": {...}}."""

    headless = False

    def __init__(self, path: str):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidConfig([problem("input_file", f"cannot read {path} ({exc})", "Check the path")]) from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise InvalidConfig([problem("input_file", f"{path} has no config object", "Start it from TransformerLab")])
        self.config: dict[str, Any] = data["config"]
        self.experiment: dict[str, Any] = data.get("experiment") or {}

    def raw_params(self) -> dict[str, Any]:
        return dict(self.config)


class LabConfig:
    """Parameters from `lab.get_config()`: what the task or the job was given."""

    headless = False

    def __init__(self, sdk: LabSdk):
        self.sdk = sdk

    def raw_params(self) -> dict[str, Any]:
        return self.sdk.config()


# --- where outputs and checkpoints live ------------------------------------------------------------------


class Places(Protocol):
    def locations(self, p: Params) -> Where:
        """The adapter's folder, the checkpoints folder and the run's own folder."""

    def merged_location(self, p: Params) -> str:
        """Where fuse_model's merged model goes."""

    def checkpoint_to_resume(self, p: Params, world_size: int) -> Continued | None:
        """A checkpoint elsewhere to resume from; None: the newest complete one of the run's own folder, if any."""

    def earlier_runs(self, p: Params) -> list[tuple[Where, str]]:
        """The runs whose job this run may find left open by a dead process, with their job ids."""


class OutputDir:
    """<output_dir>/<adaptor_name>; checkpoints in <output_dir>/checkpoints/<adaptor_name>; the run's own files
    in <output_dir>/runs/<adaptor_name>."""

    def locations(self, p: Params) -> Where:
        root = os.path.abspath(os.path.expanduser(p.output_dir or "./outputs"))
        name = p.adaptor_name
        runs, checkpoints = os.path.join(root, "runs", name), os.path.join(root, "checkpoints", name)
        return Where(os.path.join(root, name), checkpoints, runs)

    def merged_location(self, p: Params) -> str:
        """Where fuse_model's merged model goes."""
        return self.locations(p).adapter_dir.rstrip(os.sep) + "-merged"

    def checkpoint_to_resume(self, p: Params, world_size: int) -> Continued | None:
        """A checkpoint elsewhere to resume from (the host's request, or an earlier job's unfinished run of the
        adapter); None: the newest complete one of this run's own checkpoints folder, if any."""
        return None

    def earlier_runs(self, p: Params) -> list[tuple[Where, str]]:
        """The runs whose job this run may find left open by a dead process: the earlier run of these outputs."""
        return [(self.locations(p), "")]


class LegacyPlaces(OutputDir):
    """The Train tab's adaptor_output_dir; a merged model goes to the workspace's models."""

    def locations(self, p):
        where = super().locations(p)
        return replace(where, adapter_dir=p.adaptor_output_dir or where.adapter_dir)

    def merged_location(self, p):
        base = os.path.basename(os.path.normpath(p.model_name))
        return os.path.join(workspace_dir(), "models", f"{base}_{p.adaptor_name}")


class LabJobPlaces:
    """The job's own folders; TransformerLab may name a checkpoint to resume from. A job of a remote workspace
    trains in a local folder of the same layout (`LabSdk.work_dir`); its sink's mirror uploads what the job keeps."""

    def __init__(self, sdk: LabSdk):
        self.sdk = sdk

    def locations(self, p):
        work = self.sdk.work_dir()
        checkpoints = os.path.join(work, "checkpoints") if self.sdk.remote else self.sdk.checkpoints_dir()
        return Where(os.path.join(work, "adaptor", p.adaptor_name), checkpoints, os.path.join(work, "sft"))

    def merged_location(self, p):
        return os.path.join(self.sdk.work_dir(), "merged", f"{p.adaptor_name}-merged")

    def checkpoint_to_resume(self, p, world_size):
        """The checkpoint the job page's "Restart from checkpoint" names; else, since every launch of a task is a
        new job with its own folders, the newest unfinished run of this adapter in the experiment (not under
        overwrite_output, and not for a sweep's children, which each train afresh)."""
        requested, job_data = self.sdk.resume_request()
        if requested:
            local = self._downloaded(requested) if _is_remote(requested) else requested
            return Continued(str(job_data.get("parent_job_id") or ""), local)
        if p.overwrite_output or "sweep_params" in job_data:
            return None
        if self.sdk.remote:
            log.info(
                "remote workspace: earlier jobs are not searched for an unfinished run of this adapter; "
                "use Restart from checkpoint on that job to continue it"
            )
            return None
        return unfinished_run(self.other_runs(), p.adaptor_name, world_size)

    def _downloaded(self, uri: str) -> str:
        """A checkpoint in the bucket, copied whole into this job's local folder (its identity file with it);
        the copy is moved into place only once complete, and reused by a later attempt of the same job."""
        target = os.path.join(self.sdk.work_dir(), "resume", posixpath.basename(uri.rstrip("/")))
        if os.path.isdir(target):
            return target
        partial = f"{target}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        log.info("downloading the checkpoint to resume from: %s -> %s", uri, target)
        try:
            _sync(_storage().copy_dir(uri, partial))
            os.replace(partial, target)
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise RunFailed(f"could not download the checkpoint to resume from ({uri}): {exc}") from None
        return target

    def earlier_runs(self, p):
        """Every other job's run in the experiment (each job has its own folders)."""
        return [] if self.sdk.remote else self.other_runs()

    def other_runs(self) -> list[tuple[Where, str]]:
        """The other jobs of this experiment, as (their folders, their id)."""
        job_dir = self.sdk.job_dir()
        jobs = os.path.dirname(job_dir.rstrip(os.sep))
        found = []
        for entry in sorted(os.listdir(jobs)) if os.path.isdir(jobs) else []:
            other = os.path.join(jobs, entry)
            if entry != os.path.basename(job_dir.rstrip(os.sep)) and os.path.isdir(os.path.join(other, "sft")):
                found.append((Where("", os.path.join(other, "checkpoints"), os.path.join(other, "sft")), entry))
        return found


# --- where progress, logs, the final status and models go ------------------------------------------------


class StepRow(NamedTuple):
    """One step's report: the job's percent done then, and what was measured (empty: the step alone)."""

    step: int
    percent: int
    metrics: dict[str, float]


def _say(messages: tuple[str, ...]) -> None:
    """Each message to our stderr, with the log's prefix."""
    for message in messages:
        log.info("%s", message)


class Sink(Protocol):
    job_id: str
    stopped_exit_code: int  # what a run stopped on request exits with

    def kill_grace_seconds(self) -> float | None:
        """Seconds between the host's stop signal and its SIGKILL of every process of the run; None: no kill."""

    def start(self, params: Params) -> None: ...

    def log(self, *messages: str) -> None:
        """One or more messages (the steps logged since the last call go out together), in order."""

    def progress(self, rows: list[StepRow]) -> None:
        """The steps reported since the last call, oldest first (at least one); the last is the job's progress
        and current metrics."""

    def checkpoints(self, paths: list[str]) -> None:
        """The complete checkpoints now in the checkpoints folder, oldest first."""

    def should_stop(self) -> bool:
        """The job's own stop request, for a host that does not signal the run."""

    def register_model(self, path: str, p: Params) -> str: ...

    def register_merged(self, path: str, p: Params) -> str: ...

    def artifact(self, path: str) -> None:
        """A file for the job's Artifacts (what `lab job download` fetches and the job page previews)."""

    def samples(self, answered: list[dict[str, str]]) -> None:
        """The trained model's sample answers (samples.py), where the host keeps them apart from the log."""

    def complete(self, message: str, score: dict[str, float], plot_path: str | None) -> None: ...

    def fail(self, message: str) -> None: ...

    def stopped(self, message: str) -> None: ...

    def close_left_open(self, job_id: str, status: str, message: str) -> bool:
        """End another job of this host that a dead process left open (see outputs.left_behind); True if it was."""


class NullSink:
    """Logs to stderr and nothing else: `--check` and `--dry-run` can never create or change a job."""

    job_id = ""
    stopped_exit_code = EXIT_STOPPED

    def kill_grace_seconds(self) -> float | None:
        return None

    def start(self, params) -> None:
        pass

    def log(self, *messages: str) -> None:
        _say(messages)

    def progress(self, rows) -> None:
        pass

    def checkpoints(self, paths) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def register_model(self, path, p) -> str:
        return path

    def register_merged(self, path, p) -> str:
        return path

    def artifact(self, path) -> None:
        pass

    def samples(self, answered) -> None:
        pass

    def complete(self, message, score, plot_path) -> None:
        pass

    def fail(self, message) -> None:
        pass

    def stopped(self, message) -> None:
        pass

    def close_left_open(self, job_id, status, message) -> bool:
        return False


class OtherNode(NullSink):
    """A node other than the main one of a multi-node run: the main node alone reports to the job, registers the
    models and ends the job; this one logs to its own output. It exits as the main node's host expects (0 for a
    stop under a task host, whose trap on every node counts any other exit as a crash)."""

    def __init__(self, main: Sink):
        self.stopped_exit_code = main.stopped_exit_code
        self._grace = main.kill_grace_seconds()

    def kill_grace_seconds(self):
        return self._grace


class LegacyJob:
    """TransformerLab 0.31/0.32's job store (`lab.Job(job_id)`), and the TensorBoard logs its Train tab charts."""

    stopped_exit_code = EXIT_STOPPED

    def __init__(self, source: InputFile):
        self.config = source.config
        self.experiment = source.experiment
        self.job_id = str(self.config.get("job_id", ""))
        self.output_dir = self.config.get("output_dir", "")
        self.job = None
        self._writer = None

    def start(self, params):
        if not self.job_id:
            raise InvalidConfig([problem("job_id", "the input file names no job", "Start the run from TransformerLab")])
        self._attach()
        _sync(self.job.update_job_data_field("start_time", _now()))

    def _attach(self) -> None:
        if self.job is None and self.job_id:
            self.job = self._job(self.job_id)

    def _job(self, job_id: str):
        lab = _import_lab()
        if len(inspect.signature(lab.Job).parameters) == 1:
            return lab.Job(job_id)
        name = self.experiment.get("name") or self.experiment.get("id") or self.config.get("experiment_name")
        return lab.Job(job_id, str(name))

    def kill_grace_seconds(self):
        return None

    def log(self, *messages):
        _say(messages)

    def checkpoints(self, paths):
        pass

    def artifact(self, path):
        pass  # 0.31/0.32 jobs have no artifacts: the picture lies in the adapter folder, which that host shows

    def samples(self, answered):
        pass  # 0.31/0.32 jobs have no evals: the log shows the samples, and samples.jsonl lies in the adapter folder

    def register_model(self, path, p):
        return path

    def close_left_open(self, job_id, status, message):
        job = self._job(job_id)
        if not os.path.isfile(os.path.join(_sync(job.get_dir()), "index.json")):
            return False  # not a job of this workspace (any more)
        return _close_left_open(job, status, message)

    def register_merged(self, path, p):
        # The model folder format of TransformerLab's local models (an index.json beside the weights).
        name = os.path.basename(path)
        config = model_config(path) or {}
        architecture = (config.get("architectures") or [p.model_architecture or ""])[0]
        description = {
            "model_id": f"TransformerLab/{name}",
            "model_filename": ".",
            "name": name,
            "local_model": True,
            "json_data": {
                "uniqueID": f"TransformerLab/{name}",
                "name": name,
                "model_filename": ".",
                "description": f"{p.model_name} fine-tuned with adapter {p.adaptor_name} (merged)",
                "source": "transformerlab",
                "architecture": architecture,
                "huggingface_repo": "",
                "parent_model": p.model_name,
            },
        }
        Path(path, "index.json").write_text(json.dumps(description, indent=2))
        return path

    def _field(self, key: str, value: Any) -> None:
        if self.job is not None:
            _sync(self.job.update_job_data_field(key, value))

    def progress(self, rows):
        if self.job is None:
            return
        _sync(self.job.update_progress(rows[-1].percent))
        measured = [row for row in rows if row.metrics]
        if measured:
            self._field("current_metrics", {**measured[-1].metrics, "step": measured[-1].step})
            self._tensorboard(measured)

    def _tensorboard(self, rows: list[StepRow]) -> None:
        """TransformerLab 0.31's Train tab charts a job from TensorBoard logs under its output_dir."""
        if not self.output_dir:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            folder = os.path.join(self.output_dir, f"job_{self.job_id}_{self.config.get('template_name') or 'sft'}")
            self._writer = SummaryWriter(folder)
            self._field("tensorboard_output_dir", self.output_dir)
        for row in rows:
            for name, value in row.metrics.items():
                if name != "eta_seconds":
                    tag = f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"
                    self._writer.add_scalar(tag, value, row.step)
        self._writer.flush()

    def should_stop(self) -> bool:
        return self.job is not None and _stop_asked(self.job)

    def _finish(self, status: str, completion: str, message: str, extra: dict[str, Any] | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
        # The job exists before we run (the host made it), so a failure before start() still ends it.
        self._attach()
        if self.job is not None:
            _end_job(self.job, status, completion, message, extra)

    def complete(self, message, score, plot_path):
        if self.job is not None:
            _sync(self.job.update_progress(100))
        extra = {"score": json.dumps(score)}
        if plot_path:
            extra["plot_data_path"] = plot_path
        self._finish("COMPLETE", "success", message, extra)
        if self.output_dir:
            # Hyperparameter sweeps read <output_dir>/metrics.json.
            os.makedirs(self.output_dir, exist_ok=True)
            metrics = {"train/loss": score.get("train/loss"), "eval/loss": score.get("eval/loss", score.get("loss"))}
            Path(self.output_dir, "metrics.json").write_text(json.dumps(metrics))

    def fail(self, message):
        self._finish("FAILED", "failed", message)

    def stopped(self, message):
        self._finish("STOPPED", "success", message)


class RemoteMirror:
    """A remote workspace's copies of what the run writes locally: the job's checkpoints folder made to hold what
    the local one holds, and the loss plot beside the job. Used for jobs of a remote workspace only."""

    def __init__(self, sdk: LabSdk):
        self.sdk = sdk
        # The checkpoints in the job's checkpoints folder there (name -> URI), and the names this run uploaded.
        self._remote_checkpoints: dict[str, str] | None = None
        self._uploaded: set[str] = set()

    def checkpoints(self, paths: list[str]) -> list[str]:
        """Each new checkpoint uploaded (`lab.save_checkpoint`), then those rotated away locally removed there. A
        failed upload is logged and tried again at the next save; training goes on. Returns the URIs there, oldest
        first."""
        storage = _storage()
        folder = self.sdk.checkpoints_dir()
        if self._remote_checkpoints is None:  # what an earlier attempt of this job may have left there
            with _quiet():
                found = _sync(storage.ls(folder, detail=False)) if _sync(storage.exists(folder)) else []
            names = (posixpath.basename(str(uri).rstrip("/")) for uri in found)
            self._remote_checkpoints = {n: storage.join(folder, n) for n in names if _is_checkpoint_name(n)}
        local = {os.path.basename(path.rstrip(os.sep)): path for path in paths}
        for name, path in local.items():
            if name in self._uploaded:
                continue
            try:
                self._remote_checkpoints[name] = self.sdk.save_checkpoint(path, name)
                self._uploaded.add(name)
            except Exception as exc:
                log.warning("could not upload %s to %s (tried again at the next save): %s", name, folder, exc)
        for name in [n for n in self._remote_checkpoints if n not in local]:
            try:
                _sync(storage.rm_tree(self._remote_checkpoints[name]))
                del self._remote_checkpoints[name]
                self._uploaded.discard(name)
            except Exception as exc:
                log.warning("could not remove checkpoint %s from %s: %s", name, folder, exc)
        return [uri for _, uri in sorted((checkpoints.step_of(n), u) for n, u in self._remote_checkpoints.items())]

    def plot(self, path: str) -> str | None:
        """The loss plot copied beside the job (`<job>/sft/`, where a local workspace has it), which the host reads
        through its storage; None (no plot) if the copy fails."""
        target = posixpath.join(self.sdk.job_dir(), "sft", os.path.basename(path))
        try:
            _sync(_storage().copy_file(path, target))
        except Exception as exc:
            log.warning("could not upload the loss plot to %s: %s", target, exc)
            return None
        return target


class _LabJob:
    """What a job of the current lab SDK is told, attached (TaskJob) or created by the run (HeadlessJob)."""

    METRIC_NAMES: ClassVar[dict[str, str]] = {
        "loss": "train/loss",
        "learning_rate": "train/learning_rate",
        "tokens_per_second": "train/tokens_per_second",
        "grad_norm": "train/grad_norm",
        "epoch": "train/epoch",
        "mean_token_accuracy": "train/mean_token_accuracy",
        "eval_loss": "eval/loss",
    }
    stopped_exit_code = EXIT_STOPPED
    moves_models = False  # whether registering moves a model into the job's models (else it stays where it is)

    def __init__(self, sdk: LabSdk):
        self.sdk = sdk
        self._listed: dict[str, Any] = {}  # job_data's checkpoint fields as last written

    @cached_property
    def mirror(self) -> RemoteMirror | None:
        """The bucket's copies, for a job of a remote workspace; None in a local one."""
        return RemoteMirror(self.sdk) if self.sdk.remote else None

    @property
    def job_id(self) -> str:
        return self.sdk.job_id

    def kill_grace_seconds(self):
        return None

    def _reachable(self) -> bool:
        """A job to write to."""
        raise NotImplementedError

    def log(self, *messages):
        _say(messages)
        if self.sdk.attached:
            self.sdk.log("\n".join(messages))  # one write to the job's log

    def progress(self, rows):
        if self.sdk.attached:
            # Named as TensorBoard names them (train/loss, eval/loss, ...): one Metrics chart each on the job page.
            named = [
                row._replace(metrics={self.METRIC_NAMES.get(k, k): v for k, v in row.metrics.items()}) for row in rows
            ]
            self.sdk.trackio_log(named)
            self.sdk.progress(named)

    def should_stop(self) -> bool:
        return False

    def checkpoints(self, paths):
        if not self.sdk.attached or not paths:
            return
        if self.mirror is not None:
            paths = self.mirror.checkpoints(paths)
        # The job page lists the checkpoints folder only once job_data.checkpoints is set.
        self._listed = {"checkpoints": list(paths), "latest_checkpoint": paths[-1] if paths else None}
        self.sdk.set_fields(self._listed)

    def register_model(self, path, p):
        return self._published(path, p.adaptor_name, p)

    def register_merged(self, path, p):
        return self._published(path, f"{p.adaptor_name}-merged", p)

    def _register(self, path: str, name: str, p) -> str:
        raise NotImplementedError

    def _published(self, path: str, name: str, p) -> str:
        """Registered with the job's models, and offered among the job's artifacts as `<name>.zip` (what `lab job
        download` fetches; see downloads): a small adapter whole, zipped before the folder moves; else its other
        files with WHERE.md, which names where the registration put the weights. The artifacts are a copy for the
        user's convenience: failing to make it is a warning, the registration is what counts."""
        bundle, whole, size = None, False, 0
        try:
            size, adapter = downloads.folder_bytes(path), downloads.is_adapter(path)
            whole = downloads.copied_whole(adapter, size)
            bundle = downloads.archive(path, name, weights=whole)
        except Exception as exc:
            log.warning("could not add %s to the job's artifacts: %s", name, exc)
        try:
            saved = self._register(path, name, p)
            if bundle is not None:
                if not whole:
                    text = downloads.pointer_text(name, size, adapter, saved, self.job_id, in_job=self.moves_models)
                    downloads.add_text(bundle, name, downloads.POINTER_FILE, text)
                self._offer(bundle, whole, size, saved)
        finally:
            if bundle is not None:
                shutil.rmtree(os.path.dirname(bundle), ignore_errors=True)
        return saved

    def _offer(self, bundle: str, whole: bool, size: int, saved: str) -> None:
        try:
            self.sdk.save_artifact(bundle)
        except Exception as exc:
            log.warning("could not add %s to the job's artifacts: %s", os.path.basename(bundle), exc)
            return
        held = (
            f"the whole adapter ({downloads.size_text(size)})"
            if whole
            else f"its card and {downloads.POINTER_FILE} (the weights stay at {saved})"
        )
        self.log(f"artifacts: {os.path.basename(bundle)}, {held}: `lab job download {self.job_id}`")

    def _save_model(self, path: str, name: str, p) -> str:
        return self.sdk.save_model(path, name, p.model_name or None, p.model_architecture or None)

    def artifact(self, path):
        if not self.sdk.attached:
            return
        try:
            self.sdk.save_artifact(path)
        except Exception as exc:  # a copy for the job page: the run's outputs are already in place
            log.warning("could not add %s to the job's artifacts: %s", os.path.basename(path), exc)

    def samples(self, answered):
        if not self.sdk.attached:
            return
        try:
            self.sdk.save_evals(answered)
        except Exception as exc:  # the job page's copy: the log and samples.jsonl already hold them
            log.warning("could not add the sample answers to the job's evals: %s", exc)

    def complete(self, message, score, plot_path):
        if plot_path and self.mirror is not None:
            plot_path = self.mirror.plot(plot_path)
        self.sdk.trackio_finish()
        self.sdk.finish(message, score, plot_path)

    def fail(self, message):
        if self._reachable():
            self.sdk.error(message)
            self.sdk.trackio_finish()  # after the final status, which a task's Stop or a crash must not lose

    def stopped(self, message):
        if self._reachable():
            # The checkpoints written again with the final status: a host's Stop writes the job's record while we
            # may be writing it, and a listing lost that way would leave the job page without its checkpoints.
            self.sdk.end("STOPPED", "success", message, self._listed)
            self.sdk.trackio_finish()

    def close_left_open(self, job_id, status, message):
        return self.sdk.close_other(job_id, status, message)


class TaskJob(_LabJob):
    """The job TransformerLab made for this task (current TransformerLab, _TFL_JOB_ID): it exists before the run,
    its Stop signals the run, and the models are moved into it."""

    moves_models = True
    # A task's Stop: SIGTERM to every process of the run, SIGKILL 3 s later; any exit but 0 then counts as a crash,
    # so a stopped run exits 0 once the job is STOPPED.
    KILL_GRACE = 3.0
    stopped_exit_code = EXIT_OK

    def kill_grace_seconds(self):
        return self.KILL_GRACE

    def start(self, params):
        self.sdk.attach()

    def _reachable(self) -> bool:
        self.sdk.attach()  # the host's job exists before we run, so a failure before start still ends it
        return True

    def should_stop(self) -> bool:
        """The job's own stop request (its Stop button sets job_data.stop and STOPPING), for a provider that
        does not signal the run."""
        return self.sdk.attached and self.sdk.stop_asked()

    def _register(self, path, name, p):
        saved = self._save_model(path, name, p)
        shutil.rmtree(path, ignore_errors=True)  # the job's models folder now holds it
        return saved


class HeadlessJob(_LabJob):
    """A headless run's own job in the local workspace, created when the run starts (a run refused before that
    leaves none); its outputs stay in output_dir and the job gets copies."""

    def __init__(self, sdk: LabSdk, config: dict[str, Any]):
        super().__init__(sdk)
        self.config = config
        self.started = False

    def start(self, params):
        self.sdk.set_parameters(self.config)
        self.started = True

    def _reachable(self) -> bool:
        return self.started

    def _register(self, path, name, p):
        try:
            self._save_model(path, name, p)
        except Exception as exc:  # a convenience here: the output is already in place
            log.warning("could not register %s with the workspace: %s", name, exc)
        return path


@dataclass(frozen=True)
class Host:
    params_from: ParamSource
    places: Places
    sink: Sink

    @property
    def headless(self) -> bool:
        return self.params_from.headless

    def on_machine(self, rank: int) -> Host:
        """This host as the node of that machine rank sees it: the main node (0) reports to the job; another node
        reports nothing (OtherNode)."""
        return self if rank == 0 else replace(self, sink=OtherNode(self.sink))


def read_config(path: str, overrides: list[str]) -> dict[str, Any]:
    try:
        params = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InvalidConfig([problem("--config", f"cannot read {path} ({exc.strerror})", "Check the path")]) from None
    except ValueError as exc:
        raise InvalidConfig([problem("--config", f"{path} is not valid JSON ({exc})", "Fix the file")]) from None
    if not isinstance(params, dict):
        raise InvalidConfig([problem("--config", f"{path} is not a JSON object", 'Give {"key": value, ...}')])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidConfig([problem("--set", f"{item!r} is not key=value", "Write --set learning_rate=1e-4")])
        params[key.strip()] = value
    return params


def choose(args, nodes=None) -> Host:
    """The host for this start: input file (legacy harness), _TFL_JOB_ID (lab SDK), or --config (headless)."""
    if args.input_file:
        source = InputFile(args.input_file)
        return Host(source, LegacyPlaces(), LegacyJob(source))
    if args.config:
        config = read_config(args.config, args.set or [])
        return Host(ConfigFile(config), OutputDir(), HeadlessJob(LabSdk(args.experiment or "alpha"), config))
    if os.environ.get("_TFL_JOB_ID"):
        sdk = LabSdk(None, read_only=nodes is not None and nodes.rank > 0)
        return Host(LabConfig(sdk), LabJobPlaces(sdk), TaskJob(sdk))
    raise InvalidConfig(
        [problem("--config", "no parameters given", "Run `python main.py --config run.json` (see README.md)")]
    )
