"""task.yaml: the task current TransformerLab (0.35 - 0.40.1) adds from Git. It is generated from index.json
(tools/task_yaml.py) and must not drift from it; its keys are those TransformerLab 0.40.1's TaskYamlSpec
accepts (api/transformerlab/schemas/task.py at v0.40.1: pydantic, extra="forbid" at every level); and what
an untouched Queue Task form hands the plugin (the schema dicts themselves) is a valid run."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from plugin_utils import params
from tests.conftest import ROOT

TASK = yaml.safe_load((ROOT / "task.yaml").read_text())
MANIFEST = json.loads((ROOT / "index.json").read_text())
# TaskYamlSpec's fields in TransformerLab 0.40.1 (its resources and sweeps refuse unknown keys too).
TASK_FIELDS = {
    "name",
    "resources",
    "envs",
    "setup",
    "run",
    "github_repo_url",
    "github_repo_dir",
    "github_repo_branch",
    "parameters",
    "sweeps",
    "minutes_requested",
}
# What the Queue Task form renders (QueueTaskModal/types.ts).
PARAMETER_KEYS = {"type", "default", "min", "max", "step", "options", "enum", "ui_widget", "title", "description"}
FORM_TYPES = {"int", "integer", "float", "number", "bool", "boolean", "enum", "string"}
WIDGETS = {"slider", "range", "switch", "radio", "password", "select", "lab_model_select", "lab_dataset_select"}


def test_task_yaml_is_what_index_json_generates():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "task_yaml.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_task_yaml_has_only_the_keys_transformerlab_accepts():
    assert set(TASK) <= TASK_FIELDS and {"name", "run"} <= set(TASK)
    assert (TASK["setup"], TASK["run"]) == ("bash setup.sh", "python main.py")
    assert "sweeps" not in TASK, "a sweeps block would turn every launch from the web UI into a sweep"
    assert "{{secret." not in (ROOT / "task.yaml").read_text(), "a missing secret would block every launch"
    assert TASK.get("github_repo_url", "") == MANIFEST["git"] or not MANIFEST["git"]


def test_every_task_parameter_is_one_the_form_can_render():
    for name, spec in TASK["parameters"].items():
        assert set(spec) <= PARAMETER_KEYS, name
        assert spec["type"] in FORM_TYPES and spec.get("ui_widget", "switch") in WIDGETS, name
        if spec["type"] == "enum":
            assert spec["default"] in spec["options"], name
        if "step" in spec:
            assert 0 < spec["step"] <= spec["max"] - spec["min"], name
            # The slider can show the default exactly: it sits on the step grid from the minimum.
            steps = (spec["default"] - spec["min"]) / spec["step"]
            assert abs(steps - round(steps)) < 1e-6, name


def test_the_task_asks_for_every_form_parameter_and_the_train_tabs_own_fields_but_no_per_node_setting():
    asked = set(TASK["parameters"])
    per_node = {"num_machines", "machine_rank", "main_process_ip", "main_process_port"}
    assert asked == (set(MANIFEST["parameters"]) - per_node) | {
        "model_name",
        "dataset_name",
        "formatting_template",
        "apply_chat_template",
        "chatml_formatted_column",
        "formatting_chat_template",
    }
    assert TASK["parameters"]["model_name"]["ui_widget"] == "lab_model_select"
    assert TASK["parameters"]["dataset_name"]["ui_widget"] == "lab_dataset_select"


def test_an_untouched_form_is_a_valid_run_with_the_plugins_defaults():
    # The form did not send a key: lab.get_config() holds its schema dict, which means its default.
    reading = params.read(dict(TASK["parameters"]), headless=False)
    assert not reading.errors and not reading.warnings
    for name, spec in MANIFEST["parameters"].items():
        if "default" in spec and name in TASK["parameters"]:
            assert reading.params.as_dict()[name] == spec["default"], name


def test_values_the_form_sends_typed_are_read_like_the_train_tabs_strings():
    sent = {name: spec["default"] for name, spec in TASK["parameters"].items()}
    typed = params.read(sent, headless=False)
    as_text = params.read({k: v if isinstance(v, str) else json.dumps(v) for k, v in sent.items()}, headless=False)
    assert not typed.errors and not as_text.errors
    assert typed.params.as_dict() == as_text.params.as_dict()
