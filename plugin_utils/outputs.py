"""Run outputs: the adapter folder is written under a temporary name and renamed into place, with
`training_summary.json` inside; checkpoints are found for resuming."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import InvalidConfig, RunFailed, problem

SUMMARY_FILE = "training_summary.json"
LIBRARIES = ("trl", "transformers", "accelerate", "peft", "datasets", "torch", "transformerlab")


def staging_path(final: str) -> str:
    return f"{final.rstrip(os.sep)}.partial-{os.getpid()}"


def is_complete_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SUMMARY_FILE))


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    manifest = Path(__file__).resolve().parent.parent / "index.json"
    found["plugin"] = json.loads(manifest.read_text()).get("version", "")
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


def _checkpoint_complete(path: str, world_size: int) -> bool:
    """A finished save: trainer_state.json (written last by rank 0) and every rank's RNG state."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return False
    if world_size > 1:
        return all(os.path.isfile(os.path.join(path, f"rng_state_{rank}.pth")) for rank in range(world_size))
    return True


def _checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N folder in `folder`."""
    if not os.path.isdir(folder):
        return []
    steps = [(entry.removeprefix("checkpoint-"), entry) for entry in os.listdir(folder)]
    return [(int(step), os.path.join(folder, entry)) for step, entry in steps if step.isdigit()]


def latest_checkpoint(folder: str, world_size: int = 1) -> str | None:
    """The newest checkpoint whose save finished; one cut off mid-save is skipped."""
    found = [(step, path) for step, path in _checkpoints(folder) if _checkpoint_complete(path, world_size)]
    return max(found)[1] if found else None


# What a resumed run shares with the run that saved its checkpoint, as the user asked it (never what `auto`
# became). A change to a HARD key makes the checkpoint unusable, or its resumed data position wrong: refused.
# A change to a SOFT key only changes what happens from the resume point on: a warning. The world size and
# the prepared data's fingerprint are hard too.
HARD_KEYS = (
    "model_name",
    "training_mode",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "distributed_strategy",
    "maximum_sequence_length",
    "batch_size",
    "gradient_accumulation_steps",
    "packing",
    "seed",
)
SOFT_KEYS = (
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "learning_rate_schedule",
    "warmup_ratio",
    "lora_dropout",
    "save_steps",
    "logging_steps",
)
RUN_PARAMS_FILE = "run_params.json"
IDENTITY_VERSION = 2
SHOWN = {"dataset": "dataset_name (its content or preparation)", "world_size": "num_processes (world size)"}


def identity(p: Mapping[str, Any], world_size: int, data_key: str | None, derived: dict | None = None) -> dict:
    """What run_params.json records: the asked values compared on resume, and what was derived, shown beside."""
    return {
        "version": IDENTITY_VERSION,
        "asked": {k: p[k] for k in (*HARD_KEYS, *SOFT_KEYS)},
        "world_size": world_size,
        "dataset": data_key,
        "derived": derived or {},
    }


def _compared(recorded: dict[str, Any]) -> dict[str, Any]:
    """The compared values of a recorded identity; run_params.json of version 1 was one flat dict."""
    asked = recorded.get("asked", recorded)
    return {**asked, "world_size": recorded.get("world_size"), "dataset": recorded.get("dataset")}


def _writable(path: str) -> bool:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return os.access(probe, os.W_OK)


@dataclass(frozen=True)
class OutputFacts:
    """The output folders and what they hold, found without changing anything."""

    adapter_dir: str
    checkpoint_dir: str
    adapter_complete: bool
    # The checkpoint this run resumes from (the host's request, or the newest complete one); None: a fresh start.
    resume_from: str | None
    recorded: dict[str, Any] | None  # run_params.json beside that checkpoint
    identity: dict[str, Any]  # this run's
    lock_holder: str | None
    unwritable: tuple[str, ...] = ()

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


def inspect(
    adapter_dir: str,
    checkpoint_dir: str,
    this_run: dict[str, Any],
    *,
    overwrite: bool,
    requested: str | None = None,
) -> OutputFacts:
    """The facts validation needs about the outputs. With overwrite_output, a finished adapter or a checkpoint
    that cannot be resumed means a fresh start (the old checkpoints are removed at launch, not here)."""
    complete = is_complete_adapter(adapter_dir)
    if requested:
        resume, folder = requested, os.path.dirname(requested.rstrip(os.sep))
    else:
        resume, folder = latest_checkpoint(checkpoint_dir, this_run["world_size"]), checkpoint_dir
    recorded_path = os.path.join(folder, RUN_PARAMS_FILE)
    recorded = None
    if resume and os.path.isfile(recorded_path):
        try:
            recorded = json.loads(Path(recorded_path).read_text())
        except ValueError:
            recorded = None
    facts = OutputFacts(
        adapter_dir=adapter_dir,
        checkpoint_dir=checkpoint_dir,
        adapter_complete=complete,
        resume_from=resume,
        recorded=recorded if isinstance(recorded, dict) else None,
        identity=this_run,
        lock_holder=RunLock.holder(checkpoint_dir),
        unwritable=tuple(path for path in (adapter_dir, checkpoint_dir) if not _writable(path)),
    )
    # A finished adapter is not resumed: without overwrite_output the run is refused, with it it starts afresh;
    # so is a checkpoint overwrite_output may replace because it cannot be resumed.
    if not requested and (complete or (overwrite and facts.hard_changes())):
        facts = replace(facts, resume_from=None, recorded=None)
    return facts


def prepare_checkpoints(out: OutputFacts) -> str | None:
    """Make the checkpoint folder what validation saw: emptied for a fresh start that replaces older
    checkpoints, else cleared of saves newer than the resume point (cut off mid-save). Returns the resume point."""
    if out.resume_from is None:
        for _, path in _checkpoints(out.checkpoint_dir):
            shutil.rmtree(path, ignore_errors=True)
        return None
    if os.path.dirname(out.resume_from.rstrip(os.sep)) == out.checkpoint_dir.rstrip(os.sep):
        _remove_unfinished(out.checkpoint_dir, out.resume_from)
    return out.resume_from


def _remove_unfinished(checkpoint_dir: str, keep: str) -> None:
    """Checkpoints newer than the resume point were cut off mid-save; the trainer must not meet them."""
    keep_step = int(os.path.basename(keep.rstrip(os.sep)).removeprefix("checkpoint-"))
    for step, path in _checkpoints(checkpoint_dir):
        if step > keep_step:
            shutil.rmtree(path, ignore_errors=True)


def record_run(checkpoint_dir: str, this_run: dict[str, Any]) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    Path(checkpoint_dir, RUN_PARAMS_FILE).write_text(json.dumps(this_run, indent=2, default=str))


class RunLock:
    """One run per output: a second run on the same checkpoint folder is refused, not interleaved.
    The lock is the kernel's (flock), so it goes away with the process that held it."""

    def __init__(self, checkpoint_dir: str):
        self.path = os.path.join(checkpoint_dir, ".lock")
        self.handle = None

    @staticmethod
    def holder(checkpoint_dir: str) -> str | None:
        """Who holds the lock on this folder now (None when free), found without taking it for longer than a
        moment and without creating anything."""
        import fcntl

        path = os.path.join(checkpoint_dir, ".lock")
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

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise InvalidConfig(
                [
                    problem(
                        "adaptor_name",
                        f"another run ({holder}) is writing {os.path.dirname(self.path)}",
                        "Wait for it to finish, or pick another adaptor_name",
                    )
                ]
            ) from None
        self.handle.truncate(0)
        self.handle.write(f"pid {os.getpid()}\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self.handle, fcntl.LOCK_UN)
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

    def publish(self, host, p: Mapping[str, Any], summary_data: dict[str, Any]) -> str:
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


def score(result) -> dict[str, float]:
    """The job's score (SPEC §7): `loss` is the eval loss when there is an eval split, else the final training
    loss; `train/loss` and, with an eval split, `eval/loss` are the keys TransformerLab's sweeps rank by."""
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


def summary(
    p: dict[str, Any], plan, result, stats: dict[str, Any], startup: dict[str, float] | None = None
) -> dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": dict(p),
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
        "dataset": stats,
        "versions": versions(),
    }
