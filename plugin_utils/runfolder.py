"""The run folder: the one place parent and ranks meet. This module alone knows its files:

- `spec.json`: the typed, versioned run spec (`RunSpec`): everything a rank needs, written by the parent;
- `events.jsonl`: typed events (`Started`, `Progress`, `Logged`, `CheckpointSaved`, `Stopped`, `Sampled`, `Done`),
  appended by rank 0 and tailed by the parent (only the parent talks to the host, so the host's job files,
  read-modify-write without a lock, have one writer);
- `STOP`: the parent's stop request;
- `error-rank<N>.txt`: a failing rank's exception, for the failure message;
- `logs/`: the launcher's output and each rank's own (`rank-N.log`), which the parent tails;
- `run_params.json`: the run's identity, which the first rank copies into every checkpoint it saves;
- the strategy's generated accelerate / DeepSpeed configs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

SPEC_VERSION = 4
SPEC_FILE = "spec.json"
EVENTS_FILE = "events.jsonl"
STOP_FILE = "STOP"
LOGS_DIR = "logs"
IDENTITY_FILE = "run_params.json"
ACCELERATE_CONFIG = "accelerate_config.json"
DEEPSPEED_CONFIG = "deepspeed_config.json"


def process_start() -> float:
    """When this process started (epoch seconds): start-up stages are timed from it, in parent and ranks. Read
    from /proc as psutil reads it on Linux (the boot time plus the process's start in clock ticks), without
    importing psutil (30 ms of `--check`); psutil elsewhere."""
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        import psutil

        return psutil.Process().create_time()


@dataclass(frozen=True)
class LoraSettings:
    """The adapter, as the ranks build it (params.Params.lora)."""

    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: tuple[str, ...]  # ("all-linear",) or module names


@dataclass(frozen=True)
class TrainingSettings:
    """The optimisation, the schedule, and what is logged and saved, as the ranks run it (params.Params.training)."""

    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    learning_rate_schedule: str
    warmup_ratio: float
    num_train_epochs: float
    max_steps: int
    seed: int
    logging_steps: int
    save_steps: int
    save_total_limit: int


# What report_to may name: the trackers the trainer logs to itself, each beside the run's outputs.
REPORTERS = ("tensorboard", "trackio", "wandb")


def reporter_names(value: str) -> list[str]:
    """The names a report_to value lists (a comma list, lower-cased); none for 'none' or empty."""
    names = [name.strip().lower() for name in (value or "").split(",") if name.strip()]
    return [name for name in names if name != "none"]


@dataclass(frozen=True)
class Reporting:
    """Where the first rank's trainer reports its logs besides the job (report_to), decided by the parent, which
    also points each tracker's folder there through the ranks' environment (launch.reporting_env)."""

    reporters: tuple[str, ...] = ()  # what the trainer's report_to gets
    folder: str = ""  # <the run's folder>/logs: each tracker's files in a folder of its own name beneath it
    project: str = ""  # the adapter's name: Trackio's and W&B's project
    run_name: str = ""  # when the run started: Trackio's and W&B's run, and TensorBoard's folder for it

    def directory(self, reporter: str) -> str:
        """A tracker's folder (W&B makes its own `wandb` folder in WANDB_DIR, the logs folder). TensorBoard's is
        one per run, so that `tensorboard --logdir` on the folder above shows an adapter's runs side by side."""
        folder = os.path.join(self.folder, reporter)
        return os.path.join(folder, self.run_name) if reporter == "tensorboard" else folder


NO_REPORTING = Reporting()


@dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs, decided by the parent: the asked training values, the plan's decisions, and
    where things are. Ranks read these fields and nothing else."""

    # What was asked.
    model_name: str
    training_mode: str  # lora | qlora | full
    lora: LoraSettings
    training: TrainingSettings
    max_length: int
    sample_generations: int  # held-out prompts rank 0 answers after the final save (samples.py)
    # The plan's decisions.
    fuse_model: bool
    merged_precision: str  # what fuse_model merges the adapter into
    device: str  # cuda | cpu
    precision: str  # bf16 | fp16 | fp32: what autocast computes in
    weights_precision: str  # what the weights are loaded and updated in
    strategy: str  # ddp | fsdp | deepspeed_zero2 | deepspeed_zero3
    attention: str
    packing: bool
    gradient_checkpointing: bool
    liger: bool
    tf32: bool
    dataloader_workers: int
    # Where things are.
    prepared_path: str
    has_eval: bool
    checkpoint_dir: str  # checkpoint-N folders, each complete
    checkpoint_staging: str  # where a save is written before it is moved into checkpoint_dir
    resume_from: str | None
    adapter_staging: str
    merged_staging: str | None
    deepspeed_config: str | None = None
    reporting: Reporting = NO_REPORTING
    version: int = SPEC_VERSION

    @classmethod
    def of(cls, p, plan, folder: RunFolder, **where: Any) -> RunSpec:
        """The spec for these parameters and this plan; `where` gives prepared_path, has_eval, checkpoint_dir,
        checkpoint_staging, resume_from, adapter_staging, merged_staging and reporting."""
        s = plan.speed
        return cls(
            model_name=p.model_name,
            training_mode=p.training_mode,
            lora=p.lora,
            training=p.training,
            max_length=p.maximum_sequence_length,
            sample_generations=p.sample_generations,
            fuse_model=plan.merge_adapter,
            merged_precision=plan.merged_precision,
            device=plan.device,
            precision=plan.precision,
            weights_precision=plan.weights_precision,
            strategy=plan.strategy,
            attention=s.attention,
            packing=s.packing,
            gradient_checkpointing=s.gradient_checkpointing,
            liger=s.liger,
            tf32=s.tf32,
            dataloader_workers=s.dataloader_workers,
            deepspeed_config=folder.file(DEEPSPEED_CONFIG) if plan.strategy.startswith("deepspeed") else None,
            **where,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        values = json.loads(text)
        if values.get("version") != SPEC_VERSION:
            raise ValueError(
                f"run spec version {values.get('version')} is not {SPEC_VERSION}: parent and ranks differ in version"
            )
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"run spec has unknown fields {sorted(unknown)}")
        lora = values["lora"]
        values["lora"] = LoraSettings(**{**lora, "lora_target_modules": tuple(lora["lora_target_modules"])})
        values["training"] = TrainingSettings(**values["training"])
        reporting = values.get("reporting") or {}
        values["reporting"] = Reporting(**{**reporting, "reporters": tuple(reporting.get("reporters", ()))})
        return cls(**values)


def lora_targets(value: str) -> list[str] | None:
    """The module names of a lora_target_modules value (a comma list); None for all-linear (or empty): every
    linear layer but the output."""
    value = (value or "").strip()
    if value in ("", "all-linear"):
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


class RunFolder:
    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # --- the spec ---
    def write_spec(self, spec: RunSpec) -> None:
        """Written whole, then renamed into place: ranks waiting for it never read part of it."""
        staging = self.file(SPEC_FILE + ".tmp")
        Path(staging).write_text(spec.to_json())
        os.replace(staging, self.file(SPEC_FILE))

    def has_spec(self) -> bool:
        return os.path.exists(self.file(SPEC_FILE))

    def read_spec(self) -> RunSpec:
        return RunSpec.from_json(Path(self.file(SPEC_FILE)).read_text())

    # --- the run's identity, saved into each checkpoint ---
    def write_identity(self, identity: dict[str, Any]) -> None:
        Path(self.identity_file).write_text(json.dumps(identity, indent=2, default=str))

    @property
    def identity_file(self) -> str:
        return self.file(IDENTITY_FILE)

    # --- events ---
    def event_writer(self) -> EventWriter:
        return EventWriter(self.file(EVENTS_FILE))

    def event_reader(self) -> EventReader:
        return EventReader(self.file(EVENTS_FILE))

    # --- stopping ---
    def request_stop(self) -> None:
        Path(self.file(STOP_FILE)).touch()

    def stop_requested(self) -> bool:
        return os.path.exists(self.file(STOP_FILE))

    # --- failures and output ---
    def error_file(self, rank: int) -> str:
        return self.file(f"error-rank{rank}.txt")

    def write_error(self, rank: int, summary: str, details: str) -> None:
        Path(self.error_file(rank)).write_text(summary + "\n\n" + details)

    def rank_traceback(self, rank: int) -> str:
        """The traceback a rank wrote with its error ("" if none)."""
        try:
            return Path(self.error_file(rank)).read_text().split("\n\n", 1)[1]
        except (OSError, IndexError):
            return ""

    def rank_errors(self) -> list[tuple[int, int, str]]:
        """(rank, when written in ns, first paragraph) of every rank's error file."""
        found = []
        for name in os.listdir(self.path):
            if name.startswith("error-rank") and name.endswith(".txt"):
                path = self.file(name)
                rank = int(name.removeprefix("error-rank").removesuffix(".txt"))
                found.append((rank, os.stat(path).st_mtime_ns, Path(path).read_text().split("\n\n", 1)[0].strip()))
        return found

    # --- output: the launcher's and each rank's own file, tailed by the parent (never a pipe it owns, so the
    # ranks outlive a parent that dies) ---
    @property
    def logs_dir(self) -> str:
        return self.file(LOGS_DIR)

    @property
    def launcher_log(self) -> str:
        return os.path.join(self.logs_dir, "launcher.log")

    def rank_log(self, local_rank: int) -> str:
        """A rank's output, by its rank on this node (the run folder is this node's own)."""
        return os.path.join(self.logs_dir, f"rank-{local_rank}.log")


# --- events: what the ranks tell the parent ------------------------------------------------------------------

EVENT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Event:
    """One line of events.jsonl, written by each node's first rank and read by the parent, with the same versioned
    discipline as the spec: a line of another version or with unknown fields is refused."""

    kind: ClassVar[str] = ""
    at: float = field(default_factory=time.time)  # when the rank wrote it

    def to_json(self) -> str:
        return json.dumps({"type": self.kind, "version": EVENT_VERSION, **asdict(self)})

    @staticmethod
    def from_json(line: str) -> Event:
        values = json.loads(line)
        if values.pop("version", None) != EVENT_VERSION:
            raise ValueError(f"event of another version than {EVENT_VERSION}: parent and ranks differ in version")
        cls = EVENTS.get(values.pop("type", None))
        if cls is None:
            raise ValueError(f"unknown event {line[:80]!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"{cls.kind} event has unknown fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) and k in TUPLES else v for k, v in values.items()})


@dataclass(frozen=True, kw_only=True)
class Started(Event):
    """Training begins (after a resume: at `global_step`)."""

    kind: ClassVar[str] = "started"
    world_size: int
    max_steps: int
    global_step: int
    marks: dict[str, float]  # when the rank started, imported its libraries, loaded the model, built the trainer
    trainable_parameters: int
    trainable_dtypes: tuple[str, ...]
    checkpointing: bool  # whether activations are checkpointed, as the model was built


@dataclass(frozen=True, kw_only=True)
class Progress(Event):
    kind: ClassVar[str] = "progress"
    step: int
    max_steps: int


@dataclass(frozen=True, kw_only=True)
class Logged(Event):
    """A logged step's metrics (the trainer's log row, numbers only)."""

    kind: ClassVar[str] = "logged"
    step: int
    max_steps: int
    metrics: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    step: int
    path: str


@dataclass(frozen=True, kw_only=True)
class Stopped(Event):
    """Training stopped on request, after a checkpoint was saved (at step 0: before the first step, nothing)."""

    kind: ClassVar[str] = "stopped"
    step: int


@dataclass(frozen=True, kw_only=True)
class Sampled(Event):
    """The trained model's answers to held-out prompts (samples.py), or why there are none: `note` says where the
    prompts came from, or why none was answered; `failed` when generating them failed (a warning, never the run)."""

    kind: ClassVar[str] = "sampled"
    samples: tuple[dict[str, str], ...]  # input, expected_output, output
    note: str
    failed: bool = False


@dataclass(frozen=True, kw_only=True)
class Done(Event):
    """Training finished and the adapter (or model) was saved to its staging folder."""

    kind: ClassVar[str] = "done"
    step: int
    max_steps: int
    world_size: int
    final_loss: float | None
    eval_loss: float | None
    runtime: float
    has_adapter: bool  # False on the other nodes of a multi-node run: the main node writes it
    peak_gpu_memory_mib: float | None
    loss_history: tuple[dict[str, float], ...]


EVENTS: dict[str, type[Event]] = {
    cls.kind: cls for cls in (Started, Progress, Logged, CheckpointSaved, Stopped, Sampled, Done)
}
TUPLES = {"trainable_dtypes", "loss_history", "samples"}


class EventWriter:
    def __init__(self, path: str):
        self._handle = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the rank

    def emit(self, event: Event) -> None:
        self._handle.write(event.to_json() + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class EventReader:
    """Reads whole new lines since the last call; a half-written last line waits for the next read."""

    def __init__(self, path: str):
        self.path = path
        self._offset = 0
        self._pending = b""

    def read(self) -> list[Event]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        return [Event.from_json(line.decode("utf-8")) for line in lines if line.strip()]
