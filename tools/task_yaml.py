"""Write task.yaml, the task current TransformerLab (0.35+) adds from Git, from index.json.

index.json stays the one home of the parameters: this script maps its form to a task's `parameters:` and
is the only way task.yaml changes. `python tools/task_yaml.py` writes it; `--check` exits 1 when the
file differs from what index.json gives (tests/test_task_yaml.py runs the same comparison).

Mapping: integer -> int, number -> float, boolean -> bool (a switch), a string enum -> enum with options,
minimum/maximum -> min/max, a range widget -> a slider with a step, ui:help -> description. The fields the
old Train tab supplied itself (model, dataset, templates) are added. Per-node settings (num_machines,
machine_rank, main_process_ip, main_process_port) are left out: a provider's nodes bring them in their
environment. No sweeps block (the web UI would turn every launch into a sweep) and no secrets (a missing
secret blocks launches); info.md shows both to copy. index.json's `git` field, when set, is the
repository the task clones at every launch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "index.json"
TASK_YAML = ROOT / "task.yaml"

PER_NODE = ("num_machines", "machine_rank", "main_process_ip", "main_process_port")
TYPES = {"integer": "int", "number": "float", "boolean": "bool", "string": "string"}
SLIDER_STEPS = 100  # a range widget's slider moves in hundredths of its span

# What the Train tab supplied besides the form (the host keys info.md lists, which a task must ask for itself).
TAB_FIELDS: dict[str, dict[str, Any]] = {
    "model_name": {
        "type": "string",
        "default": "",
        "ui_widget": "lab_model_select",
        "title": "Model",
        "description": "The base model: a model of this workspace, a local folder or a Hugging Face Hub id.",
    },
    "dataset_name": {
        "type": "string",
        "default": "",
        "ui_widget": "lab_dataset_select",
        "title": "Dataset",
        "description": "A dataset of this workspace, a .jsonl/.json/.csv/.parquet file or folder, or a Hub id.",
    },
    "formatting_template": {
        "type": "string",
        "default": "",
        "title": "Formatting Template",
        "description": "Optional Jinja template over the dataset's columns, e.g. "
        "'### Question:\\n{{ prompt }}\\n### Answer:\\n{{ completion }}'. Leave empty for text, "
        "prompt/completion or messages rows.",
    },
    "apply_chat_template": {
        "type": "bool",
        "default": False,
        "ui_widget": "switch",
        "title": "Apply Chat Template",
        "description": "Render conversation rows with the model's chat template (or the one below).",
    },
    "chatml_formatted_column": {
        "type": "string",
        "default": "messages",
        "title": "Conversations Column",
        "description": "The column holding the conversations when Apply Chat Template is on.",
    },
    "formatting_chat_template": {
        "type": "string",
        "default": "",
        "title": "Chat Template Override",
        "description": "Optional Jinja chat template used instead of the model's own.",
    },
}


def _slider_step(low: float, high: float, default: float) -> float:
    """The largest round step (1, 2 or 5 times a power of ten) of at most 1/SLIDER_STEPS of the range that the
    minimum and the default sit on, so the slider can show the default exactly."""
    import math

    most = (high - low) / SLIDER_STEPS
    exponent = math.floor(math.log10(most))
    candidates = sorted((m * 10.0**e for e in range(exponent - 2, exponent + 1) for m in (1, 2, 5)), reverse=True)
    for step in candidates:
        if step <= most + 1e-12 and all(abs(v / step - round(v / step)) < 1e-6 for v in (low, default)):
            return round(step, 10)
    return round(most, 6)


def _number(value: float, kind: str) -> int | float:
    return int(value) if kind == "int" else float(value)


def task_parameter(name: str, spec: dict[str, Any], ui: dict[str, Any]) -> dict[str, Any]:
    """One index.json form parameter as a task parameter."""
    kind = TYPES[spec["type"]]
    out: dict[str, Any] = {}
    if spec["type"] == "string" and "enum" in spec:
        out["type"] = "enum"
        out["options"] = list(spec["enum"])
    else:
        out["type"] = kind
    if "default" in spec:
        out["default"] = spec["default"]
    elif name == "adaptor_name":
        out["default"] = "sft-adapter"  # each task job has its own output folders: one name serves them all
    if kind in ("int", "float") and "minimum" in spec:
        out["min"] = _number(spec["minimum"], kind)
    if kind in ("int", "float") and "maximum" in spec:
        out["max"] = _number(spec["maximum"], kind)
    if ui.get("ui:widget") == "range" and "min" in out and "max" in out:
        out["ui_widget"] = "slider"
        out["step"] = _slider_step(out["min"], out["max"], out.get("default", out["min"]))
    elif kind == "bool":
        out["ui_widget"] = "switch"
    out["title"] = spec.get("title", name)
    if ui.get("ui:help"):
        out["description"] = ui["ui:help"]
    return out


def build(manifest: dict[str, Any]) -> dict[str, Any]:
    task: dict[str, Any] = {"name": manifest["uniqueId"]}
    if manifest.get("git"):
        task["github_repo_url"] = manifest["git"]
    task["setup"] = "bash setup.sh"
    task["run"] = "python main.py"
    parameters: dict[str, Any] = dict(TAB_FIELDS)
    ui = manifest.get("parameters_ui", {})
    for name, spec in manifest["parameters"].items():
        if name not in PER_NODE:
            parameters[name] = task_parameter(name, spec, ui.get(name, {}))
    task["parameters"] = parameters
    return task


def render(manifest: dict[str, Any]) -> str:
    header = "# Generated from index.json by tools/task_yaml.py; edit index.json and rerun it, never this file.\n"
    return header + yaml.safe_dump(build(manifest), sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str]) -> int:
    text = render(json.loads(MANIFEST.read_text()))
    if "--check" in argv:
        if not TASK_YAML.is_file() or TASK_YAML.read_text() != text:
            sys.stderr.write("task.yaml differs from index.json: run `python tools/task_yaml.py`\n")
            return 1
        return 0
    TASK_YAML.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
