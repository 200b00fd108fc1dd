"""Run outputs: the adapter folder is written under a temporary name and renamed into place, with
`training_summary.json` inside; checkpoints are found for resuming."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import checkpoints, report, samples
from .errors import InvalidConfig, RunFailed, problem
from .machine import existing_parent
from .params import HARD_KEYS, MANIFEST, SOFT_KEYS, Params
from .runfolder import IDENTITY_FILE, RunFolder
from .sources import read_json, write_whole

log = logging.getLogger("sft")
SUMMARY_FILE = "training_summary.json"
LIBRARIES = ("trl", "transformers", "accelerate", "peft", "datasets", "torch", "transformerlab")


def staging_path(final: str) -> str:
    return f"{final.rstrip(os.sep)}.partial-{os.getpid()}"


def is_complete_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SUMMARY_FILE))


def versions() -> dict[str, str]:
    from importlib import metadata  # 25 ms: only once a run has outputs to describe

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["plugin"] = json.loads(MANIFEST.read_text()).get("version", "")
    return found


def publish(staging: str, final: str, summary: dict[str, Any]) -> str:
    """Write the summary into the staged folder, then move it into place in one rename."""
    Path(staging, SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    old = None
    if os.path.isdir(final):
        if os.listdir(final):
            old = f"{final}.old-{os.getpid()}"
            os.replace(final, old)
        else:
            os.rmdir(final)  # hosts may create the folder beforehand
    os.replace(staging, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return os.path.abspath(final)


# What a resumed run shares with the run that saved its checkpoint, as the user asked it (never what `auto`
# became): the parameters params.py declares HARD (a change makes the checkpoint unusable, or its resumed data
# position wrong: refused) and SOFT (a change applies from the resume point on: a warning). The world size and the
# prepared data's fingerprint are hard too.
IDENTITY_VERSION = 2
SHOWN = {"dataset": "dataset_name (its content or preparation)", "world_size": "num_processes (world size)"}


def identity(p: Params, world_size: int, data_key: str | None, derived: dict | None = None) -> dict:
    """What run_params.json records: the asked values compared on resume, and what was derived, shown beside."""
    return {
        "version": IDENTITY_VERSION,
        "asked": p.resume_identity().asked(),
        "world_size": world_size,
        "dataset": data_key,
        "derived": derived or {},
    }


def _compared(recorded: dict[str, Any]) -> dict[str, Any]:
    """The compared values of a recorded identity; run_params.json of version 1 was one flat dict."""
    asked = recorded.get("asked", recorded)
    return {**asked, "world_size": recorded.get("world_size"), "dataset": recorded.get("dataset")}


def _writable(path: str) -> bool:
    return os.access(existing_parent(path), os.W_OK)


@dataclass(frozen=True)
class Where:
    """Where a run's outputs go (the host decides): the adapter; the checkpoints folder, which holds
    `checkpoint-N` folders and nothing else; and the run's own folder (its lock, the loss plot, the staging
    folder of checkpoint saves), which no run ever deletes."""

    adapter_dir: str
    checkpoint_dir: str
    run_dir: str

    @property
    def lock_path(self) -> str:
        return os.path.join(self.run_dir, "lock")

    @property
    def saving_dir(self) -> str:
        """Where the ranks save a checkpoint before it is moved into the checkpoints folder."""
        return os.path.join(self.run_dir, "saving")

    @property
    def plot_path(self) -> str:
        return os.path.join(self.run_dir, "loss_plot.json")

    @property
    def record_path(self) -> str:
        return os.path.join(self.run_dir, RUN_RECORD_FILE)


RUN_RECORD_FILE = "run.json"


def write_record(where: Where, adaptor_name: str, job_id: str, *, finished: bool) -> None:
    """The run's record in its own folder: which adapter, which job, since when, and whether it finished. A later
    job of the same adapter finds an unfinished run by it (see `unfinished_run`)."""
    os.makedirs(where.run_dir, exist_ok=True)
    previous = read_record(where.run_dir) or {}
    record = {
        "adaptor_name": adaptor_name,
        "job_id": job_id,
        "started": previous.get("started", time.time()),
        "finished": finished,
    }
    write_whole(where.record_path, json.dumps(record))


def read_record(run_dir: str) -> dict[str, Any] | None:
    return read_json(os.path.join(run_dir, RUN_RECORD_FILE)) or None


@dataclass(frozen=True)
class LeftBehind:
    """A run whose controlling process died without concluding its job (killed, out of memory, its machine gone):
    its record says unfinished and nothing holds its lock. Its ranks may have saved a checkpoint on the way out."""

    job_id: str
    checkpoint: str | None

    @property
    def status(self) -> str:
        return "STOPPED" if self.checkpoint else "FAILED"

    def message(self, found_by: str) -> str:
        ended = "The process running this job ended without concluding it (killed, out of memory, or its machine lost)"
        if self.checkpoint:
            step = checkpoints.step_of(self.checkpoint)
            return (
                f"{ended}; its training saved a checkpoint at step {step} ({self.checkpoint}), which a new run of the "
                f"same adapter resumes from. Found and closed by job {found_by}."
            )
        return f"{ended}, before any checkpoint was saved. Found and closed by job {found_by}."


def left_behind(runs: list[tuple[Where, str]], current_job: str, held: str | None = None) -> list[LeftBehind]:
    """Of these runs ((where, job id) each), those whose job a dead process left open: unfinished record, free
    lock (or the lock at `held`, which this run took: no other process held it then). Whether the job itself
    still says RUNNING is the host's to check."""
    found = []
    for where, job_id in runs:
        record = read_record(where.run_dir) or {}
        job = str(record.get("job_id") or job_id or "")
        if not job or job == current_job or record.get("finished") is not False:
            continue
        if where.lock_path == held or RunLock.holder(where.lock_path) is None:
            found.append(LeftBehind(job, checkpoints.latest(where.checkpoint_dir)))
    return found


@dataclass(frozen=True)
class Continued:
    """An earlier job's unfinished run of the same adapter, and the checkpoint this run continues it from."""

    job_id: str
    checkpoint: str

    @property
    def step(self) -> int:
        return checkpoints.step_of(self.checkpoint)


def unfinished_run(runs: list[tuple[Where, str]], adaptor_name: str, world_size: int) -> Continued | None:
    """Of the runs of other jobs ((where, job id) each), the newest one of this adapter, if it is unfinished, has
    a complete checkpoint and is not running now: the run a new job of the same adapter continues. A newer run
    that finished (or is running) means nothing to continue."""
    found = []
    for where, job_id in runs:
        record = read_record(where.run_dir)
        if record and record.get("adaptor_name") == adaptor_name:
            found.append((float(record.get("started") or 0), job_id, where, record))
    for _, job_id, where, record in sorted(found, key=lambda item: item[0], reverse=True):
        if record.get("finished") or RunLock.holder(where.lock_path):
            return None
        latest = checkpoints.latest(where.checkpoint_dir, world_size)
        if latest:
            return Continued(job_id, latest)
    return None


@dataclass(frozen=True)
class OutputFacts:
    """The output folders and what they hold, found without changing anything."""

    adapter_dir: str
    checkpoint_dir: str
    adapter_complete: bool
    # The checkpoint this run resumes from (the host's request, or the newest complete one); None: a fresh start.
    resume_from: str | None
    recorded: dict[str, Any] | None  # the identity of the run that saved that checkpoint
    identity: dict[str, Any]  # this run's
    lock_holder: str | None
    unwritable: tuple[str, ...] = ()
    where: Where | None = None

    def changed(self) -> list[str]:
        """Compared values that differ from the recorded run (the dataset only once this run's is known)."""
        if self.recorded is None:
            return []
        saved, mine = _compared(self.recorded), _compared(self.identity)
        return [k for k in mine if k in saved and saved[k] != mine[k] and not (k == "dataset" and mine[k] is None)]

    def hard_changes(self) -> list[str]:
        """Changes that make the checkpoint unusable for this run (the dataset is checked with the data)."""
        return [k for k in self.changed() if k in HARD_KEYS or k == "world_size"]

    def soft_changes(self) -> list[str]:
        """Changes the run resumes with, from the checkpoint's step on."""
        return [k for k in self.changed() if k in SOFT_KEYS]

    def dataset_changed(self, key: str) -> bool:
        return self.recorded is not None and _compared(self.recorded).get("dataset") not in (None, key)

    @staticmethod
    def shown(names: list[str]) -> list[str]:
        return [SHOWN.get(name, name) for name in names]


def recorded_identity(checkpoint: str) -> dict[str, Any] | None:
    """The identity of the run that saved `checkpoint`: inside it, or (saved by an older version) beside it."""
    for path in (os.path.join(checkpoint, IDENTITY_FILE), os.path.join(os.path.dirname(checkpoint), IDENTITY_FILE)):
        if os.path.isfile(path):
            try:
                recorded = json.loads(Path(path).read_text())
            except ValueError:
                return None
            return recorded if isinstance(recorded, dict) else None
    return None


def inspect(
    where: Where,
    this_run: dict[str, Any],
    *,
    overwrite: bool,
    requested: str | None = None,
) -> OutputFacts:
    """The facts validation needs about the outputs. With overwrite_output, a finished adapter or a checkpoint
    that cannot be resumed means a fresh start (the old checkpoints are removed at launch, not here).
    `requested`: a checkpoint named by the host (or found in an earlier job of this adapter) to resume from."""
    complete = is_complete_adapter(where.adapter_dir)
    resume = requested or checkpoints.latest(where.checkpoint_dir, this_run["world_size"])
    facts = OutputFacts(
        adapter_dir=where.adapter_dir,
        checkpoint_dir=where.checkpoint_dir,
        adapter_complete=complete,
        resume_from=resume,
        recorded=recorded_identity(resume.rstrip(os.sep)) if resume else None,
        identity=this_run,
        lock_holder=RunLock.holder(where.lock_path),
        unwritable=tuple(path for path in (where.adapter_dir, where.checkpoint_dir) if not _writable(path)),
        where=where,
    )
    # A finished adapter is not resumed: without overwrite_output the run is refused, with it it starts afresh;
    # so is a checkpoint overwrite_output may replace because it cannot be resumed.
    if not requested and (complete or (overwrite and facts.hard_changes())):
        facts = replace(facts, resume_from=None, recorded=None)
    return facts


def prepare_checkpoints(out: OutputFacts) -> str | None:
    """Make the checkpoint folder what validation saw: emptied for a fresh start that replaces older
    checkpoints, else cleared of saves newer than the resume point, and of anything that is no complete
    checkpoint; the staging folder of saves cut off midway is emptied. Returns the resume point."""
    if out.where is not None:
        shutil.rmtree(out.where.saving_dir, ignore_errors=True)
    world_size = out.identity["world_size"]
    for step, path in checkpoints.listed(out.checkpoint_dir):
        if out.resume_from is None:
            stale = True
        elif os.path.dirname(out.resume_from.rstrip(os.sep)) == out.checkpoint_dir.rstrip(os.sep):
            stale = step > checkpoints.step_of(out.resume_from) or not checkpoints.is_complete(path, world_size)
        else:  # resuming from another job's checkpoint: this folder's own are leftovers
            stale = not checkpoints.is_complete(path, world_size)
        if stale:
            shutil.rmtree(path, ignore_errors=True)
    return out.resume_from


def _same_file(path: str, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


class RunLock:
    """One run per output: a second run on the same outputs is refused, not interleaved. The lock is the
    kernel's (flock) on a file in the run's own folder, so it goes away only with the processes that hold it:
    this one and the ranks' launcher, which inherits it. Only a run that ends before training removes the file
    (`discard`, while holding it); a run locks a file only while it is the one at the path."""

    def __init__(self, path: str):
        self.path = path
        self.handle = None
        self._created: list[str] = []  # the folders taken with the lock, which `discard` removes again

    @staticmethod
    def holder(path: str) -> str | None:
        """Who holds the lock now (None when free), found without taking it for longer than a moment and
        without creating anything."""
        import fcntl

        try:
            handle = open(path)  # noqa: SIM115 - closed below
        except OSError:
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        finally:
            handle.close()
        return None

    def __enter__(self) -> RunLock:
        import fcntl

        folder = os.path.dirname(self.path)
        while folder and not os.path.isdir(folder):
            self._created.insert(0, folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            self.handle = open(self.path, "a+")
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                break
            if _same_file(self.path, self.handle.fileno()):
                self.handle.truncate(0)
                self.handle.write(f"pid {os.getpid()}\n")
                self.handle.flush()
                return self
            # A run that ended before training removed the file between our open and our lock: lock the one
            # in its place (or a new one), never the removed file, which no other run would see.
            self.handle.close()
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.handle.seek(0)
        holder = self.handle.read().strip() or "another process"
        self.handle.close()
        raise InvalidConfig(
            [
                problem(
                    "adaptor_name",
                    f"another run ({holder}) is writing this adapter's outputs",
                    "Wait for it to finish, or pick another adaptor_name",
                )
            ]
        )

    def discard(self) -> None:
        """Remove the lock file, and the folders made for it, while still holding it: a run that ended before
        training leaves nothing in the outputs. A run that opened the file meanwhile sees it removed once it
        holds the lock, and takes a new one."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only while empty: another run may have written there since

    def fileno(self) -> int | None:
        """The lock's descriptor, for processes that hold the lock with us (the ranks' launcher)."""
        return self.handle.fileno() if self.handle is not None else None

    def __exit__(self, *exc) -> None:
        # Closed, never unlocked: the lock is the open file's, and it lasts while any process that inherited it
        # (ranks still saving after a stop) lives.
        self.handle.close()


class Staged:
    """The adapter (and merged model) are written under temporary names beside their final places and
    renamed into place only when the run completes; any other ending removes them."""

    def __init__(self, adapter_dir: str, merged_dir: str | None):
        self.adapter_dir = adapter_dir
        self.merged_dir = merged_dir
        self.adapter_staging = staging_path(adapter_dir)
        self.merged_staging = staging_path(merged_dir) if merged_dir else None

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        for path in (self.adapter_staging, self.merged_staging):
            if path:
                shutil.rmtree(path, ignore_errors=True)

    def describe(self, summary_data: dict[str, Any], curve: str | None, answered: list[dict[str, str]]) -> None:
        """The model card (in place of TRL's) and the loss curve it shows, in each staged folder, so that they are
        published with it: an adapter's card loads it with peft; a merged or fully trained model's, alone. The card
        shows the sample answers too."""
        adapter = summary_data["parameters"]["training_mode"] != "full"
        for staging, final, peft in (
            (self.adapter_staging, self.adapter_dir, adapter),
            (self.merged_staging, self.merged_dir, False),
        ):
            if staging and os.path.isdir(staging):
                if curve:
                    shutil.copy2(curve, staging)
                report.write_card(staging, final, summary_data, peft=peft, samples=answered)

    def keep_samples(self, answered: list[dict[str, str]]) -> None:
        """The trained model's sample answers as samples.jsonl in the staged adapter folder, published with it. A
        file that cannot be written is a warning: the adapter matters more."""
        if not answered or not os.path.isdir(self.adapter_staging):
            return
        try:
            write_whole(os.path.join(self.adapter_staging, samples.SAMPLES_FILE), samples.to_jsonl(answered))
        except OSError as exc:
            log.warning("could not write %s beside the adapter: %s", samples.SAMPLES_FILE, exc)

    def publish(self, host, p: Params, summary_data: dict[str, Any]) -> str:
        """Move the outputs into place and register them with the host; returns the adapter's path."""
        if not os.path.isdir(self.adapter_staging):
            raise RunFailed(f"the training processes wrote no adapter to {self.adapter_staging}")
        try:
            adapter = publish(self.adapter_staging, self.adapter_dir, summary_data)
            merged = publish(self.merged_staging, self.merged_dir, summary_data) if self.merged_staging else None
        except OSError as exc:
            raise RunFailed(
                f"could not write the outputs ({exc.strerror or exc}: {exc.filename or self.adapter_dir}); "
                "free disk space or fix the folder's permissions, then run again to resume"
            ) from None
        # Registered only once everything is in place: a failure above leaves nothing half-registered.
        if merged:
            host.register_merged(merged, p)
        return host.register_model(adapter, p)


class RunSession:
    """One run's hold on its outputs, from the job's start to its end: the staging folders of the adapter and the
    merged model, the checkpoints folder made ready to resume, and the run record (unfinished until `finished`),
    under the run lock (on the main node; the other nodes of a multi-node run write beside it, under its lock)
    in the run folder the ranks meet in, both taken when the ranks started. Leaving it removes what was staged and
    not published."""

    def __init__(
        self,
        out: OutputFacts,
        job_id: str,
        adaptor_name: str,
        *,
        merged: str | None,
        main_node: bool,
        identity: dict,
        folder: RunFolder,
    ):
        self.out = out
        self.job_id = job_id
        self.adaptor_name = adaptor_name
        self.merged = merged
        self.main_node = main_node
        self.identity = identity
        self._stack = contextlib.ExitStack()
        self.staged: Staged | None = None
        self.folder = folder
        self.resume_from: str | None = None

    def __enter__(self) -> RunSession:
        with self._stack as stack:
            self.staged = stack.enter_context(Staged(self.out.adapter_dir, self.merged))
            self.resume_from = prepare_checkpoints(self.out)
            self._record(finished=False)
            self.folder.write_identity(self.identity)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _record(self, *, finished: bool) -> None:
        if self.main_node:
            write_record(self.out.where, self.adaptor_name, self.job_id, finished=finished)

    def finished(self) -> None:
        """The run ended as it should: its record says so, and no later run takes its job for one left open."""
        self._record(finished=True)


def score(result) -> dict[str, float]:
    """The job's score (info.md, "As a task"): `loss` is the eval loss when there is an eval split, else the final
    training loss; `train/loss` and, with an eval split, `eval/loss` are the keys TransformerLab's sweeps rank by."""
    values = {"loss": result.eval_loss if result.eval_loss is not None else result.final_loss}
    values["train/loss"] = result.final_loss
    if result.eval_loss is not None:
        values["eval/loss"] = result.eval_loss
    return values


def completion_message(result, adapter: str | None) -> str:
    where = f"adapter at {adapter}" if adapter else "the main node writes the adapter"
    resumed = f", resumed at step {result.resumed_from_step}" if result.resumed_from_step else ""
    return f"Trained {result.steps} steps on {result.world_size} process(es){resumed}; {where}"


def write_plot(path: str, history: list[dict[str, Any]]) -> str | None:
    if not history:
        return None
    figure = {
        "data": [
            {
                "x": [h["step"] for h in history],
                "y": [h["loss"] for h in history],
                "type": "scatter",
                "mode": "lines",
                "name": "train loss",
            }
        ],
        "layout": {"title": "Training loss", "xaxis": {"title": "step"}, "yaxis": {"title": "loss"}},
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Path(path).write_text(json.dumps(figure))
    return path


def summary(p: Params, plan, result, stats, startup: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": p.as_dict(),
        "plan": plan.as_dict(),
        "world_size": result.world_size,
        "steps": result.steps,
        "max_steps": result.max_steps,
        "final_loss": result.final_loss,
        "eval_loss": result.eval_loss,
        "runtime_seconds": round(result.runtime, 2),
        "seconds_to_first_step": result.startup_seconds,
        # Seconds from process start at which each stage ended.
        "startup": {**(startup or {}), **result.rank_startup, "first_step": result.startup_seconds},
        "resumed_from_step": result.resumed_from_step,
        "peak_gpu_memory_mib": result.peak_gpu_memory_mib,
        "dataset": stats.as_dict(),
        "versions": versions(),
    }
