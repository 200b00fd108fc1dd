"""Parameters: the form schema lives in index.json; this module reads it, coerces and checks each value, and
freezes the result. `Params` is what the user asked, normalised, and it never changes afterwards: every
decision derived from it (devices, precision, packing, ...) lives on the plan (`planning.py`).

Cross-parameter rules live in `validation.py`; this module only knows single values. A model id of the
TransformerLab workspace (what the task form's model picker sends) is read as its folder, so that everything
downstream (validation, the tokenizer, the ranks) loads the same weights; the log names both.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import InvalidConfig, Problem, problem
from .machine import Nodes
from .runfolder import LoraSettings, TrainingSettings, lora_targets, reporter_names
from .sources import workspace_model

log = logging.getLogger("sft")

PLUGIN_DIR = Path(__file__).resolve().parent.parent
# The manifest's copy in a task folder (tools/task_folder.py writes it). TransformerLab keeps a task's own record
# in the task's index.json and copies an uploaded folder over it, then hands a run the task's files, record
# included: there the copy is the schema and index.json is not ours, so the copy wins wherever it exists.
TASK_FOLDER_MANIFEST = PLUGIN_DIR / "plugin_manifest.json"
MANIFEST = TASK_FOLDER_MANIFEST if TASK_FOLDER_MANIFEST.is_file() else PLUGIN_DIR / "index.json"

# Keys the host (Train tab, harness, lab SDK) fills. Never form parameters: the form would overwrite them.
HOST_KEYS: dict[str, dict[str, Any]] = {
    "model_name": {"type": "string", "default": ""},
    "model_architecture": {"type": "string", "default": ""},
    "dataset_name": {"type": "string", "default": ""},
    "template_name": {"type": "string", "default": ""},
    "plugin_name": {"type": "string", "default": ""},
    "job_id": {"type": "string", "default": ""},
    "output_dir": {"type": "string", "default": "./outputs"},
    "adaptor_output_dir": {"type": "string", "default": ""},
    "run_sweeps": {"type": "boolean", "default": False},
    "sweep_config": {"type": "any", "default": None},
    "experiment_name": {"type": "string", "default": ""},
    "formatting_template": {"type": "string", "default": ""},
    "apply_chat_template": {"type": "boolean", "default": False},
    "chatml_formatted_column": {"type": "string", "default": "messages"},
    "formatting_chat_template": {"type": "string", "default": ""},
}

# Keys hosts add that carry nothing for training; accepted silently under a host.
HOST_NOISE = {"type", "name", "description", "_tlab_recipe_datasets", "_tlab_recipe_models", "_dataset_display_name"}
# What current TransformerLab's Queue Task form leaves in a task's parameters (lab.get_config()): the compute
# provider's and the sweep's own settings, never the plugin's.
TASK_FORM_LEFTOVERS = {
    "use_spot",
    "resource_group_id",
    "resource_group_name",
    "resource_group_custom_override",
    "custom_sbatch_flags",
    "docker_image",
    "region",
    "fleet_name",
    "sweep_metric",
    "lower_is_better",
    "trackio_project_name",
}
# The keys of a parameter's schema in a task's `parameters:`; a key the form did not send keeps its schema.
SCHEMA_KEYS = {"type", "default", "min", "max", "step", "options", "enum", "ui_widget", "title", "description"}

_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


# --- the typed parameters ---------------------------------------------------------------------------------


class Auto:
    """`auto`: the plan decides, on this machine (each parameter's help says how)."""

    _instance: Auto | None = None

    def __new__(cls) -> Auto:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "auto"

    def __reduce__(self):
        return (Auto, ())


AUTO = Auto()

# What a parameter is part of. Every parameter declares its roles: a new one cannot escape the resume check or
# the data key by being forgotten (tests/test_params.py fails until it is placed).
DATA = "data"  # shapes the prepared rows: in the data key, which a resumed run must share
CONTENT = "content"  # enters the data key by the content it names (the tokenizer's files, the data's bytes)
HARD = "hard"  # the resume identity: a change makes the checkpoint unusable, so the resume is refused
SOFT = "soft"  # the resume identity: a change applies from the resume point on (a warning)
RUN = "run"  # this run alone
ROLES = (DATA, CONTENT, HARD, SOFT, RUN)


def _role(*roles: str, group: str = "") -> dict[str, Any]:
    """A parameter's field metadata: its roles, and the settings record (`group`) the ranks receive it in."""
    return {"roles": frozenset(roles), "group": group}


@dataclass(frozen=True)
class DataSettings:
    """Exactly the parameters the data code reads, and nothing else of them: the model and the dataset, which the
    data key hashes by content (the tokenizer's files, the data's bytes), and the settings that shape the prepared
    rows, which it hashes by value."""

    model_name: str
    dataset_name: str
    formatting_template: str
    apply_chat_template: bool
    chatml_formatted_column: str
    formatting_chat_template: str
    completion_only_loss: Auto | bool
    assistant_only_loss: bool
    completion_column: str
    maximum_sequence_length: int
    eval_split: float
    seed: int

    def canonical(self) -> dict[str, Any]:
        """The shaping settings as the data key hashes them (`auto`, `true` and `false` as words)."""
        return {name: shown(name, getattr(self, name)) for name in names_in(DATA)}


@dataclass(frozen=True)
class Params:
    """The parameters of one run, parsed once and frozen: what the user asked, normalised (`auto` stays AUTO;
    what it became is the plan's). Host keys first, then the form's parameters in index.json's order."""

    # What the host fills; never form parameters.
    model_name: str = field(metadata=_role(HARD, CONTENT))
    model_architecture: str = field(metadata=_role(RUN))
    dataset_name: str = field(metadata=_role(CONTENT))
    template_name: str = field(metadata=_role(RUN))
    plugin_name: str = field(metadata=_role(RUN))
    job_id: str = field(metadata=_role(RUN))
    output_dir: str = field(metadata=_role(RUN))
    adaptor_output_dir: str = field(metadata=_role(RUN))
    run_sweeps: bool = field(metadata=_role(RUN))
    sweep_config: Any = field(metadata=_role(RUN))
    experiment_name: str = field(metadata=_role(RUN))
    formatting_template: str = field(metadata=_role(DATA))
    apply_chat_template: bool = field(metadata=_role(DATA))
    chatml_formatted_column: str = field(metadata=_role(DATA))
    formatting_chat_template: str = field(metadata=_role(DATA))
    # The form (index.json).
    adaptor_name: str = field(metadata=_role(RUN))
    training_mode: str = field(metadata=_role(HARD))
    lora_r: int = field(metadata=_role(HARD, group="lora"))
    lora_alpha: int = field(metadata=_role(HARD, group="lora"))
    lora_dropout: float = field(metadata=_role(SOFT, group="lora"))
    lora_target_modules: str = field(metadata=_role(HARD, group="lora"))
    maximum_sequence_length: int = field(metadata=_role(HARD, DATA))
    batch_size: int = field(metadata=_role(HARD, group="training"))
    gradient_accumulation_steps: int = field(metadata=_role(HARD, group="training"))
    learning_rate: float = field(metadata=_role(SOFT, group="training"))
    learning_rate_schedule: str = field(metadata=_role(SOFT, group="training"))
    warmup_ratio: float = field(metadata=_role(SOFT, group="training"))
    num_train_epochs: float = field(metadata=_role(SOFT, group="training"))
    max_steps: int = field(metadata=_role(SOFT, group="training"))
    completion_only_loss: Auto | bool = field(metadata=_role(DATA))
    assistant_only_loss: bool = field(metadata=_role(DATA))
    completion_column: str = field(metadata=_role(DATA))
    max_dropped_fraction: float = field(metadata=_role(RUN))
    packing: Auto | bool = field(metadata=_role(HARD))
    precision: str = field(metadata=_role(RUN))
    gradient_checkpointing: Auto | bool = field(metadata=_role(RUN))
    eval_split: float = field(metadata=_role(DATA))
    logging_steps: int = field(metadata=_role(SOFT, group="training"))
    save_steps: int = field(metadata=_role(SOFT, group="training"))
    save_total_limit: int = field(metadata=_role(RUN, group="training"))
    seed: int = field(metadata=_role(HARD, DATA, group="training"))
    overwrite_output: bool = field(metadata=_role(RUN))
    gpu_ids: Auto | tuple[int, ...] = field(metadata=_role(RUN))
    num_processes: Auto | int = field(metadata=_role(RUN))
    train_device: str = field(metadata=_role(RUN))
    distributed_strategy: str = field(metadata=_role(HARD))
    num_machines: int = field(metadata=_role(RUN))
    machine_rank: int = field(metadata=_role(RUN))
    main_process_ip: str = field(metadata=_role(RUN))
    main_process_port: int = field(metadata=_role(RUN))
    report_to: str = field(metadata=_role(RUN))
    log_to_wandb: bool = field(metadata=_role(RUN))
    fuse_model: bool = field(metadata=_role(RUN))
    sample_generations: int = field(metadata=_role(RUN))

    def as_dict(self) -> dict[str, Any]:
        """The values as a user gives them (`auto`, `true`, `0,1`): for JSON, the job's record and the log."""
        return {f.name: shown(f.name, getattr(self, f.name)) for f in fields(self)}

    def replace(self, **raw: Any) -> Params:
        """A copy with these values, each read as a host's value is read; a bad one raises InvalidConfig."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        problems = []
        for name, value in raw.items():
            if name not in values:
                raise TypeError(f"unknown parameter {name!r}")
            typed, issue = _read_value(name, value)
            if issue:
                problems.append(issue)
            values[name] = typed
        if problems:
            raise InvalidConfig(problems)
        return Params(**values)

    @property
    def lora(self) -> LoraSettings:
        names = lora_targets(self.lora_target_modules)
        return LoraSettings(
            self.lora_r, self.lora_alpha, self.lora_dropout, ("all-linear",) if names is None else tuple(names)
        )

    @property
    def reporters(self) -> tuple[str, ...]:
        """The trackers report_to names, in its order, each once; log_to_wandb (the form's older switch) adds
        wandb."""
        names = reporter_names(self.report_to) + (["wandb"] if self.log_to_wandb else [])
        return tuple(dict.fromkeys(names))

    @property
    def training(self) -> TrainingSettings:
        return TrainingSettings(**{name: getattr(self, name) for name in names_in(group="training")})

    @property
    def data(self) -> DataSettings:
        return DataSettings(**{name: getattr(self, name) for name in (*names_in(CONTENT), *names_in(DATA))})

    def resume_identity(self) -> ResumeIdentity:
        """What a resumed run shares with the run that saved its checkpoint, as asked (never what `auto` became)."""
        return ResumeIdentity(
            hard={name: shown(name, getattr(self, name)) for name in HARD_KEYS},
            soft={name: shown(name, getattr(self, name)) for name in SOFT_KEYS},
        )


@dataclass(frozen=True)
class ResumeIdentity:
    """The parameters a checkpoint is resumed under, as the user gave them: `hard` ones (a change makes the
    checkpoint unusable, or its resumed data position wrong: the resume is refused) and `soft` ones (a change
    applies from the resume point on: a warning). run_params.json records them as one flat mapping, `asked`."""

    hard: dict[str, Any]
    soft: dict[str, Any]

    def asked(self) -> dict[str, Any]:
        return {**self.hard, **self.soft}


def names_in(role: str = "", *, group: str = "") -> tuple[str, ...]:
    """The parameters with this role (or in this group), in their order."""
    return tuple(
        f.name
        for f in fields(Params)
        if (not role or role in f.metadata["roles"]) and (not group or f.metadata["group"] == group)
    )


HARD_KEYS = names_in(HARD)
SOFT_KEYS = names_in(SOFT)


def shown(name: str, value: Any) -> Any:
    """A parsed value as a user gives it: AUTO as `auto`, an auto/true/false switch as a word, GPU ids as `0,1`,
    a count of processes as text."""
    if value is AUTO:
        return "auto"
    if name in switches():
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if name == "num_processes":
        return str(value)
    return value


@lru_cache(maxsize=1)
def form_schema() -> dict[str, dict[str, Any]]:
    """The Train-tab form parameters of index.json: types, bounds, enums and defaults."""
    return json.loads(MANIFEST.read_text())["parameters"]


@lru_cache(maxsize=1)
def known_schema() -> dict[str, dict[str, Any]]:
    """Every parameter's schema: the host's keys, then the form's."""
    return {**HOST_KEYS, **form_schema()}


@lru_cache(maxsize=1)
def switches() -> frozenset[str]:
    """The auto/true/false parameters (packing, gradient_checkpointing, completion_only_loss)."""
    return frozenset(k for k, spec in form_schema().items() if set(spec.get("enum", ())) == {"auto", "true", "false"})


@lru_cache(maxsize=1)
def _default_values() -> tuple[tuple[str, Any], ...]:
    values = []
    for name, spec in known_schema().items():
        typed, issue = _read_value(name, spec.get("default"))
        if issue:
            raise ValueError(f"index.json's default of {name} is not valid: {issue.line()}")
        values.append((name, typed))
    return tuple(values)


def defaults() -> Params:
    """Every parameter at its default (adaptor_name, model_name and dataset_name empty)."""
    return Params(**dict(_default_values()))


def _coerce(name: str, value: Any, spec: dict[str, Any]) -> tuple[Any, Problem | None]:
    kind = spec.get("type", "any")
    if kind == "any":
        return value, None
    if kind == "boolean":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value), None
        text = str(value).strip().lower()
        if text in _TRUE:
            return True, None
        if text in _FALSE:
            return False, None
        return value, problem(name, f"expected true or false, got {value!r}", "Use true/false, on/off, yes/no or 1/0")
    if kind in ("integer", "number"):
        if isinstance(value, bool):
            return value, problem(name, f"expected a number, got {value!r}", "Give a number")
        try:
            number = float(value) if not isinstance(value, int | float) else value
        except (TypeError, ValueError):
            return value, problem(name, f"expected a number, got {value!r}", "Give a number such as 4 or 2e-4")
        if number != number or number in (float("inf"), float("-inf")):
            return value, problem(name, f"expected a finite number, got {value!r}", "Give a finite number")
        if kind == "integer":
            if float(number) != int(number):
                return value, problem(name, f"expected a whole number, got {value!r}", "Give an integer")
            number = int(number)
        else:
            number = float(number)
        return number, _bounds(name, number, spec)
    if kind == "string":
        if isinstance(value, dict | list):
            return value, problem(name, f"expected text, got {type(value).__name__}", "Give a string")
        enum = [str(e).lower() for e in spec.get("enum", [])]
        if "true" in enum and "false" in enum:  # auto/true/false switches take every boolean spelling
            if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
                return ("true" if value else "false"), None
            word = str(value).strip().lower()
            if word in _TRUE | _FALSE:
                return ("true" if word in _TRUE else "false"), None
        text = str(value)
        if text.strip().lower() in enum:
            text = text.strip().lower()
        return text, None
    return value, None


def _read_value(name: str, value: Any) -> tuple[Any, Problem | None]:
    """One value read as its parameter's type: coerced (strings, numbers, booleans), checked against its schema
    (bounds, choices, pattern), then parsed (auto/true/false switches, a count of processes, GPU ids)."""
    spec = known_schema()[name]
    if value is None:
        value = spec.get("default")
    if value is None:  # no value and no default (adaptor_name): empty, which its own rule reports
        return ("" if spec.get("type") == "string" else None), None
    coerced, issue = _coerce(name, value, spec)
    if issue is None and isinstance(coerced, str):
        issue = _check_string(name, coerced, spec)
    if issue:
        return value, issue
    if name in switches():
        return {"auto": AUTO, "true": True, "false": False}[coerced], None
    if name == "num_processes":
        return _count(coerced)
    if name == "gpu_ids":
        return _gpu_ids(coerced)
    return coerced, None


def _count(value: str) -> tuple[Any, Problem | None]:
    text = value.strip().lower()
    if text == "auto":
        return AUTO, None
    if text.isdigit() and int(text) >= 1:
        return int(text), None
    return value, problem("num_processes", f"{value!r} is neither 'auto' nor a count", "Use auto or a count such as 2")


def _gpu_ids(value: str) -> tuple[Any, Problem | None]:
    text = value.replace(" ", "")
    if text.lower() == "auto":
        return AUTO, None
    parts = text.split(",")
    if not all(part.isdigit() for part in parts):
        return value, problem("gpu_ids", f"{value!r} is not a list of GPU ids", "Use auto, or ids such as 0,1")
    ids = tuple(int(part) for part in parts)
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        # A GPU listed twice would get two processes.
        listed = ", ".join(map(str, twice))
        return value, problem("gpu_ids", f"GPU {listed} is listed more than once", "List each GPU once, such as 0,1")
    return ids, None


def _as_given(value: Any, spec: dict[str, Any]) -> Any:
    """What a value means: a schema dict left by a task form that did not send the key means its default
    (None: the plugin's own)."""
    if isinstance(value, dict) and "type" in value and set(value) <= SCHEMA_KEYS and spec.get("type") != "any":
        return value.get("default")
    return value


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _bounds(name: str, number: float, spec: dict[str, Any]) -> Problem | None:
    low, high = spec.get("minimum"), spec.get("maximum")
    if low is not None and number < low:
        return problem(name, f"{_num(number)} is below the minimum {_num(low)}", f"Use a value of at least {_num(low)}")
    if high is not None and number > high:
        return problem(
            name, f"{_num(number)} is above the maximum {_num(high)}", f"Use a value of at most {_num(high)}"
        )
    return None


def _check_string(name: str, value: str, spec: dict[str, Any]) -> Problem | None:
    if "enum" in spec and value not in spec["enum"]:
        choices = ", ".join(map(str, spec["enum"]))
        return problem(name, f"{value!r} is not one of {choices}", f"Pick one of: {choices}")
    if spec.get("maxLength") and len(value) > spec["maxLength"]:
        return problem(name, f"is {len(value)} characters long", f"Use at most {spec['maxLength']} characters")
    if spec.get("pattern") and value and not re.fullmatch(spec["pattern"], value):
        return problem(
            name,
            f"{value!r} is not a valid name",
            "Use letters, digits, '.', '_' and '-' only, not starting with '.' (a name, never a path)",
        )
    return None


def usable(p: Params, errors: list[Problem], name: str) -> bool:
    """The parameter has a value of its own that passed its single-value checks."""
    return getattr(p, name) not in (None, "") and all(e.parameter != name for e in errors)


@dataclass(frozen=True)
class Reading:
    """The parameters read from a host, and the single-value problems found on the way."""

    params: Params
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def _apply_nodes(values: dict[str, Any], nodes: Nodes, given: set[str]) -> None:
    values["num_machines"] = nodes.count
    values["machine_rank"] = nodes.rank
    if "main_process_ip" not in given or not values["main_process_ip"]:
        values["main_process_ip"] = nodes.main_ip
    if "main_process_port" not in given or not values["main_process_port"]:
        values["main_process_port"] = nodes.main_port
    log.info(
        "nodes: %s machines from %s; this is machine %s; the main node is %s:%s",
        nodes.count,
        nodes.source,
        nodes.rank,
        values["main_process_ip"],
        values["main_process_port"],
    )


def read(raw: Mapping[str, Any], *, headless: bool, nodes: Nodes | None = None) -> Reading:
    """Read every value as its parameter's type, fill defaults, and report every single-value problem at once. A
    value that failed keeps its default, so the cross-parameter rules can still run and every problem is reported
    in one go. Unknown keys are errors headless, warnings under a host (hosts add keys of their own). `nodes`: the
    nodes a scheduler's environment describes, which fill the machine settings the user left alone."""
    known = known_schema()
    errors: list[Problem] = []
    warnings: list[Problem] = []
    values = dict(_default_values())
    failed: set[str] = set()

    for name, value in raw.items():
        if name not in known:
            if not headless and name in HOST_NOISE | TASK_FORM_LEFTOVERS:
                continue
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
            hint = f"Did you mean {close[0]!r}?" if close else "Remove it; see index.json for the parameters"
            (errors if headless else warnings).append(problem(name, "unknown parameter", hint))
            continue
        value = _as_given(value, known[name])
        if value is None:
            continue
        if not headless and value == "" and known[name].get("type") in ("integer", "number"):
            # A number field the user cleared in a host's form (the task form sends ''): its default.
            default = known[name].get("default")
            warnings.append(problem(name, f"left empty, so its default {default} is used", "Give a value to change it"))
            continue
        typed, issue = _read_value(name, value)
        if issue:
            errors.append(issue)
            failed.add(name)
        else:
            values[name] = typed

    if nodes is not None and values["num_machines"] == 1 and "num_machines" not in failed:
        _apply_nodes(values, nodes, given={k for k, v in raw.items() if _as_given(v, known.get(k, {})) is not None})

    if values["model_name"] and "model_name" not in failed:
        found = workspace_model(values["model_name"])
        if found:
            log.info("model_name: %s is %s: %s", values["model_name"], found.how, found.path)
            values["model_name"] = found.path

    for name, spec in form_schema().items():
        if spec.get("required") and name not in failed and values.get(name) in (None, ""):
            errors.append(problem(name, "is required", f"Set {name} (see its help in the Train tab)"))
    return Reading(Params(**values), errors, warnings)
