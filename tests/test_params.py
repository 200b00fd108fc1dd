"""plugin_utils/params.py: defaults from index.json, coercion of string values, bounds, enums, names,
unknown keys (headless error vs host warning) and reporting every problem at once (info.md, "Parameters" and
"Checks before training")."""

from __future__ import annotations

import dataclasses
import json

import pytest

from plugin_utils import params
from plugin_utils.errors import InvalidConfig
from tests.conftest import resolve as resolve_params

from .conftest import ROOT, SPEC_HOST_KEYS


def manifest_parameters() -> dict:
    return json.loads((ROOT / "index.json").read_text())["parameters"]


def resolve(headless: bool = True, **values):
    """Resolve the given values with a valid adaptor_name unless the test sets one: the values as a user gives them
    (`Params.as_dict`), and the warnings."""
    raw = {"adaptor_name": "my-adaptor", **values}
    resolved, warnings = resolve_params(raw, headless=headless)
    return resolved.as_dict(), warnings


def errors_of(headless: bool = True, **values) -> dict[str, str]:
    """Each failing parameter with its messages (one per line)."""
    with pytest.raises(InvalidConfig) as caught:
        resolve(headless=headless, **values)
    found: dict[str, list[str]] = {}
    for p in caught.value.errors:
        found.setdefault(p.parameter, []).append(p.message)
    return {name: "\n".join(messages) for name, messages in found.items()}


# --- defaults ------------------------------------------------------------------------------------


def test_defaults_come_from_index_json_parameters():
    defaults = params.defaults().as_dict()
    for name, spec in manifest_parameters().items():
        assert name in defaults
        assert defaults[name] == spec.get("default", ""), name


def test_defaults_include_host_keys_with_output_dir_defaulting_to_outputs():
    defaults = params.defaults().as_dict()
    assert set(defaults) >= SPEC_HOST_KEYS
    assert defaults["output_dir"] == "./outputs"
    assert defaults["chatml_formatted_column"] == "messages"
    assert defaults["apply_chat_template"] is False


def test_resolving_only_a_name_gives_every_default():
    values, warnings = resolve()
    assert warnings == []
    assert values == params.defaults().replace(adaptor_name="my-adaptor").as_dict()


# --- coercion --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("batch_size", "4", 4),
        ("batch_size", " 8 ", 8),
        ("batch_size", 16.0, 16),
        ("lora_r", "4.0", 4),
        ("max_steps", "-1", -1),
        ("learning_rate", "2e-4", 2e-4),
        ("learning_rate", "0.001", 0.001),
        ("learning_rate", 1, 1.0),
        ("num_train_epochs", "3", 3.0),
        ("main_process_port", "29500", 29500),
    ],
)
def test_numbers_given_as_strings_are_coerced(name, raw, expected):
    values, _ = resolve(**{name: raw})
    assert values[name] == expected
    assert type(values[name]) is type(expected)


def test_integer_fields_become_int_and_number_fields_become_float():
    values, _ = resolve(batch_size="4", learning_rate="1")
    assert isinstance(values["batch_size"], int)
    assert isinstance(values["learning_rate"], float)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("on", True),
        ("ON", True),
        ("yes", True),
        ("Yes", True),
        ("1", True),
        (" true ", True),
        (1, True),
        (True, True),
        ("false", False),
        ("FALSE", False),
        ("off", False),
        ("Off", False),
        ("no", False),
        ("NO", False),
        ("0", False),
        (0, False),
        (False, False),
    ],
)
def test_boolean_strings_are_coerced_in_any_case(raw, expected):
    values, _ = resolve(overwrite_output=raw)
    assert values["overwrite_output"] is expected


@pytest.mark.parametrize("raw", ["maybe", "2", 2, "", "tru"])
def test_booleans_reject_other_values_with_a_fix(raw):
    message = errors_of(overwrite_output=raw)["overwrite_output"]
    assert "expected true or false" in message
    assert "true/false, on/off, yes/no or 1/0" in message


def test_host_boolean_keys_are_coerced_too():
    values, _ = resolve(apply_chat_template="yes", run_sweeps="0")
    assert values["apply_chat_template"] is True
    assert values["run_sweeps"] is False


def test_null_means_the_default():
    values, _ = resolve(lora_r=None, learning_rate=None, packing=None, precision=None, output_dir=None)
    defaults = params.defaults().as_dict()
    for name in ("lora_r", "learning_rate", "packing", "precision", "output_dir"):
        assert values[name] == defaults[name]


def test_null_adaptor_name_is_still_required():
    message = errors_of(adaptor_name=None)["adaptor_name"]
    assert "is required" in message


def test_integer_fields_reject_fractions():
    message = errors_of(batch_size="2.5")["batch_size"]
    assert "expected a whole number" in message
    assert "2.5" in message
    assert "Give an integer" in message


@pytest.mark.parametrize("raw", ["many", "", "4 GPUs", [4], {"n": 4}])
def test_numbers_reject_text_that_is_not_a_number(raw):
    message = errors_of(batch_size=raw)["batch_size"]
    assert "expected a number" in message


@pytest.mark.parametrize("raw", [True, False])
def test_numbers_reject_real_booleans(raw):
    assert "expected a number" in errors_of(learning_rate=raw)["learning_rate"]


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_numbers_reject_nan_and_infinity(raw):
    assert "finite" in errors_of(learning_rate=raw)["learning_rate"]


def test_numbers_given_to_string_fields_become_text():
    values, _ = resolve(gpu_ids=0, num_processes=2)
    assert values["gpu_ids"] == "0"
    assert values["num_processes"] == "2"


def test_string_fields_reject_objects_and_lists():
    assert "expected text" in errors_of(lora_target_modules=["q_proj"])["lora_target_modules"]


def test_enum_values_are_matched_in_any_case():
    values, _ = resolve(training_mode=" LoRA ", precision="BF16", completion_only_loss=True)
    assert values["training_mode"] == "lora"
    assert values["precision"] == "bf16"
    # A JSON boolean for the auto/true/false choice is read as its text.
    assert values["completion_only_loss"] == "true"


# --- bounds and enums --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "what", "fix"),
    [
        ("batch_size", 0, "below the minimum 1", "at least 1"),
        ("lora_r", "2000", "above the maximum 1024", "at most 1024"),
        ("lora_dropout", 0.95, "above the maximum 0.9", "at most 0.9"),
        ("learning_rate", 0, "below the minimum 1e-08", "at least 1e-08"),
        ("eval_split", "0.6", "above the maximum 0.5", "at most 0.5"),
        ("max_dropped_fraction", 1.5, "above the maximum 1", "at most 1"),
        ("max_dropped_fraction", -0.1, "below the minimum 0", "at least 0"),
        ("max_steps", -2, "below the minimum -1", "at least -1"),
        ("main_process_port", 70000, "above the maximum 65535", "at most 65535"),
    ],
)
def test_bounds_give_an_error_naming_the_parameter_and_the_fix(name, raw, what, fix):
    with pytest.raises(InvalidConfig) as caught:
        resolve(**{name: raw})
    [found] = caught.value.errors
    assert found.parameter == name
    assert what in found.message
    assert f"Use a value of {fix}" in found.message
    assert found.line().startswith(f"{name}: ")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("training_mode", "adapter"),
        ("precision", "int8"),
        ("train_device", "tpu"),
        ("distributed_strategy", "deepspeed"),
        ("completion_only_loss", "sometimes"),
        ("learning_rate_schedule", "cosine-ish"),
    ],
)
def test_enums_give_an_error_listing_the_choices(name, raw):
    with pytest.raises(InvalidConfig) as caught:
        resolve(**{name: raw})
    [found] = caught.value.errors
    assert found.parameter == name
    assert repr(raw) in found.message
    choices = ", ".join(params.form_schema()[name]["enum"])
    assert f"Pick one of: {choices}" in found.message


def test_values_at_the_bounds_are_accepted():
    values, _ = resolve(eval_split=0.5, max_dropped_fraction=0, lora_dropout="0.9", batch_size=1, max_steps=-1)
    assert values["eval_split"] == 0.5
    assert values["max_dropped_fraction"] == 0
    assert values["max_steps"] == -1


# --- adaptor_name ------------------------------------------------------------------------------------


def test_adaptor_name_is_required():
    with pytest.raises(InvalidConfig) as caught:
        resolve_params({}, headless=True)
    [found] = caught.value.errors
    assert found.parameter == "adaptor_name"
    assert "is required" in found.message


def test_empty_adaptor_name_is_required():
    assert "is required" in errors_of(adaptor_name="")["adaptor_name"]


@pytest.mark.parametrize("name", ["a/b", ".hidden", "..", ".", "../up", "a\\b", "/abs", "has space", "x:y"])
def test_adaptor_name_pattern_rejects_paths_and_hidden_names(name):
    message = errors_of(adaptor_name=name)["adaptor_name"]
    assert "not a valid name" in message
    assert "never a path" in message


@pytest.mark.parametrize("name", ["a/b", ".hidden"])
def test_an_invalid_adaptor_name_gets_one_error_not_also_is_required(name):
    with pytest.raises(InvalidConfig) as caught:
        resolve(adaptor_name=name)
    [found] = caught.value.errors  # today a second "adaptor_name: is required" follows
    assert found.message.startswith(f"{name!r} is not a valid name")


@pytest.mark.parametrize("name", ["my-adaptor_1.0", "a", "_x", "-x", "Llama3.1-sft", "v2..final"])
def test_adaptor_name_pattern_accepts_plain_names(name):
    values, _ = resolve(adaptor_name=name)
    assert values["adaptor_name"] == name


def test_adaptor_name_longer_than_the_manifest_max_length_is_rejected():
    # index.json declares maxLength 128; a longer name would also overflow file-name limits once the
    # staging suffix is added.
    limit = params.form_schema()["adaptor_name"]["maxLength"]
    errors = errors_of(adaptor_name="a" * (limit + 1))
    assert "adaptor_name" in errors
    resolve(adaptor_name="a" * limit)


# --- unknown keys ------------------------------------------------------------------------------------


def test_unknown_key_headless_is_an_error_with_did_you_mean():
    with pytest.raises(InvalidConfig) as caught:
        resolve(learning_rat=1e-4)
    [found] = caught.value.errors
    assert found.parameter == "learning_rat"
    assert "unknown parameter" in found.message
    assert "Did you mean 'learning_rate'?" in found.message


def test_unknown_key_without_a_close_match_points_to_index_json():
    message = errors_of(zzzz_qqqq=1)["zzzz_qqqq"]
    assert "unknown parameter" in message
    assert "Did you mean" not in message
    assert "index.json" in message


def test_unknown_key_under_a_host_is_a_warning_not_an_error():
    values, warnings = resolve(headless=False, learning_rat=1e-4)
    assert "learning_rat" not in values
    assert values["learning_rate"] == params.defaults().learning_rate
    [found] = warnings
    assert found.parameter == "learning_rat"
    assert "Did you mean 'learning_rate'?" in found.message


@pytest.mark.parametrize("key", sorted(params.HOST_NOISE))
def test_host_noise_keys_are_silent_under_a_host(key):
    values, warnings = resolve(headless=False, **{key: "anything"})
    assert warnings == []
    assert key not in values


def test_host_noise_keys_are_still_unknown_headless():
    assert "unknown parameter" in errors_of(type="trainer")["type"]


# --- all problems at once ------------------------------------------------------------------------------


def test_all_problems_are_reported_at_once():
    with pytest.raises(InvalidConfig) as caught:
        resolve_params(
            {
                "learning_rat": 1e-4,
                "batch_size": "many",
                "lora_r": 0,
                "precision": "int8",
                "packing": "maybe",
                "max_steps": "2.5",
            },
            headless=True,
        )
    found = {p.parameter for p in caught.value.errors}
    assert found == {"learning_rat", "batch_size", "lora_r", "precision", "packing", "max_steps", "adaptor_name"}
    # One line each, in the `<parameter>: <what>. <fix>.` form; a question ends with its question mark alone.
    lines = str(caught.value).splitlines()
    assert len(lines) == len(found)
    assert all(line.split(": ", 1)[0] in found and line.endswith((".", "?")) for line in lines)
    assert not [line for line in lines if line.endswith(("?.", "..", " ."))]
    assert "learning_rat: unknown parameter. Did you mean 'learning_rate'?" in lines


def test_warnings_travel_with_the_errors_under_a_host():
    with pytest.raises(InvalidConfig) as caught:
        resolve_params({"adaptor_name": "x", "learning_rat": 1, "batch_size": 0}, headless=False)
    assert [p.parameter for p in caught.value.errors] == ["batch_size"]
    assert [p.parameter for p in caught.value.warnings] == ["learning_rat"]


# --- host keys -----------------------------------------------------------------------------------------


def test_host_keys_are_the_spec_list():
    assert set(params.HOST_KEYS) == SPEC_HOST_KEYS


def test_host_keys_are_never_form_parameters():
    assert not SPEC_HOST_KEYS & set(manifest_parameters())
    assert not SPEC_HOST_KEYS & set(params.form_schema())


def test_host_keys_are_accepted_headless():
    sent = {
        "model_name": "/models/tiny",
        "model_architecture": "LlamaForCausalLM",
        "dataset_name": "/data/rows.jsonl",
        "template_name": "t",
        "plugin_name": "sft_trainer_trl",
        "job_id": 7,
        "output_dir": "/out",
        "adaptor_output_dir": "/out/adaptor",
        "run_sweeps": "false",
        "sweep_config": {"learning_rate": [1e-4, 2e-4]},
        "experiment_name": "alpha",
        "formatting_template": "{{ text }}",
        "apply_chat_template": "true",
        "chatml_formatted_column": "conversations",
        "formatting_chat_template": "",
    }
    values, warnings = resolve(**sent)
    assert warnings == []
    assert values["job_id"] == "7"
    assert values["run_sweeps"] is False
    assert values["apply_chat_template"] is True
    assert values["sweep_config"] == {"learning_rate": [1e-4, 2e-4]}
    assert values["model_name"] == "/models/tiny"
    assert values["chatml_formatted_column"] == "conversations"


# --- parameters as current TransformerLab's tasks deliver them ------------------------------------------------


@pytest.mark.parametrize("key", sorted(params.TASK_FORM_LEFTOVERS))
def test_task_form_leftovers_are_ignored_silently_under_a_host(key):
    values, warnings = resolve(headless=False, **{key: "x"})
    assert warnings == [] and key not in values


def test_a_schema_dict_the_form_did_not_replace_means_its_default():
    # lab.get_config() is the task's parameters: overwritten by what the form sent; the rest keep their schema.
    values, warnings = resolve(
        headless=False,
        lora_r={"type": "int", "default": 8, "min": 1, "max": 256, "title": "LoRA rank"},
        learning_rate={"type": "float", "default": 0.0002},
        packing={"type": "enum", "options": ["auto", "true", "false"], "default": "auto"},
        max_steps={"type": "int"},  # no default of its own: the plugin's
    )
    assert (values["lora_r"], values["learning_rate"], values["packing"]) == (8, 2e-4, "auto")
    assert values["max_steps"] == params.form_schema()["max_steps"]["default"]
    assert warnings == []


def test_a_schema_dict_whose_default_is_out_of_range_is_still_checked():
    assert "lora_r" in errors_of(headless=False, lora_r={"type": "int", "default": 0})


def test_a_dict_that_is_not_a_schema_is_still_refused():
    assert "lora_r" in errors_of(headless=False, lora_r={"value": 8})


def test_a_number_field_cleared_in_a_hosts_form_means_its_default_with_a_warning():
    # The task form (current TransformerLab) sends '' for a cleared number field; headless it stays an error.
    reading = params.read(
        {"model_name": "m", "dataset_name": "d", "adaptor_name": "a", "learning_rate": "", "max_steps": ""},
        headless=False,
    )
    assert not reading.errors
    assert reading.params.learning_rate == params.defaults().learning_rate
    assert [w.line() for w in reading.warnings] == [
        f"learning_rate: left empty, so its default {params.defaults().learning_rate} is used. Give a value to "
        "change it.",
        "max_steps: left empty, so its default -1 is used. Give a value to change it.",
    ]
    assert "expected a number" in errors_of(learning_rate="")["learning_rate"]


# --- typed, parsed once, each parameter in its place ------------------------------------------------------------


def test_every_parameter_is_a_field_of_its_type_with_a_declared_role():
    """A parameter added to index.json fails here until it is a field of Params with its roles: part of the data
    key (DATA, or CONTENT: by the content it names), of the resume identity (HARD or SOFT), or of this run alone
    (RUN). Nothing else can make a new parameter choose, and forgotten it would escape both checks silently."""
    found = {f.name: f for f in dataclasses.fields(params.Params)}
    assert set(found) == set(params.HOST_KEYS) | set(manifest_parameters())
    expected_types = {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "any": "Any"}
    parsed = {name: "Auto | bool" for name in params.switches()}
    parsed.update(num_processes="Auto | int", gpu_ids="Auto | tuple[int, ...]")
    for name, spec in {**params.HOST_KEYS, **manifest_parameters()}.items():
        assert found[name].type == parsed.get(name, expected_types[spec["type"]]), name
        roles = found[name].metadata.get("roles")
        assert roles and roles <= set(params.ROLES), f"{name} declares no role"
        assert params.RUN not in roles or roles == {params.RUN}, f"{name}: run-only is the only role it has"


def test_the_records_consumers_get_are_exactly_the_parameters_of_their_role():
    def names(record) -> set[str]:
        return {f.name for f in dataclasses.fields(record)}

    # The data code reads DataSettings and nothing else of the parameters: the data key covers what it reads.
    assert names(params.DataSettings) == set(params.names_in(params.DATA)) | set(params.names_in(params.CONTENT))
    assert set(params.defaults().data.canonical()) == set(params.names_in(params.DATA))
    assert names(params.LoraSettings) == set(params.names_in(group="lora"))
    assert names(params.TrainingSettings) == set(params.names_in(group="training"))
    identity = params.defaults().resume_identity()
    assert set(identity.hard) == set(params.HARD_KEYS) and set(identity.soft) == set(params.SOFT_KEYS)
    assert list(identity.asked()) == [*params.HARD_KEYS, *params.SOFT_KEYS]
    assert {"model_name", "packing", "seed"} <= set(params.HARD_KEYS)
    assert {"learning_rate", "max_steps"} <= set(params.SOFT_KEYS)


@pytest.mark.parametrize(
    ("raw", "typed"),
    [
        (
            {"packing": "on", "gradient_checkpointing": "auto", "completion_only_loss": "FALSE"},
            (True, params.AUTO, False),
        ),
        ({"packing": 0, "gradient_checkpointing": True, "completion_only_loss": " Auto "}, (False, True, params.AUTO)),
    ],
)
def test_auto_true_false_switches_are_parsed_once(raw, typed):
    p = params.read({"adaptor_name": "a", **raw}, headless=True).params
    assert (p.packing, p.gradient_checkpointing, p.completion_only_loss) == typed
    shown = p.as_dict()
    assert {k: shown[k] for k in raw} == {k: params.shown(k, v) for k, v in zip(raw, typed, strict=True)}
    assert set(shown[k] for k in raw) <= {"auto", "true", "false"}


@pytest.mark.parametrize(
    ("raw", "processes", "gpus"),
    [
        ({}, params.AUTO, params.AUTO),
        ({"num_processes": "2", "gpu_ids": "0, 1"}, 2, (0, 1)),
        ({"num_processes": 3, "gpu_ids": 1}, 3, (1,)),
        ({"num_processes": " AUTO ", "gpu_ids": "Auto"}, params.AUTO, params.AUTO),
    ],
)
def test_processes_and_gpu_ids_are_parsed_once(raw, processes, gpus):
    p = params.read({"adaptor_name": "a", **raw}, headless=True).params
    assert (p.num_processes, p.gpu_ids) == (processes, gpus)


@pytest.mark.parametrize(
    ("raw", "parameter", "message"),
    [
        (
            {"num_processes": "two"},
            "num_processes",
            "'two' is neither 'auto' nor a count. Use auto or a count such as 2.",
        ),
        ({"num_processes": "0"}, "num_processes", "'0' is neither 'auto' nor a count"),
        ({"gpu_ids": "cuda:0"}, "gpu_ids", "'cuda:0' is not a list of GPU ids. Use auto, or ids such as 0,1."),
        ({"gpu_ids": "0,,1"}, "gpu_ids", "'0,,1' is not a list of GPU ids"),
        ({"gpu_ids": ""}, "gpu_ids", "'' is not a list of GPU ids"),
        ({"gpu_ids": "all"}, "gpu_ids", "'all' is not a list of GPU ids"),
        # A GPU listed twice would get two processes.
        ({"gpu_ids": "1, 0, 1"}, "gpu_ids", "GPU 1 is listed more than once. List each GPU once, such as 0,1."),
    ],
)
def test_bad_processes_and_gpu_ids_are_single_value_errors(raw, parameter, message):
    assert message in errors_of(**raw)[parameter]


def test_a_params_copy_reads_its_values_as_a_host_does():
    p = params.defaults().replace(lora_r="8", packing="yes", gpu_ids="2,3")
    assert (p.lora_r, p.packing, p.gpu_ids) == (8, True, (2, 3))
    with pytest.raises(InvalidConfig, match="lora_r: expected a number"):
        p.replace(lora_r="many")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.lora_r = 4


@pytest.mark.parametrize(
    ("raw", "reporters"),
    [
        ({}, ()),
        ({"report_to": "none"}, ()),
        ({"report_to": " TensorBoard , trackio,"}, ("tensorboard", "trackio")),
        ({"report_to": "trackio,trackio"}, ("trackio",)),
        # The form's older switch adds W&B, once.
        ({"log_to_wandb": "on"}, ("wandb",)),
        ({"report_to": "tensorboard", "log_to_wandb": True}, ("tensorboard", "wandb")),
        ({"report_to": "wandb,tensorboard", "log_to_wandb": True}, ("wandb", "tensorboard")),
    ],
)
def test_report_to_is_a_comma_list_and_log_to_wandb_adds_wandb(raw, reporters):
    reading = params.read({"adaptor_name": "a", **raw}, headless=True)
    assert reading.errors == []
    assert reading.params.reporters == reporters
    assert reading.params.as_dict()["report_to"] == raw.get("report_to", "none")  # recorded as given
