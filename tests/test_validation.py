"""plugin_utils/validation.py and planning.py: each rule by phase, the run plan, and check().

GPUs cannot exist on the CPU-only machine the suite runs on, so machine rules get a `Machine` built
by hand here: a fake of what nvidia-smi and CUDA_VISIBLE_DEVICES would report. Everything else is real.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

from plugin_utils import launch, outputs, params, planning, rowformats, sources, speed, validation
from plugin_utils.errors import InvalidConfig
from plugin_utils.machine import Gpu, Machine

from .conftest import ROOT, stats_of, with_bitsandbytes
from .model_configs import LLAMA_3_8B, QWEN2_5_0_5B, model_folder

# Fakes for hardware that cannot exist here: an Ampere-class and a pre-Ampere GPU.
A100 = 8.0
V100 = 7.0


def gpus(*capabilities: float) -> list[Gpu]:
    return [
        Gpu(index=i, name=f"fake-gpu-{i}", memory_mib=40960, compute_capability=c) for i, c in enumerate(capabilities)
    ]


CPU_ONLY = Machine(gpus=[], visible=None, cpu_count=8)
TWO_AMPERE = Machine(gpus=gpus(A100, A100), visible=None, cpu_count=16)
ONE_VOLTA = Machine(gpus=gpus(V100), visible=None, cpu_count=16)
FOUR_AMPERE_TWO_VISIBLE = Machine(gpus=gpus(A100, A100, A100, A100), visible=[2, 3], cpu_count=16)
ALL_HIDDEN = Machine(gpus=gpus(A100, A100), visible=[], cpu_count=16)


# A model folder holding only config.json: the rules read that file and never the weights.
MODEL_DIR = tempfile.mkdtemp(prefix="rules-model-")
Path(MODEL_DIR, "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096}')


# A dataset file that exists: a dataset_name written as a path must name one.
ROWS = str(Path(MODEL_DIR, "rows.jsonl"))
Path(ROWS).write_text('{"prompt": "a", "completion": "b"}\n')


def config(**overrides) -> params.Params:
    """Parameters as a host's values are read, with a model folder and a dataset."""
    raw = {"model_name": MODEL_DIR, "dataset_name": ROWS, "adaptor_name": "my-adaptor", **overrides}
    return params.defaults().replace(**raw)


def without_speed(plan) -> dict:
    values = plan.as_dict()
    return {k: values[k] for k in ("device", "gpu_ids", "num_processes", "precision")}


def call(rule, p, machine=None, **facts) -> list:
    """What a rule yields, given the facts it names (the model's are read from p's model folder)."""
    plan = planning.build(p, machine) if machine is not None else None  # the draft plan the rules read
    given = {"p": p, "machine": machine, "model": sources.inspect_model(p.model_name), "plan": plan, **facts}
    return list(rule(**{name: given[name] for name in inspect.signature(rule).parameters}))


def findings(rule, p, machine=None, **facts) -> set[tuple[str, str]]:
    """(severity, parameter) of what a rule yields."""
    return {(severity, problem.parameter) for severity, problem in call(rule, p, machine, **facts)}


def messages(rule, p, machine=None, **facts) -> list[str]:
    return [problem.line() for _, problem in call(rule, p, machine, **facts)]


def where(adapter: str, checkpoints: str) -> outputs.Where:
    return outputs.Where(adapter, checkpoints, os.path.join(os.path.dirname(checkpoints), "runs"))


def out_facts(p, adapter: str, checkpoints: str) -> outputs.OutputFacts:
    return outputs.inspect(where(adapter, checkpoints), outputs.identity(p, 1, None), overwrite=p.overwrite_output)


def checked(p, machine) -> validation.Findings:
    """The phases that need no output folders or data."""
    return validation.check(
        ("parameters", "machine", "model"),
        p=p,
        machine=machine,
        model=sources.inspect_model(p.model_name),
        plan=planning.build(p, machine) if machine is not None else None,
    )


def check(p, machine):
    """check() then the plan, as main.py does: errors raise."""
    checked(p, machine).raise_errors()
    return planning.build(p, machine)


def cpu_plan(processes: int = 1) -> planning.Plan:
    return planning.build(config(num_processes=str(processes), train_device="cpu"), CPU_ONLY)


# --- a template answered without Jinja -----------------------------------------------------------------------

# Pieces whose joins make the lexer's hard cases: tags split or doubled, braces next to outputs, operator words.
PIECES = [
    "{",
    "}",
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    " ",
    "\n",
    "-",
    "a",
    "not",
    "{{ a }}",
    "{{b}}",
    "{{ in }}",
    "{{ q } }",
    "{% if a %}",
    "{% endif %}",
    "{{ a -}}",
    "{{ 1 }}",
    "{{ a.b }}",
    "Q:",
    "\u00e9",
]


def test_a_template_of_text_and_column_outputs_is_valid_without_parsing_and_only_then():
    """plainly_valid answers for the common template (text and `{{ column }}` outputs) without importing Jinja;
    whatever it calls valid, Jinja parses, over 20,000 strings joined from pieces that make the lexer's hard
    cases, and the usual templates take that way."""
    import random

    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(keep_trailing_newline=True)
    rng = random.Random(7)
    plain = 0
    for _ in range(20_000):
        source = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8)))
        if validation.plainly_valid(source):
            plain += 1
            try:
                env.parse(source)
            except TemplateSyntaxError as exc:
                pytest.fail(f"{source!r} was called plainly valid, but Jinja refuses it: {exc}")
    assert plain > 1000, "the strings cover the plain case too"
    for usual in (
        "Question: {{ prompt }}\nAnswer:{{ completion }}",
        "### Instruction:\n{{instruction}}\n\n### Response:\n{{ output }}",
        "<s>[INST] {{ question }} [/INST] {{ answer }}</s>",
        "Plain text, no outputs: { braces } are text.",
    ):
        assert validation.plainly_valid(usual), usual
    for parsed in ("{% if input %}{{ input }}{% endif %}", "{{ a | upper }}", "{{{ a }}", "{# note #}{{ a }}"):
        assert not validation.plainly_valid(parsed), parsed


# --- configuration rules, table-driven: (rule, overrides, expected findings) ----------------------------

CONFIG_CASES = [
    (validation.templates_are_valid_jinja, {"formatting_template": "Q: {{ q }} A: {{ a }}"}, set()),
    (validation.templates_are_valid_jinja, {"formatting_template": "Q: {{ q } A"}, {("error", "formatting_template")}),
    (
        validation.templates_are_valid_jinja,
        # transformers' own tags parse: loop controls and {% generation %}.
        {
            "formatting_chat_template": "{% for m in messages %}{% if m.x %}{% break %}{% endif %}"
            "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
        },
        set(),
    ),
    (
        validation.templates_are_valid_jinja,
        {"formatting_chat_template": "{% for m in messages %}{{ m.content }}"},
        {("error", "formatting_chat_template")},
    ),
    (validation.model_and_dataset_given, {}, set()),
    (validation.model_and_dataset_given, {"model_name": ""}, {("error", "model_name")}),
    (validation.model_and_dataset_given, {"dataset_name": ""}, {("error", "dataset_name")}),
    (
        validation.model_and_dataset_given,
        {"model_name": "", "dataset_name": ""},
        {("error", "model_name"), ("error", "dataset_name")},
    ),
    (validation.max_steps_not_zero, {"max_steps": -1}, set()),
    (validation.max_steps_not_zero, {"max_steps": 5}, set()),
    (validation.max_steps_not_zero, {"max_steps": 0}, {("error", "max_steps")}),
    (validation.learning_rate_sane, {"learning_rate": 2e-4}, set()),
    (validation.learning_rate_sane, {"learning_rate": 1e-2}, set()),
    (validation.learning_rate_sane, {"learning_rate": 0.5}, {("warning", "learning_rate")}),
    (validation.lora_settings_ignored_in_full_mode, {"training_mode": "lora", "lora_r": 64}, set()),
    (validation.lora_settings_ignored_in_full_mode, {"training_mode": "full"}, set()),
    (validation.lora_settings_ignored_in_full_mode, {"training_mode": "full", "lora_r": 64}, {("warning", "lora_r")}),
    (
        validation.lora_settings_ignored_in_full_mode,
        {"training_mode": "full", "lora_alpha": 8, "lora_dropout": 0.1},
        {("warning", "lora_alpha, lora_dropout")},
    ),
    (validation.chat_template_wins_over_formatting_template, {"formatting_template": "{{ text }}"}, set()),
    (validation.chat_template_wins_over_formatting_template, {"apply_chat_template": True}, set()),
    (
        validation.chat_template_wins_over_formatting_template,
        {"apply_chat_template": True, "formatting_template": "  "},
        set(),
    ),
    (
        validation.chat_template_wins_over_formatting_template,
        {"apply_chat_template": True, "formatting_template": "{{ text }}"},
        {("warning", "formatting_template")},
    ),
    (validation.qlora_with_ddp_only, {"training_mode": "qlora"}, set()),
    (validation.qlora_with_ddp_only, {"distributed_strategy": "fsdp"}, set()),
    (
        validation.qlora_with_ddp_only,
        {"training_mode": "qlora", "distributed_strategy": "fsdp"},
        {("error", "distributed_strategy")},
    ),
    (validation.fuse_model_explained, {"fuse_model": True}, set()),
    (validation.fuse_model_explained, {"fuse_model": False, "training_mode": "qlora"}, set()),
    (validation.fuse_model_explained, {"fuse_model": True, "training_mode": "qlora"}, {("warning", "fuse_model")}),
    (validation.fuse_model_explained, {"fuse_model": True, "training_mode": "full"}, {("warning", "fuse_model")}),
    (validation.multi_node_needs_address, {}, set()),
    (
        validation.multi_node_needs_address,
        {"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1", "main_process_port": 29500},
        set(),
    ),
    (
        validation.multi_node_needs_address,
        {"num_machines": 2, "main_process_port": 29500},
        {("error", "main_process_ip")},
    ),
    (
        validation.multi_node_needs_address,
        {"num_machines": 2, "main_process_ip": "10.0.0.1"},
        {("error", "main_process_port")},
    ),
    (
        validation.multi_node_needs_address,
        {"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1", "main_process_port": 29500},
        {("error", "machine_rank")},
    ),
    (validation.multi_node_needs_address, {"machine_rank": 1}, {("error", "machine_rank")}),
    (validation.lora_not_on_lm_head, {}, set()),
    (validation.lora_not_on_lm_head, {"lora_target_modules": "q_proj,v_proj"}, set()),
    (validation.lora_not_on_lm_head, {"lora_target_modules": "q_proj, lm_head"}, {("error", "lora_target_modules")}),
    (validation.lora_not_on_lm_head, {"lora_target_modules": "lm_head", "training_mode": "full"}, set()),
    (validation.save_steps_within_max_steps, {"max_steps": -1, "save_steps": 500}, set()),
    (validation.save_steps_within_max_steps, {"max_steps": 100, "save_steps": 50}, set()),
    (validation.save_steps_within_max_steps, {"max_steps": 100, "save_steps": 200}, {("warning", "save_steps")}),
    (validation.report_to_names_trackers, {}, set()),
    (validation.report_to_names_trackers, {"report_to": "none"}, set()),
    (validation.report_to_names_trackers, {"report_to": " TensorBoard , trackio,wandb"}, set()),
    (validation.report_to_names_trackers, {"report_to": "tensorbord"}, {("error", "report_to")}),
    (validation.report_to_names_trackers, {"report_to": "trackio,mlflow"}, {("error", "report_to")}),
]


@pytest.mark.parametrize(
    ("rule", "overrides", "expected"),
    CONFIG_CASES,
    ids=[f"{rule.__name__}-{overrides}" for rule, overrides, _ in CONFIG_CASES],
)
def test_config_rule_findings(rule, overrides, expected):
    assert findings(rule, config(**overrides)) == expected


# --- machine rules, table-driven: (rule, overrides, machine, expected findings) --------------------------

MACHINE_CASES = [
    (validation.gpus_exist, {}, CPU_ONLY, set()),
    (validation.gpus_exist, {"train_device": "cpu"}, CPU_ONLY, set()),
    (validation.gpus_exist, {"train_device": "cuda"}, CPU_ONLY, {("error", "train_device")}),
    (validation.gpus_exist, {"train_device": "cuda"}, TWO_AMPERE, set()),
    (validation.gpus_exist, {"gpu_ids": "1"}, TWO_AMPERE, set()),
    (validation.gpus_exist, {"gpu_ids": "0,1"}, TWO_AMPERE, set()),
    (validation.gpus_exist, {"gpu_ids": "2"}, TWO_AMPERE, {("error", "gpu_ids")}),
    (validation.gpus_exist, {"gpu_ids": "0"}, CPU_ONLY, {("error", "gpu_ids")}),
    (validation.gpus_exist, {"gpu_ids": "2,3"}, FOUR_AMPERE_TWO_VISIBLE, set()),
    (validation.gpus_exist, {"gpu_ids": "0"}, FOUR_AMPERE_TWO_VISIBLE, {("error", "gpu_ids")}),
    (validation.gpus_exist, {"gpu_ids": "5", "train_device": "cpu"}, TWO_AMPERE, set()),
    (validation.gpus_exist, {"train_device": "cuda"}, ALL_HIDDEN, {("error", "train_device")}),
    (validation.processes_fit_gpus, {"num_processes": "2"}, TWO_AMPERE, set()),
    (validation.processes_fit_gpus, {"num_processes": "3"}, TWO_AMPERE, {("error", "num_processes")}),
    (validation.processes_fit_gpus, {"num_processes": "2", "gpu_ids": "1"}, TWO_AMPERE, {("error", "num_processes")}),
    (validation.processes_fit_gpus, {"num_processes": "auto"}, TWO_AMPERE, set()),
    (validation.processes_fit_gpus, {"num_processes": "4"}, CPU_ONLY, set()),
    # More CPU processes than cores only share them out: a warning.
    (validation.cpu_processes_fit_cores, {"num_processes": "8"}, CPU_ONLY, set()),
    (validation.cpu_processes_fit_cores, {"num_processes": "64"}, CPU_ONLY, {("warning", "num_processes")}),
    (validation.cpu_processes_fit_cores, {"num_processes": "auto"}, CPU_ONLY, set()),
    (validation.cpu_processes_fit_cores, {"num_processes": "2"}, TWO_AMPERE, set()),
    (validation.processes_fit_gpus, {"num_processes": "4", "train_device": "cpu"}, TWO_AMPERE, set()),
    (validation.cpu_only_note, {}, CPU_ONLY, {("warning", "train_device")}),
    (validation.cpu_only_note, {"train_device": "cpu"}, CPU_ONLY, set()),
    (validation.cpu_only_note, {}, TWO_AMPERE, set()),
    (validation.cpu_only_note, {}, ALL_HIDDEN, {("warning", "train_device")}),
    (validation.precision_supported, {"precision": "bf16"}, TWO_AMPERE, set()),
    (validation.precision_supported, {"precision": "bf16"}, ONE_VOLTA, {("error", "precision")}),
    (validation.precision_supported, {"precision": "fp16"}, ONE_VOLTA, set()),
    (validation.precision_supported, {"precision": "auto"}, ONE_VOLTA, set()),
    (validation.precision_supported, {"precision": "fp16"}, CPU_ONLY, {("error", "precision")}),
    (
        validation.precision_supported,
        {"precision": "fp16", "train_device": "cpu"},
        TWO_AMPERE,
        {("error", "precision")},
    ),
    (validation.precision_supported, {"precision": "fp32"}, CPU_ONLY, set()),
    (validation.precision_supported, {"precision": "bf16"}, CPU_ONLY, set()),
    # The GPU is not used when training on the CPU, so its bf16 support does not matter.
    (validation.precision_supported, {"precision": "bf16", "train_device": "cpu"}, ONE_VOLTA, set()),
    (validation.qlora_needs_bitsandbytes, {"training_mode": "lora"}, CPU_ONLY, set()),
    (validation.reporters_installed, {"report_to": "tensorboard,trackio,wandb"}, CPU_ONLY, set()),
    (validation.reporters_installed, {"log_to_wandb": True}, CPU_ONLY, set()),
]


@pytest.mark.parametrize(
    ("rule", "overrides", "machine", "expected"),
    MACHINE_CASES,
    ids=[f"{rule.__name__}-{overrides}-{i}" for i, (rule, overrides, _, _) in enumerate(MACHINE_CASES)],
)
def test_machine_rule_findings(rule, overrides, machine, expected):
    assert findings(rule, config(**overrides), machine) == expected


# Punctuation a proof-reader would strike: a question mark or comma before a full stop, a doubled stop, a space
# before punctuation, an empty list or choice ("Use auto or 1, 2, ."), doubled spaces.
BAD_PUNCTUATION = re.compile(r"\?\.|,\.|(?<![.'])\.\.(?![.'])|\s[.,;:](?!\w)|, \.|\(\s|\s\)|\S  \S|\(\)|: \.")


def test_every_message_the_rule_tables_produce_is_proof_read():
    lines = [line for rule, overrides, _ in CONFIG_CASES for line in messages(rule, config(**overrides))]
    lines += [line for rule, o, machine, _ in MACHINE_CASES for line in messages(rule, config(**o), machine)]
    assert len(lines) > 30
    assert not [line for line in lines if BAD_PUNCTUATION.search(line)]
    assert all(line.endswith((".", "?")) and ": " in line for line in lines), lines


@pytest.mark.parametrize(
    ("asked", "key", "expected"),
    [
        ({"log_to_wandb": False}, None, set()),
        ({"log_to_wandb": True}, "secret", set()),
        ({"log_to_wandb": True}, None, {("warning", "log_to_wandb")}),
        ({"report_to": "tensorboard,wandb"}, None, {("warning", "report_to")}),
        ({"report_to": "wandb", "log_to_wandb": True}, "secret", set()),
    ],
)
def test_wandb_without_a_key_is_a_warning(monkeypatch, asked, key, expected):
    if key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", key)
    assert findings(validation.wandb_key, config(**asked)) == expected


def test_an_unknown_tracker_is_refused_with_the_ones_offered():
    [line] = messages(validation.report_to_names_trackers, config(report_to="tensorboard,mlflow"))
    assert line == (
        "report_to: 'mlflow' is not one of none, tensorboard, trackio, wandb. Use none, or one or more of "
        "tensorboard, trackio, wandb separated by commas, such as tensorboard,trackio."
    )


@pytest.mark.parametrize(
    ("asked", "absent", "parameter", "install"),
    [
        ({"report_to": "tensorboard,trackio"}, ("trackio",), "report_to", "pip install trackio"),
        ({"report_to": "tensorboard"}, ("tensorboardX", "tensorboard"), "report_to", "pip install tensorboardX"),
        ({"log_to_wandb": True}, ("wandb",), "log_to_wandb", "pip install wandb"),
    ],
)
def test_a_tracker_that_is_not_installed_is_refused_with_its_install_command(
    monkeypatch, asked, absent, parameter, install
):
    # None in sys.modules is how Python marks a module absent: find_spec answers no, as where it is not installed.
    for package in absent:
        monkeypatch.setitem(sys.modules, package, None)
    [line] = messages(validation.reporters_installed, config(**asked), CPU_ONLY)
    assert line.startswith(f"{parameter}: ") and line.endswith(f"Run `{install}`.") and "not installed" in line


@pytest.mark.parametrize("machine", [CPU_ONLY, TWO_AMPERE], ids=["cpu", "gpus"])
@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        ((0, 50, 2), []),
        ((0, 46, 1), []),
        ((0, 45, 5), ["0.46.1 or newer", "0.45.5 is installed", "WITH_BITSANDBYTES=1"]),
        (None, ["bitsandbytes, which is not installed", "WITH_BITSANDBYTES=1"]),
    ],
)
def test_qlora_needs_a_bitsandbytes_that_runs_4_bit_layers_here(monkeypatch, machine, installed, expected):
    """QLoRA was refused on every CPU. bitsandbytes 0.46.1 (transformers' own minimum for 4-bit) and newer run 4-bit
    layers on the CPU: checked with 0.45.5 (refused by transformers), 0.46.1, 0.47.0, 0.48.2 and 0.50.2. The version
    is read from the package's metadata: --check imports no torch."""
    monkeypatch.setattr(validation, "package_version", lambda name: installed if name == "bitsandbytes" else None)
    lines = messages(validation.qlora_needs_bitsandbytes, config(training_mode="qlora"), machine)
    assert len(lines) == (1 if expected else 0)
    assert all(part in lines[0] for part in expected) if expected else True


def test_the_installed_bitsandbytes_version_is_read_without_importing_it():
    import subprocess
    import sys

    probe = (
        "import sys; from plugin_utils.machine import package_version as v; "
        "print(v('bitsandbytes'), v('no-such-distribution'), 'bitsandbytes' in sys.modules, 'torch' in sys.modules)"
    )
    env = with_bitsandbytes(dict(os.environ))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert out.stdout.split() == ["(0,", "50,", "2)", "None", "False", "False"]


@pytest.mark.parametrize(
    ("strategy", "installed", "expected"),
    [
        ("ddp", False, set()),
        ("fsdp", False, set()),
        ("deepspeed_zero2", True, set()),
        ("deepspeed_zero2", False, {("error", "distributed_strategy")}),
        ("deepspeed_zero3", False, {("error", "distributed_strategy")}),
    ],
)
def test_deepspeed_strategies_need_deepspeed(monkeypatch, strategy, installed, expected):
    monkeypatch.setattr(validation, "has_package", lambda name: installed if name == "deepspeed" else True)
    p = config(distributed_strategy=strategy)
    assert findings(validation.strategy_packages_installed, p, TWO_AMPERE) == expected


# --- disk: what the run writes, from the model's size ------------------------------------------------------


def disk_facts(tmp_path, **overrides):
    """Parameters and output facts for a run writing under tmp_path/outputs."""
    p = config(output_dir=str(tmp_path / "outputs"), **overrides)
    root = tmp_path / "outputs"
    return p, out_facts(p, str(root / "my-adaptor"), str(root / "checkpoints" / "my-adaptor"))


def fake_free(monkeypatch, free_gib: float | dict[str, float]) -> list[str]:
    """Free space faked (the real disk's is whatever it is): one figure, or one per path prefix."""
    asked: list[str] = []

    def free(path: str) -> float:
        asked.append(path)
        if isinstance(free_gib, dict):
            return next(v for k, v in free_gib.items() if path.startswith(k))
        return free_gib

    monkeypatch.setattr(validation, "free_disk_gib", free)
    return asked


@pytest.mark.parametrize(("known", "parameters"), [(LLAMA_3_8B, 8.03e9), (QWEN2_5_0_5B, 0.494e9)])
def test_parameter_count_from_config_json_is_within_a_percent(tmp_path, known, parameters):
    folder = model_folder(tmp_path, known)
    counted = planning.model_parameters(folder, sources.model_config(folder))
    assert abs(counted - parameters) / parameters < 0.01


def test_lora_adapter_size_follows_rank_and_targets():
    # Llama-3-8B, r=16 on every linear layer of its blocks: PEFT reports 41,943,040 trainable parameters.
    assert speed.lora_parameter_count(LLAMA_3_8B, 16, "all-linear") == 41_943_040
    # q and v only: r x ((4096 + 4096) + (4096 + 1024)) x 32 layers.
    assert speed.lora_parameter_count(LLAMA_3_8B, 8, "q_proj,v_proj") == 8 * (8192 + 5120) * 32


def test_parameter_count_is_exact_from_safetensors_headers(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    folder = model_folder(tmp_path, LLAMA_3_8B)  # config.json says 8B; the weights here say otherwise
    save_file({"a": np.zeros((3, 5), np.float16), "b": np.zeros(7, np.float16)}, f"{folder}/model-1.safetensors")
    save_file({"c": np.zeros((2, 2, 2), np.float32)}, f"{folder}/model-2.safetensors")
    save_file({"x": np.zeros(1000, np.float32)}, f"{folder}/consolidated.safetensors")  # a copy the index skips
    index = {
        "metadata": {},
        "weight_map": {"a": "model-1.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors"},
    }
    Path(folder, "model.safetensors.index.json").write_text(json.dumps(index))
    assert planning.model_parameters(folder, LLAMA_3_8B) == 15 + 7 + 8
    # A shard missing (a download cut short): config.json's estimate instead.
    os.remove(f"{folder}/model-2.safetensors")
    assert planning.model_parameters(folder, LLAMA_3_8B) > 8e9


def test_model_size_unknown_keeps_the_one_gib_floor(tmp_path):
    p = config(model_name="some-org/not-cached")
    assert planning.model_parameters(p.model_name, None) is None
    assert planning.disk_estimate(p, None, None, "bf16") is None


@pytest.mark.parametrize(("free_gib", "expected"), [(50.0, set()), (1.0, set()), (0.5, {("error", "output_dir")})])
def test_enough_disk_needs_a_gib_free_where_the_model_size_is_unknown(monkeypatch, tmp_path, free_gib, expected):
    # MODEL_DIR's config.json has no sizes and the folder no weights.
    asked = fake_free(monkeypatch, free_gib)
    p, out = disk_facts(tmp_path)
    assert findings(validation.enough_disk, p, CPU_ONLY, out=out) == expected
    assert asked == [out.adapter_dir]  # adapter and checkpoints on one disk: measured once


def test_enough_disk_measures_the_real_disk_here(tmp_path):
    # A folder that does not exist yet is measured at its nearest existing parent.
    p, out = disk_facts(tmp_path)
    assert findings(validation.enough_disk, p, CPU_ONLY, out=out) <= {("error", "output_dir")}


def test_a_full_fine_tune_that_cannot_fit_is_refused_up_front_and_lora_fits(monkeypatch, tmp_path):
    fake_free(monkeypatch, 100.0)
    model = model_folder(tmp_path, LLAMA_3_8B)
    p, out = disk_facts(tmp_path, model_name=model, training_mode="full", save_total_limit=2)
    [line] = messages(validation.enough_disk, p, TWO_AMPERE, out=out)
    # 15 GiB of bf16 weights published, and 3 checkpoints of 90 GiB: the fp32 weights a full fine-tune under ddp
    # updates and AdamW's two fp32 moments.
    assert line.startswith(f"output_dir: {out.adapter_dir} has 100.00 GiB free but the run needs about ")
    assert "save_total_limit=2" in line
    assert line.endswith("Free disk space there, lower save_total_limit, or pick another output_dir.")
    needed = float(line.split("needs about ")[1].split(" GiB")[0])
    assert 280 < needed < 320
    # A LoRA adapter of the same model: a small fraction of that.
    p, out = disk_facts(tmp_path, model_name=model, training_mode="lora", save_total_limit=2)
    assert messages(validation.enough_disk, p, TWO_AMPERE, out=out) == []
    lora = planning.disk_estimate(p, LLAMA_3_8B, 8_030_261_248, "bf16")
    full = planning.disk_estimate(p.replace(training_mode="full"), LLAMA_3_8B, 8_030_261_248, "bf16")
    assert lora.peak < full.peak / 50


def test_fuse_model_adds_the_merged_model(tmp_path):
    p = config(model_name=model_folder(tmp_path, QWEN2_5_0_5B), fuse_model=True)
    merged = planning.disk_estimate(p, QWEN2_5_0_5B, 494_032_768, "bf16")
    assert merged.merged == 494_032_768 * 2  # a 16-bit copy of the base
    assert planning.disk_estimate(p, QWEN2_5_0_5B, 494_032_768, "fp32").merged == 494_032_768 * 4  # the CPU's fp32
    assert planning.disk_estimate(p.replace(fuse_model=False), QWEN2_5_0_5B, 494_032_768, "bf16").merged == 0
    # A QLoRA adapter is merged into a bf16 copy of the base, whatever precision trained it.
    qlora = p.replace(training_mode="qlora")
    assert planning.disk_estimate(qlora, QWEN2_5_0_5B, 494_032_768, "fp32").merged == 494_032_768 * 2


def test_each_disk_is_checked_for_what_goes_there(monkeypatch, tmp_path):
    # The checkpoints on a disk of their own (faked: one filesystem per top folder here).
    model = model_folder(tmp_path, LLAMA_3_8B)
    p = config(model_name=model, training_mode="full", output_dir=str(tmp_path / "outputs"))
    out = out_facts(p, str(tmp_path / "adapters" / "a"), str(tmp_path / "big" / "checkpoints"))
    monkeypatch.setattr(validation, "filesystem", lambda path: path.split(os.sep)[len(str(tmp_path).split(os.sep))])
    asked = fake_free(monkeypatch, {str(tmp_path / "adapters"): 20.0, str(tmp_path / "big"): 50.0, "": 1000.0})
    [line] = messages(validation.enough_disk, p, TWO_AMPERE, out=out)
    assert line.startswith(f"output_dir: {out.checkpoint_dir} has 50.00 GiB free")  # the weights fit in 20 GiB
    assert asked == [out.adapter_dir, out.checkpoint_dir]  # the staging folder is beside the checkpoints


def test_a_resumed_run_counts_the_checkpoints_already_on_disk(monkeypatch, tmp_path):
    model = model_folder(tmp_path, QWEN2_5_0_5B)
    p, out = disk_facts(tmp_path, model_name=model, training_mode="full", save_total_limit=2)
    one = planning.disk_estimate(p, QWEN2_5_0_5B, planning.model_parameters(model, QWEN2_5_0_5B), "bf16").checkpoint
    for step in (10, 20):
        Path(out.checkpoint_dir, f"checkpoint-{step}").mkdir(parents=True)
        Path(out.checkpoint_dir, f"checkpoint-{step}", "trainer_state.json").write_text("{}")
    resumed = out_facts(p, out.adapter_dir, out.checkpoint_dir)
    assert resumed.resume_from.endswith("checkpoint-20")
    # Room for the outputs and one more checkpoint: the resumed run fits, a fresh one would not.
    fake_free(monkeypatch, (2 * one) / 2**30 + 1.5)
    assert findings(validation.enough_disk, p, TWO_AMPERE, out=resumed) == set()
    assert findings(validation.enough_disk, p, TWO_AMPERE, out=out) == {("error", "output_dir")}


def test_the_plan_shows_the_disk_estimate(tmp_path):
    plan = planning.build(config(model_name=model_folder(tmp_path, QWEN2_5_0_5B)), TWO_AMPERE)
    assert 0 < plan.disk_gib < 2
    assert any(why.startswith("disk: about ") for why in plan.reasons)
    assert planning.build(config(), CPU_ONLY).disk_gib is None  # MODEL_DIR's size is unknown


# --- the model: config.json is read, weights never ------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 512}')
    return str(folder)


def test_model_folder_that_exists_is_reachable(model_dir):
    assert findings(validation.model_is_reachable, config(model_name=model_dir)) == set()


def test_model_folder_that_does_not_exist_is_an_error(tmp_path):
    p = config(model_name=str(tmp_path / "missing"))
    assert findings(validation.model_is_reachable, p) == {("error", "model_name")}


@pytest.mark.parametrize(
    ("variable", "value"),
    [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"), ("HF_HUB_OFFLINE", "ON"), ("TRANSFORMERS_OFFLINE", "yes")],
)
def test_hub_model_missing_from_the_cache_is_an_error_offline(monkeypatch, tmp_path, variable, value):
    """Offline as huggingface_hub reads it: HF_HUB_OFFLINE=true (or TRANSFORMERS_OFFLINE) used to count as online
    here, and this error went unsaid."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    sources.model_config.cache_clear()
    assert findings(validation.model_is_reachable, config(model_name="someone/not-cached-model")) == {
        ("error", "model_name")
    }
    sources.model_config.cache_clear()


def test_an_adapter_folder_is_not_a_model(model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}')
    assert findings(validation.model_is_not_an_adapter, config(model_name=model_dir)) == set()
    [line] = messages(validation.model_is_not_an_adapter, config(model_name=str(adapter)))
    assert "is a LoRA adapter" in line and "Qwen/Qwen2.5-0.5B" in line


@pytest.mark.parametrize(("length", "expected"), [(512, set()), (513, {("error", "maximum_sequence_length")})])
def test_sequence_length_must_fit_the_model_context(model_dir, length, expected):
    sources.model_config.cache_clear()
    p = config(model_name=model_dir, maximum_sequence_length=length)
    assert findings(validation.sequence_fits_model, p) == expected
    if expected:
        assert "Use at most 512" in messages(validation.sequence_fits_model, p)[0]


def test_a_run_that_cannot_fit_even_with_checkpointing_is_flagged_before_it_runs_out_of_memory():
    """Full fine-tuning of Llama-3-8B on one 40 GiB GPU needs about 137 GiB with checkpointing (fp32 weights,
    gradients and moments): a warning, naming what to change, instead of an out-of-memory error at the first step.
    A LoRA of the same model at batch 1 fits; so does anything on the CPU, which this rule leaves alone."""
    model = sources.ModelFacts(local=True, is_folder=True, config=LLAMA_3_8B, adapter_config=None)
    one_gpu = Machine(gpus=gpus(A100), visible=None, cpu_count=16)
    full = config(training_mode="full", batch_size=1, maximum_sequence_length=2048)
    [line] = messages(validation.memory_fits_the_gpus, full, one_gpu, model=model)
    assert line.startswith("batch_size: about 13") and "40.0 GiB free" in line
    assert line.endswith("Lower batch_size or maximum_sequence_length, or use training_mode=lora or qlora.")
    two = messages(validation.memory_fits_the_gpus, full, TWO_AMPERE, model=model)[0]
    assert two.endswith("or use training_mode=lora or qlora, fsdp or deepspeed_zero3 across the GPUs.")
    lora = config(batch_size=1, maximum_sequence_length=2048)
    assert messages(validation.memory_fits_the_gpus, lora, one_gpu, model=model) == []
    assert messages(validation.memory_fits_the_gpus, full, CPU_ONLY, model=model) == []
    # Free memory counts: the same LoRA on a GPU another process holds 30 GiB of does not fit.
    shared = Machine(gpus=[Gpu(0, "fake-gpu-0", 40960, A100, free_mib=10240)], visible=None, cpu_count=16)
    assert findings(validation.memory_fits_the_gpus, lora, shared, model=model) == {("warning", "batch_size")}


# --- outputs ---------------------------------------------------------------------------------------------


def test_a_finished_adapter_is_kept_unless_overwrite_output(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "training_summary.json").write_text("{}")
    ckpt = str(tmp_path / "ckpt")
    p = config()
    assert findings(validation.finished_adapter_kept, p, out=out_facts(p, str(adapter), ckpt)) == {
        ("error", "overwrite_output")
    }
    p = config(overwrite_output=True)
    assert not findings(validation.finished_adapter_kept, p, out=out_facts(p, str(adapter), ckpt))
    p = config()
    assert not findings(validation.finished_adapter_kept, p, out=out_facts(p, str(tmp_path / "new"), ckpt))


def test_output_folders_must_be_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    p = config()
    try:
        found = findings(validation.outputs_writable, p, out=out_facts(p, str(locked / "a"), str(locked / "c")))
        # root can write anywhere; the rule is only observable as an ordinary user.
        import os

        if os.geteuid() != 0:
            assert found == {("error", "output_dir")}
        assert not findings(validation.outputs_writable, p, out=out_facts(p, str(tmp_path / "a"), str(tmp_path / "c")))
    finally:
        locked.chmod(0o700)


def test_output_writability_is_judged_at_the_nearest_existing_folder(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: asked.append(path) or False)
    p = config()
    found = findings(validation.outputs_writable, p, out=out_facts(p, str(tmp_path / "x" / "y"), str(tmp_path / "z")))
    assert found == {("error", "output_dir")}
    assert asked[0] == str(tmp_path)
    p = config(adaptor_output_dir="/w/adaptors/a")
    assert findings(validation.outputs_writable, p, out=out_facts(p, "/w/adaptors/a", "/w/c")) == {
        ("error", "adaptor_output_dir")
    }


def test_a_lock_held_by_another_process_is_found_without_taking_it(tmp_path):
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    lock = tmp_path / "runs" / "lock"  # the run's own folder, beside the checkpoints
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; h = open(sys.argv[1], 'a+'); fcntl.flock(h, fcntl.LOCK_EX); h.write('pid 4242'); "
            "h.flush(); print('locked', flush=True); sys.stdin.read()",
            str(lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = config()
        [line] = messages(validation.no_other_run_writes_here, p, out=out_facts(p, str(tmp_path / "a"), str(ckpt)))
        assert line.startswith("adaptor_name: another run (pid 4242) is writing")
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # Released: nothing to report, and checking took nothing (the lock can be taken at once).
    assert not findings(validation.no_other_run_writes_here, p, out=out_facts(p, str(tmp_path / "a"), str(ckpt)))
    with outputs.RunLock(str(lock)):
        pass


def saved_checkpoint(folder, p, world: int = 1, data_key: str | None = "data-1"):
    """A complete checkpoint-2 with the run_params.json of a run with parameters p inside, as the first rank
    writes it."""
    step = folder / "checkpoint-2"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (step / "run_params.json").write_text(json.dumps(outputs.identity(p, world, data_key)))
    return str(step)


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ({}, set()),
        # Soft: the run continues from the checkpoint, with a warning naming what changed.
        ({"max_steps": 40}, {("warning", "max_steps")}),
        ({"learning_rate": 1e-4, "save_steps": 5}, {("warning", "learning_rate, save_steps")}),
        # Hard: the checkpoint cannot serve this run.
        ({"lora_r": 8}, {("error", "lora_r")}),
        ({"model_name": "/other/model"}, {("error", "model_name")}),
        ({"training_mode": "full", "lora_target_modules": "q_proj"}, {("error", "adaptor_name")}),
    ],
)
def test_resuming_refuses_hard_changes_and_warns_about_soft_ones(tmp_path, changed, expected):
    ckpt = tmp_path / "ckpt"
    saved_checkpoint(ckpt, config(max_steps=20))
    p = config(**{"max_steps": 20, **changed})
    out = out_facts(p, str(tmp_path / "a"), str(ckpt))
    assert out.resume_from == str(ckpt / "checkpoint-2")
    assert findings(validation.resume_keeps_what_the_checkpoint_needs, p, out=out) == expected


def test_resuming_on_another_world_size_is_refused_and_overwrite_starts_afresh(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved_checkpoint(ckpt, config(), world=1)
    p = config(num_processes="2")
    out = outputs.inspect(where(str(tmp_path / "a"), str(ckpt)), outputs.identity(p, 2, None), overwrite=False)
    # Two ranks need two RNG states: this checkpoint is not complete for them, so nothing is resumed.
    assert out.resume_from is None
    (ckpt / "checkpoint-2" / "rng_state_0.pth").write_text("")
    (ckpt / "checkpoint-2" / "rng_state_1.pth").write_text("")
    out = outputs.inspect(where(str(tmp_path / "a"), str(ckpt)), outputs.identity(p, 2, None), overwrite=False)
    [line] = messages(validation.resume_keeps_what_the_checkpoint_needs, p, out=out)
    assert "num_processes (world size)" in line
    out = outputs.inspect(where(str(tmp_path / "a"), str(ckpt)), outputs.identity(p, 2, None), overwrite=True)
    assert out.resume_from is None and not messages(validation.resume_keeps_what_the_checkpoint_needs, p, out=out)
    assert outputs.prepare_checkpoints(out) is None
    assert not (ckpt / "checkpoint-2").exists() and ckpt.is_dir()


def test_resuming_on_other_data_is_a_data_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved_checkpoint(ckpt, config(), data_key="data-1")
    p = config()
    out = out_facts(p, str(tmp_path / "a"), str(ckpt))
    facts = rowformats.DataFacts(format="prompt_completion", columns=("prompt", "completion"), key="data-1")
    assert not findings(validation.resume_on_the_same_data, p, out=out, data=facts)
    facts = rowformats.DataFacts(format="prompt_completion", columns=("prompt", "completion"), key="data-2")
    assert findings(validation.resume_on_the_same_data, p, out=out, data=facts) == {("error", "dataset_name")}


def test_a_recorded_identity_of_the_first_version_is_still_understood(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved_checkpoint(ckpt, config())
    flat = {**config().resume_identity().asked(), "world_size": 1, "dataset": "d"}
    flat["lora_r"] = 4
    # Written beside the checkpoints by the versions that wrote this format.
    (ckpt / "checkpoint-2" / "run_params.json").unlink()
    (ckpt / "run_params.json").write_text(json.dumps(flat))
    p = config()
    assert findings(validation.resume_keeps_what_the_checkpoint_needs, p, out=out_facts(p, "/x/a", str(ckpt))) == {
        ("error", "lora_r")
    }


# --- the data, before tokenizing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fmt", "expected"),
    [
        ({"assistant_only_loss": True}, "chat", set()),
        ({"assistant_only_loss": True}, "prompt_completion", {("error", "assistant_only_loss")}),
        ({"completion_only_loss": "true"}, "text", {("error", "completion_only_loss")}),
        ({"completion_only_loss": "auto"}, "text", set()),
        ({"completion_only_loss": "true"}, "template", set()),
    ],
)
def test_loss_modes_need_data_that_can_be_split(overrides, fmt, expected):
    facts = rowformats.DataFacts(format=fmt, columns=(), key="k")
    p = config(**overrides)
    found = findings(validation.assistant_only_needs_chat, p, data=facts)
    found |= findings(validation.completion_only_needs_a_split, p, data=facts)
    assert found == expected


# --- the prepared rows ------------------------------------------------------------------------------------

STATS = stats_of(rows_used=100)


@pytest.mark.parametrize(
    ("overrides", "plan_processes", "expected"),
    [
        ({"batch_size": 4, "gradient_accumulation_steps": 4}, 2, set()),
        ({"batch_size": 16, "gradient_accumulation_steps": 4}, 2, {("warning", "gradient_accumulation_steps")}),
    ],
)
def test_effective_batch_larger_than_the_data_is_a_warning(overrides, plan_processes, expected):
    found = validation.effective_batch_fits_dataset(config(**overrides), cpu_plan(plan_processes), STATS)
    assert {(s, p.parameter) for s, p in found} == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"save_steps": 5, "num_train_epochs": 1}, set()),
        # 100 rows / (4 x 1) = 25 batches, / 4 accumulation = 7 steps per epoch.
        ({"save_steps": 8, "num_train_epochs": 1}, {("warning", "save_steps")}),
        ({"save_steps": 8, "num_train_epochs": 2}, set()),
        ({"save_steps": 800, "max_steps": 1000}, set()),
    ],
)
def test_no_checkpoint_before_the_end_is_a_warning(overrides, expected):
    p = config(batch_size=4, gradient_accumulation_steps=4, packing="false", **overrides)
    plan = planning.build(p, CPU_ONLY)
    assert {(s, q.parameter) for s, q in validation.checkpoint_before_the_end(p, plan, STATS)} == expected


def test_planned_steps_counts_epochs_processes_and_accumulation():
    assert planning.planned_steps(config(batch_size=4, gradient_accumulation_steps=2), 2, 100) == 7
    assert planning.planned_steps(config(max_steps=3), 2, 100) == 3


def prepared_stats(**overrides):
    return stats_of(**overrides)


def test_statistics_findings_are_returned_together():
    p = config(batch_size=512, gradient_accumulation_steps=1, packing="false")
    stats = prepared_stats(rows_used=100)
    found = validation.check(("statistics",), p=p, plan=planning.build(p, CPU_ONLY), stats=stats)
    assert not found.errors
    assert [w.parameter for w in found.warnings] == ["gradient_accumulation_steps", "save_steps"]


@pytest.mark.parametrize(
    ("overrides", "stats", "expected"),
    [
        ({}, prepared_stats(), set()),
        ({}, prepared_stats(rows_used=0, eval_rows=0, dropped=100, no_answer=100), {("error", "dataset_name")}),
        ({"max_dropped_fraction": 0.2}, prepared_stats(dropped=30), {("error", "maximum_sequence_length")}),
        ({"max_dropped_fraction": 0.2}, prepared_stats(dropped=30, no_answer=15), set()),
        ({"eval_split": 0.5}, prepared_stats(rows_used=1, eval_rows=0), {("error", "eval_split")}),
        ({"eval_split": 0.1}, prepared_stats(eval_rows=0, own_eval_split="validation"), {("error", "eval_split")}),
        ({"eval_split": 0}, prepared_stats(eval_rows=0), set()),
    ],
)
def test_prepared_rows_that_cannot_train_or_evaluate_are_errors(overrides, stats, expected):
    p = config(**overrides)
    found = set()
    for rule in (
        validation.rows_left_to_train,
        validation.truncation_within_max_dropped_fraction,
        validation.evaluation_has_rows,
    ):
        found |= findings(rule, p, stats=stats)
    assert found == expected


def test_every_rule_has_table_cases():
    covered = {rule for rule, *_ in CONFIG_CASES} | {rule for rule, *_ in MACHINE_CASES}
    covered |= {validation.wandb_key, validation.strategy_packages_installed, validation.enough_disk}
    covered |= {validation.cuda_visible_devices_name_gpus}  # in test_machine.py, on fake NVML and nvidia-smi
    covered |= {validation.model_is_reachable, validation.model_is_not_an_adapter, validation.sequence_fits_model}
    covered |= {validation.memory_fits_the_gpus, validation.qlora_needs_bitsandbytes}
    covered |= {validation.strategy_needs_several_processes, validation.packing_without_flash_attention}
    covered |= {validation.finished_adapter_kept, validation.outputs_writable, validation.no_other_run_writes_here}
    covered |= {validation.resume_keeps_what_the_checkpoint_needs, validation.resume_on_the_same_data}
    covered |= {validation.assistant_only_needs_chat, validation.completion_only_needs_a_split}
    covered |= {validation.rows_left_to_train, validation.truncation_within_max_dropped_fraction}
    covered |= {validation.evaluation_has_rows}
    covered |= {validation.effective_batch_fits_dataset, validation.checkpoint_before_the_end}
    covered |= {validation.chat_template_keeps_answers, validation.dataset_path_exists}
    # In test_layers.py, on models built from real configs on the meta device:
    covered |= {validation.model_builds_as_a_causal_lm, validation.lora_targets_are_layers}
    covered |= {validation.gradient_checkpointing_supported}
    # In test_data.py, on real prepared datasets:
    covered |= {validation.evaluation_named, validation.rows_with_nothing_to_train}
    assert {rule for rules in validation.RULES.values() for rule in rules} <= covered


def test_info_md_rules_table_is_the_rule_list():
    info = (Path(__file__).resolve().parent.parent / "info.md").read_text()
    assert validation.table() in info, (
        "info.md's rules table differs from the rule list: run `.venv/bin/python tools/rules_table.py`"
    )


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        ({"rows": 10}, []),
        ({"rows": 10, "reasoning_dropped": 4}, ["in 4 of 10 rows, so that reasoning is not trained"]),
        ({"rows": 10, "open_turns": 10}, ["without a special token in 10 of 10 rows, so the model never learns"]),
    ],
)
def test_chat_templates_that_drop_reasoning_or_never_stop_are_flagged(stats, expected):
    found = [w.line() for _, w in validation.chat_template_keeps_answers(config(), stats_of(**stats))]
    assert len(found) == len(expected)
    for line, part in zip(found, expected, strict=True):
        assert line.startswith("formatting_chat_template: the chat template") and part in line


def test_fsdp_or_deepspeed_with_one_process_is_a_warning():
    one = config(distributed_strategy="fsdp", num_processes="1")
    assert findings(validation.strategy_needs_several_processes, one, TWO_AMPERE) == {
        ("warning", "distributed_strategy")
    }
    assert not findings(validation.strategy_needs_several_processes, config(distributed_strategy="fsdp"), TWO_AMPERE)


def test_rule_messages_name_the_parameter_what_is_wrong_and_the_fix():
    [line] = messages(validation.gpus_exist, config(gpu_ids="0"), FOUR_AMPERE_TWO_VISIBLE)
    assert line.startswith("gpu_ids: GPU 0 does not exist within CUDA_VISIBLE_DEVICES (visible: [2, 3]).")
    assert "Pick ids from the visible GPUs, or auto." in line
    [line] = messages(validation.processes_fit_gpus, config(num_processes="3"), TWO_AMPERE)
    assert line == (
        "num_processes: 3 processes but only 2 GPU(s) selected. Use num_processes=2 or auto (one process per GPU)."
    )


# --- the plan ------------------------------------------------------------------------------------------


def test_plan_on_a_cpu_only_machine_is_one_fp32_process():
    plan = planning.build(config(), CPU_ONLY)
    assert without_speed(plan) == {"device": "cpu", "gpu_ids": [], "num_processes": 1, "precision": "fp32"}


def test_plan_on_cpu_runs_two_processes_when_asked():
    plan = planning.build(config(num_processes="2"), CPU_ONLY)
    assert without_speed(plan) == {"device": "cpu", "gpu_ids": [], "num_processes": 2, "precision": "fp32"}


def test_plan_with_train_device_cpu_ignores_the_gpus():
    plan = planning.build(config(train_device="cpu"), TWO_AMPERE)
    assert without_speed(plan) == {"device": "cpu", "gpu_ids": [], "num_processes": 1, "precision": "fp32"}


def test_plan_on_two_bf16_gpus_is_one_bf16_process_per_gpu():
    plan = planning.build(config(), TWO_AMPERE)
    assert without_speed(plan) == {"device": "cuda", "gpu_ids": [0, 1], "num_processes": 2, "precision": "bf16"}


def test_plan_on_a_pre_ampere_gpu_picks_fp16_under_auto():
    plan = planning.build(config(), ONE_VOLTA)
    assert plan.device == "cuda"
    assert plan.precision == "fp16"


def test_bf16_on_a_pre_ampere_gpu_is_an_error():
    with pytest.raises(InvalidConfig) as caught:
        check(config(precision="bf16"), ONE_VOLTA)
    assert [p.parameter for p in caught.value.errors] == ["precision"]
    assert "Ampere" in caught.value.errors[0].message


def test_gpu_ids_one_gives_one_process_on_gpu_one():
    plan = check(config(gpu_ids="1"), TWO_AMPERE)
    assert without_speed(plan) == {"device": "cuda", "gpu_ids": [1], "num_processes": 1, "precision": "bf16"}


def test_fewer_processes_than_gpus_uses_the_first_gpus():
    plan = planning.build(config(num_processes="1"), TWO_AMPERE)
    assert list(plan.gpu_ids) == [0]
    assert plan.num_processes == 1


def test_auto_gpu_ids_are_the_visible_ones():
    plan = check(config(), FOUR_AMPERE_TWO_VISIBLE)
    assert list(plan.gpu_ids) == [2, 3]
    assert plan.num_processes == 2


def test_gpu_ids_outside_cuda_visible_devices_are_an_error():
    with pytest.raises(InvalidConfig) as caught:
        check(config(gpu_ids="0,1"), FOUR_AMPERE_TWO_VISIBLE)
    [found] = caught.value.errors
    assert found.parameter == "gpu_ids"
    assert "within CUDA_VISIBLE_DEVICES" in found.message


def test_num_processes_above_the_gpu_count_is_an_error():
    with pytest.raises(InvalidConfig) as caught:
        check(config(num_processes="3"), TWO_AMPERE)
    assert [p.parameter for p in caught.value.errors] == ["num_processes"]


def test_hidden_gpus_mean_the_cpu():
    found = checked(config(), ALL_HIDDEN)
    assert planning.build(config(), ALL_HIDDEN).device == "cpu"
    assert [w.parameter for w in found.warnings] == ["train_device"]


def test_rank_env_selects_the_plan_gpus():
    plan = planning.build(config(), FOUR_AMPERE_TWO_VISIBLE)
    assert launch.rank_env(plan)["CUDA_VISIBLE_DEVICES"] == "2,3"
    plan = planning.build(config(gpu_ids="1"), TWO_AMPERE)
    assert launch.rank_env(plan)["CUDA_VISIBLE_DEVICES"] == "1"
    assert launch.rank_env(plan)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_rank_env_hides_every_gpu_on_cpu():
    plan = planning.build(config(train_device="cpu"), TWO_AMPERE)
    assert launch.rank_env(plan)["CUDA_VISIBLE_DEVICES"] == ""


# --- check() ---------------------------------------------------------------------------------------------


def test_check_returns_every_error_at_once():
    p = config(model_name="", max_steps=0, gpu_ids="5", num_processes="3", precision="fp16")
    found = checked(p, TWO_AMPERE)
    assert {e.parameter for e in found.errors} == {"model_name", "max_steps", "gpu_ids", "num_processes"}
    found = checked(p.replace(gpu_ids="auto", num_processes="auto"), CPU_ONLY)
    assert {e.parameter for e in found.errors} == {"model_name", "max_steps", "precision"}
    with pytest.raises(InvalidConfig) as caught:
        found.raise_errors()
    assert len(str(caught.value).splitlines()) == len(caught.value.errors)


def test_check_returns_warnings_in_rule_order_after_the_prior_errors():
    earlier = validation.error("lora_r", "expected a number")[1]
    p = config(learning_rate=0.5, training_mode="full", lora_r=64)
    found = validation.check(
        validation.CHECK_PHASES, prior=[earlier], p=p, machine=CPU_ONLY, model=None, out=None, plan=None
    )
    # lora_r failed its own check: its default stands in, and no rule reports it again.
    assert found.errors == [earlier]
    assert [w.parameter for w in found.warnings] == ["learning_rate", "train_device"]


def test_check_keeps_warnings_alongside_errors():
    with pytest.raises(InvalidConfig) as caught:
        checked(config(learning_rate=0.5, max_steps=0), CPU_ONLY).raise_errors()
    assert [e.parameter for e in caught.value.errors] == ["max_steps"]
    assert {w.parameter for w in caught.value.warnings} == {"learning_rate", "train_device"}


def test_rules_whose_facts_are_unknown_are_skipped():
    # A config can be checked on a laptop: machine rules (fp16 on CPU here) need a machine.
    p = config(precision="fp16", gpu_ids="7")
    found = validation.check(validation.CHECK_PHASES, p=p, machine=None, model=None, out=None, plan=None)
    assert not found.errors


def test_a_rule_naming_no_fact_is_refused_where_it_is_defined():
    # A misspelt argument made a rule that was silently never run: its fact was always "unknown".
    with pytest.raises(TypeError, match="rule gpu_rule takes machnie: no such fact"):

        @validation.rule("machine")
        def gpu_rule(p, machnie):
            yield from ()

    assert all(fn.__name__ != "gpu_rule" for fn in validation.RULES["machine"])
    with pytest.raises(ValueError, match="no phase 'machines'"):
        validation.rule("machines")


def test_check_refuses_a_fact_it_does_not_know_and_a_phase_run_without_its_facts():
    with pytest.raises(TypeError, match="no such fact: machnie"):
        validation.check(validation.CHECK_PHASES, p=config(), machnie=CPU_ONLY, model=None, out=None, plan=None)
    # The machine phase run without the machine: the caller's mistake, named, instead of rules skipped unseen.
    with pytest.raises(TypeError, match=r"phase 'machine': rule .* needs machine, not given"):
        validation.check(("machine",), p=config())


def test_the_plan_records_each_decision_with_its_reason():
    plan = planning.build(config(num_processes="2", packing="auto"), CPU_ONLY)
    reasons = plan.all_reasons()
    assert [r.split(":")[0] for r in reasons[:4]] == ["device", "processes", "precision", "strategy"]
    assert any(r.startswith("packing: ") for r in reasons)
    assert plan.world_size == 2
    with pytest.raises(AttributeError):
        plan.num_processes = 3  # frozen
    later = plan.with_loss_mode(config(), "text")
    assert later.completion_only is False and plan.completion_only is None
    assert later.all_reasons()[-1] != reasons[-1] or "loss:" in " ".join(later.all_reasons())


def test_deepspeed_needs_cuda_gpus():
    found = validation.strategy_packages_installed(config(distributed_strategy="deepspeed_zero2"), CPU_ONLY)
    assert [(s, p.parameter, "CUDA" in p.message) for s, p in found] == [("error", "distributed_strategy", True)]


def test_cpu_oversubscription_is_named_with_the_fix():
    [line] = messages(validation.cpu_processes_fit_cores, config(num_processes="64"), CPU_ONLY)
    assert line == (
        "num_processes: 64 processes on the CPU of a machine with 8 cores share them out and train slower. "
        "Use at most 8."
    )


def test_a_dataset_written_as_a_path_that_does_not_exist_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    """`--check` answered ok for dataset_name /nonexistent/train.jsonl: the data phase found it only after the
    model's layers were checked. Hub ids and the workspace's dataset ids are left to the data phase."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    present = [str(rows), str(tmp_path), "./rows.jsonl", "rows.jsonl", "~/rows.jsonl", "org/dataset", "alpaca"]
    for name in present:
        assert findings(validation.dataset_path_exists, config(dataset_name=name)) == set(), name
    for name in ("/nonexistent/train.jsonl", "./missing", "../missing-rows", "~/no-such/rows.csv", "data/train.jsonl"):
        assert messages(validation.dataset_path_exists, config(dataset_name=name)) == [
            f"dataset_name: {name} does not exist. Give the path of an existing .jsonl/.json/.csv/.parquet file or"
            " a folder of them."
        ], name
