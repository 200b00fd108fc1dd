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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import Problem, problem
from .machine import Nodes
from .sources import workspace_model

log = logging.getLogger("sft")

MANIFEST = Path(__file__).resolve().parent.parent / "index.json"

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


@lru_cache(maxsize=1)
def form_schema() -> dict[str, dict[str, Any]]:
    """The Train-tab form parameters of index.json: types, bounds, enums and defaults."""
    return json.loads(MANIFEST.read_text())["parameters"]


def defaults() -> dict[str, Any]:
    values = {k: spec.get("default") for k, spec in HOST_KEYS.items()}
    values.update({k: spec.get("default") for k, spec in form_schema().items()})
    return values


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


def usable(values: dict[str, Any], errors: list[Problem], name: str) -> bool:
    """The parameter has a value of its own that passed its single-value checks."""
    return values.get(name) not in (None, "") and all(e.parameter != name for e in errors)


class Params(Mapping):
    """The parameters of one run, read-only: `p["learning_rate"]`, never `p["learning_rate"] = ...`."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Params({self._values!r})"

    def as_dict(self) -> dict[str, Any]:
        """A plain copy, for JSON."""
        return dict(self._values)


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
    """Coerce every value, fill defaults, and report every single-value problem at once. A value that failed
    keeps its default, so the cross-parameter rules can still run and every problem is reported in one go.
    Unknown keys are errors headless, warnings under a host (hosts add keys of their own). `nodes`: the nodes a
    scheduler's environment describes, which fill the machine settings the user left alone."""
    schema = form_schema()
    known = {**HOST_KEYS, **schema}
    errors: list[Problem] = []
    warnings: list[Problem] = []
    values = defaults()
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
        coerced, issue = _coerce(name, value, known[name])
        if issue is None and isinstance(coerced, str):
            issue = _check_string(name, coerced, known[name])
        if issue:
            errors.append(issue)
            failed.add(name)
        else:
            values[name] = coerced

    if nodes is not None and values["num_machines"] == 1 and "num_machines" not in failed:
        _apply_nodes(values, nodes, given={k for k, v in raw.items() if _as_given(v, known.get(k, {})) is not None})

    if usable(values, errors, "model_name"):
        found = workspace_model(values["model_name"])
        if found:
            log.info("model_name: %s is %s: %s", values["model_name"], found.how, found.path)
            values["model_name"] = found.path

    for name, spec in schema.items():
        if spec.get("required") and name not in failed and values.get(name) in (None, ""):
            errors.append(problem(name, "is required", f"Set {name} (see its help in the Train tab)"))
    return Reading(Params(values), errors, warnings)
