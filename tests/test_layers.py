"""The model's layers, listed without its weights (a model built from config.json on the meta device), and the
rules over them: LoRA targets that name no layer, an architecture that is no causal LM, gradient checkpointing
a model cannot do. Real models from real configs: the tiny Llama the suite trains, GPT-2 (whose projections are
transformers' Conv1D, not nn.Linear) and Qwen2.5-0.5B's published config.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from plugin_utils import layers, params, planning, validation
from plugin_utils.machine import Machine

from .conftest import ROOT, base_config, run_main, write_config
from .model_configs import QWEN2_5_0_5B, model_folder

GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2}
CPU = Machine(gpus=[], cpu_count=2)


def run_params(model: str, **overrides) -> params.Params:
    raw = {"model_name": model, "dataset_name": "/data/rows.jsonl", "adaptor_name": "a", "train_device": "cpu"}
    return params.defaults().replace(**{**raw, **overrides})


def layer_errors(p: params.Params) -> list[str]:
    plan = planning.build(p, CPU)
    found = validation.check(("layers",), p=p, plan=plan, layers=layers.describe(p.model_name))
    return [problem.line() for problem in found.errors]


def test_the_layers_of_a_real_architecture_are_listed_without_weights(tmp_path):
    described = layers.describe(model_folder(tmp_path, QWEN2_5_0_5B))
    assert described.error is None
    assert described.adaptable_names() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert described.output_layer == "lm_head"
    assert len(described.matching("q_proj")) == 24  # one per block
    assert described.matching("model.layers.3.mlp.up_proj") == ["model.layers.3.mlp.up_proj"]
    assert described.supports_gradient_checkpointing


def test_gpt2s_conv1d_projections_are_layers_lora_adapts(tmp_path):
    described = layers.describe(model_folder(tmp_path, GPT2, "gpt2"))
    assert described.modules["transformer.h.0.attn.c_attn"] == "Conv1D"
    assert described.unknown_target("c_attn") is None
    assert described.unknown_target("q_proj") == "'q_proj' names no layer of this model (did you mean 'c_proj'?)"


def test_a_subclass_of_a_layer_lora_adapts_is_that_layer(tmp_path):
    """PEFT picks an adapter by isinstance: Falcon's projections (FalconLinear) are Linears to it."""
    falcon = {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 32, "vocab_size": 64}
    described = layers.describe(model_folder(tmp_path, {**falcon, "num_attention_heads": 2, "num_hidden_layers": 1}))
    assert described.modules["transformer.h.0.self_attention.query_key_value"] == "Linear"
    assert described.adaptable_names() == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all-linear", None),
        ("q_proj,v_proj", None),
        (" q_proj , v_proj ", None),
        ("self_attn.q_proj", None),  # PEFT matches the end of a module's name after a dot
        (
            "q_proj,v_prj",  # one typo in a comma list: refused whole, not half-applied
            "lora_target_modules: 'v_prj' names no layer of this model (did you mean 'v_proj'?). Use the names of "
            "this model's layers (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or all-linear.",
        ),
        ("query_key_value", "lora_target_modules: 'query_key_value' names no layer of this model. Use the names"),
        ("mlp", "lora_target_modules: 'mlp' is a block (Qwen2MLP), not a layer LoRA can adapt. Use the names"),
    ],
)
def test_lora_targets_are_checked_against_the_models_layers(tmp_path, targets, expected):
    errors = layer_errors(run_params(model_folder(tmp_path, QWEN2_5_0_5B), lora_target_modules=targets))
    if expected is None:
        assert errors == []
    else:
        [line] = errors
        assert line.startswith(expected), line


def test_full_fine_tuning_has_no_lora_targets_to_check(tmp_path):
    p = run_params(model_folder(tmp_path, QWEN2_5_0_5B), training_mode="full", lora_target_modules="nothing_here")
    assert layer_errors(p) == []


def test_an_architecture_that_is_no_causal_lm_is_refused_naming_model_name(tmp_path):
    t5 = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 32, "num_layers": 1}
    [line] = layer_errors(run_params(model_folder(tmp_path, t5, "t5")))
    assert line.startswith("model_name: transformers cannot build this model as a causal language model (")
    assert line.endswith("Pick a causal language model (a decoder such as Llama, Qwen or Mistral).")


def test_a_model_described_once_is_read_back_the_same_without_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_LAYERS_CACHE", str(tmp_path / "kept"))
    model = model_folder(tmp_path, QWEN2_5_0_5B)
    built = layers.describe(model)
    [kept] = (tmp_path / "kept").glob("*.json")
    assert layers.describe(model) == built
    # Read back in a fresh process: neither torch nor transformers is imported to get it.
    code = (
        "import sys; from plugin_utils import layers; d = layers.describe(sys.argv[1]);"
        "print(len(d.modules), d.output_layer, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, cwd=str(ROOT), check=True)
    assert out.stdout.split() == [str(len(built.modules)), "lm_head", "False", "False"]
    # Another config is another description; a torn file is built again and replaced whole.
    config = json.loads((Path(model) / "config.json").read_text())
    (Path(model) / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    assert len(layers.describe(model).matching("q_proj")) == 2
    assert len(list((tmp_path / "kept").glob("*.json"))) == 2
    (Path(model) / "config.json").write_text(json.dumps(config))
    kept.write_text('{"modules": {"lm_he')
    assert layers.describe(model) == built
    assert json.loads(kept.read_text())["output_layer"] == "lm_head"


def test_a_model_that_cannot_be_built_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_LAYERS_CACHE", str(tmp_path / "kept"))
    t5 = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 32, "num_layers": 1}
    assert layers.describe(model_folder(tmp_path, t5, "t5")).error
    assert not list((tmp_path / "kept").glob("*.json")), "the next run tries again (transformers may have changed)"


def test_a_hub_model_not_in_the_cache_is_left_to_the_real_load():
    assert layers.describe("some-org/not-cached-anywhere") is None


def test_gradient_checkpointing_on_a_model_without_it_is_refused():
    without = layers.Layers(modules={"lm_head": "Linear"}, supports_gradient_checkpointing=False)
    p = run_params("/models/m", gradient_checkpointing="true")
    plan = planning.build(p, CPU)
    [line] = [x.line() for x in validation.check(("layers",), p=p, plan=plan, layers=without).errors]
    assert line == (
        "gradient_checkpointing: this model does not support gradient checkpointing. Set gradient_checkpointing "
        "to false."
    )
    off = run_params("/models/m", gradient_checkpointing="false")
    assert not validation.check(("layers",), p=off, plan=planning.build(off, CPU), layers=without).errors


@pytest.mark.slow
def test_a_misspelt_target_fails_the_dry_run_and_the_run_before_launch_in_one_line(tiny_model, tmp_path):
    config = base_config(tiny_model, tmp_path, lora_target_modules="q_proj,v_prj")
    path = write_config(tmp_path, config)
    assert run_main(["--config", path, "--check"]).returncode == 0  # --check stays torch-free: it cannot know
    expected = "lora_target_modules: 'v_prj' names no layer of this model (did you mean 'v_proj'?)."
    for flags in (["--dry-run"], []):
        proc = run_main(["--config", path, *flags])
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr
        assert "launch:" not in proc.stderr
    assert not (tmp_path / "outputs").exists(), "nothing is written"
