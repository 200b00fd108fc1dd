"""index.json: valid against TransformerLab's plugin schema, and the Train-tab form info.md documents ("Parameters")."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.conftest import resolve

from .conftest import ROOT, SPEC_HOST_KEYS

# TransformerLab's plugin manifest schema (draft-07), copied here so the suite runs anywhere.
SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "uniqueId": {"type": "string"},
        "description": {"type": "string"},
        "plugin-format": {"type": "string"},
        "type": {
            "type": "string",
            "enum": ["loader", "trainer", "evaluator", "generator", "eval", "exporter", "rag", "diffusion"],
        },
        "version": {"type": "string"},
        "model_architectures": {"type": "array", "items": {"type": "string"}},
        "supported_hardware_architectures": {
            "type": "array",
            "items": {"type": "string", "enum": ["cuda", "mlx", "cpu", "amd"]},
        },
        "files": {"type": "array", "items": {"type": "string"}},
        "setup-script": {"type": "string"},
        "parameters": {"type": "object"},
        "parameters_ui": {"type": "object"},
    },
    "required": [
        "name",
        "uniqueId",
        "description",
        "plugin-format",
        "type",
        "version",
        "files",
        "setup-script",
        "supported_hardware_architectures",
    ],
    "additionalProperties": True,
}
MANIFEST = json.loads((ROOT / "index.json").read_text())
PARAMETERS = MANIFEST["parameters"]
UI = MANIFEST["parameters_ui"]

# The form parameters, in the order info.md's Parameters table lists them.
FORM = [
    "adaptor_name",
    "training_mode",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "maximum_sequence_length",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "learning_rate_schedule",
    "warmup_ratio",
    "num_train_epochs",
    "max_steps",
    "completion_only_loss",
    "assistant_only_loss",
    "completion_column",
    "max_dropped_fraction",
    "packing",
    "precision",
    "gradient_checkpointing",
    "eval_split",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "seed",
    "overwrite_output",
    "gpu_ids",
    "num_processes",
    "train_device",
    "distributed_strategy",
    "num_machines",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "report_to",
    "log_to_wandb",
    "fuse_model",
    "sample_generations",
]

# The choices each choice parameter offers (info.md, "Parameters").
CHOICES = {
    "training_mode": ["lora", "qlora", "full"],
    "completion_only_loss": ["auto", "true", "false"],
    "precision": ["auto", "bf16", "fp16", "fp32"],
    "train_device": ["auto", "cuda", "cpu"],
    "distributed_strategy": ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"],
}

HOST_KEYS = sorted(SPEC_HOST_KEYS)

ARCHITECTURES = [
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "SmolLM3ForCausalLM",
]


def value_schema(spec: dict) -> dict:
    """A parameter's declaration as a JSON Schema for its value (`required: true` is the form's, not JSON Schema's)."""
    return {k: v for k, v in spec.items() if k not in ("required", "title", "default")}


def test_manifest_validates_against_the_plugin_schema():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(MANIFEST, SCHEMA, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_plugin_is_offered_for_the_families_whose_chat_templates_are_tested(architecture):
    # TransformerLab offers a trainer only for models whose architecture it lists.
    assert architecture in MANIFEST["model_architectures"]


def test_every_listed_architecture_is_a_class_transformers_knows():
    # A misspelt entry would silently hide the plugin for that family.
    import transformers

    unknown = [name for name in MANIFEST["model_architectures"] if not hasattr(transformers, name)]
    assert not unknown, unknown


def test_model_architectures_have_no_duplicates():
    assert len(set(MANIFEST["model_architectures"])) == len(MANIFEST["model_architectures"])


@pytest.mark.parametrize("path", MANIFEST["files"])
def test_every_listed_file_exists(path):
    assert (ROOT / path).exists(), path


@pytest.mark.parametrize("name", FORM)
def test_every_spec_form_parameter_is_declared_with_title_type_and_default(name):
    spec = PARAMETERS[name]
    assert spec.get("title"), name
    assert spec.get("type") in ("string", "integer", "number", "boolean"), name
    if name == "adaptor_name":
        assert spec.get("required") is True
        assert "default" not in spec
    else:
        assert "default" in spec, name


@pytest.mark.parametrize("name", [n for n in FORM if PARAMETERS[n]["type"] in ("integer", "number")])
def test_numeric_parameters_have_bounds(name):
    spec = PARAMETERS[name]
    assert "minimum" in spec or "maximum" in spec, name


@pytest.mark.parametrize(("name", "choices"), sorted(CHOICES.items()))
def test_choice_parameters_offer_the_spec_choices(name, choices):
    assert PARAMETERS[name]["enum"] == choices


@pytest.mark.parametrize("schedule", PARAMETERS["learning_rate_schedule"]["enum"])
def test_every_learning_rate_schedule_offered_is_one_trl_accepts(schedule, tmp_path):
    from plugin_utils import worker
    from tests.conftest import spec_of

    args = worker._sft_config(spec_of(str(tmp_path), {"learning_rate_schedule": schedule}))
    assert args.lr_scheduler_type == schedule


@pytest.mark.parametrize(
    ("name", "outside", "inside"),
    [("max_dropped_fraction", 1.5, 1), ("eval_split", 0.6, 0.5), ("max_steps", -2, -1), ("eval_split", -0.1, 0)],
)
def test_values_outside_the_spec_ranges_are_refused_and_the_ends_accepted(name, outside, inside):
    from plugin_utils import params

    refused = params.read({"adaptor_name": "x", name: outside}, headless=True)
    assert [e.parameter for e in refused.errors] == [name]
    assert not params.read({"adaptor_name": "x", name: inside}, headless=True).errors


@pytest.mark.parametrize(
    ("name", "default"),
    [
        ("max_steps", -1),
        ("gpu_ids", "auto"),
        ("num_processes", "auto"),
        ("train_device", "auto"),
        ("precision", "auto"),
        ("completion_only_loss", "auto"),
        ("distributed_strategy", "ddp"),
        ("lora_target_modules", "all-linear"),
        ("training_mode", "lora"),
        ("num_machines", 1),
        ("machine_rank", 0),
        ("overwrite_output", False),
    ],
)
def test_a_run_that_sets_nothing_gets_the_defaults_users_expect(name, default):
    values, _ = resolve({"adaptor_name": "x"}, headless=True)
    assert values.as_dict()[name] == default


@pytest.mark.parametrize("name", FORM)
def test_every_form_parameter_has_help_in_parameters_ui(name):
    assert isinstance(UI.get(name), dict), name
    assert UI[name].get("ui:help", "").strip(), name


def test_parameters_ui_names_only_declared_parameters():
    assert set(UI) <= set(PARAMETERS)


def test_form_declares_no_parameter_beyond_the_spec_list():
    assert set(PARAMETERS) == set(FORM)


@pytest.mark.parametrize("key", HOST_KEYS)
def test_no_host_key_is_a_form_parameter(key):
    assert key not in PARAMETERS
    assert key not in UI


@pytest.mark.parametrize("name", [n for n in FORM if "default" in PARAMETERS[n]])
def test_defaults_pass_their_own_bounds_and_enums(name):
    spec = PARAMETERS[name]
    jsonschema.validate(spec["default"], value_schema(spec), cls=jsonschema.Draft7Validator)


def test_adaptor_name_pattern_is_a_plain_name_pattern():
    pattern = PARAMETERS["adaptor_name"]["pattern"]
    assert re.fullmatch(pattern, "my-adaptor_1.0")
    for bad in ("a/b", ".hidden", "..", ""):
        assert not re.fullmatch(pattern, bad), bad


def test_defaults_resolve_without_problems():
    values, warnings = resolve({"adaptor_name": "x"}, headless=True)
    assert warnings == []
    shown = values.as_dict()
    for name in FORM:
        if name != "adaptor_name":
            assert shown[name] == PARAMETERS[name]["default"]


def test_info_md_lists_every_parameter():
    info = (ROOT / "info.md").read_text()
    manifest = json.loads((ROOT / "index.json").read_text())
    assert not [name for name in manifest["parameters"] if f"`{name}`" not in info]
