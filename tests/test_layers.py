"""The model's layers, listed without loading its weights (read from its safetensors headers, or built from
config.json on the meta device), and the rules over them: LoRA targets that name no layer, an architecture that is
no causal LM, gradient checkpointing a model cannot do. Real models from real configs: GPT-2 (whose projections are
transformers' Conv1D, not nn.Linear), Llama 3 8B's and Qwen2.5-0.5B's published config.json, and, for the headers,
tiny checkpoints with random weights of every family they are read for, each held to what the meta build says."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from plugin_utils import layers, params, planning, validation
from plugin_utils.machine import Machine

from .conftest import ROOT, base_config, run_main, write_config
from .model_configs import LLAMA_3_8B, QWEN2_5_0_5B, model_folder

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


# --- read from the checkpoint's safetensors headers, without torch ------------------------------------------------

SMALL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "vocab_size": 64,
    "pad_token_id": 0,
}
# The published configs above, shrunk, and a config of every other family the headers are read for.
CHECKPOINTS = {
    "llama-3-8b": {**LLAMA_3_8B, **SMALL},
    "qwen2.5-0.5b": {**QWEN2_5_0_5B, **SMALL},
    "gpt2": {**GPT2, "vocab_size": 64, "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0},
    **{kind: {"model_type": kind, **SMALL} for kind in layers.FAMILIES if kind not in ("llama", "qwen2", "gpt2")},
}
SIZES = {"F32": 4, "BF16": 2, "I8": 1, "U8": 1}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Each config of CHECKPOINTS as a real checkpoint with random weights, as save_pretrained writes it; and the
    Llama 3 one again in shards, with their index."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    for name, config in CHECKPOINTS.items():
        fields = {key: value for key, value in config.items() if key != "model_type"}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
        model.save_pretrained(root / name)
        if name == "llama-3-8b":
            model.save_pretrained(root / "llama-3-8b-sharded", max_shard_size=3_000)
    assert len(list((root / "llama-3-8b-sharded").glob("*.safetensors"))) > 2
    return {path.name: path for path in root.iterdir()}


def shapes_of(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Each tensor's dtype and shape in the folder's model.safetensors, as the safetensors package reads them."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as handle:
        slices = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    return {key: (found.get_dtype(), found.get_shape()) for key, found in slices.items()}


def checkpoint(folder: Path, config: dict, tensors: dict[str, tuple[str, list[int]]]) -> str:
    """A model folder with this config.json and a model.safetensors holding these tensors (zeros), written by hand
    as the format lays it out: the header's length, the header, the data."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))
    return str(folder)


def read(folder: str | Path) -> layers.Layers | None:
    return layers.from_weights(str(folder), json.loads(Path(folder, "config.json").read_text()))


def assert_same_answers(headers: layers.Layers, built: layers.Layers) -> None:
    """Everything validation asks of a model's layers gets the same answer from both."""
    assert headers.error is built.error is None
    assert (headers.output_layer, headers.beside, headers.supports_gradient_checkpointing) == (
        built.output_layer,
        built.beside,
        built.supports_gradient_checkpointing,
    )
    assert sorted(headers.adaptable_names()) == sorted(built.adaptable_names())
    targets = set(built.modules) | {part for name in built.modules for part in name.split(".")}
    for target in targets:
        assert (headers.unknown_target(target) is None) == (built.unknown_target(target) is None), target
        if headers.matching(target):
            assert sorted(headers.matching(target)) == sorted(built.matching(target)), target
    assert headers.modules.keys() <= built.modules.keys()
    for name, kind in headers.modules.items():  # the same layers LoRA adapts, as the same classes
        assert kind == built.modules[name] if kind in layers.ADAPTABLE else built.modules[name] not in layers.ADAPTABLE
    # What the headers leave out holds no weight, so LoRA adapts none of it (an activation, a rotary embedding).
    assert not [
        name for name in built.modules.keys() - headers.modules.keys() if built.modules[name] in layers.ADAPTABLE
    ]


@pytest.mark.parametrize("name", [*CHECKPOINTS, "llama-3-8b-sharded"])
def test_a_checkpoints_headers_give_the_layers_the_meta_build_gives(checkpoints, name):
    found = read(checkpoints[name])
    assert found is not None
    assert_same_answers(found, layers.built(str(checkpoints[name])))


def test_a_safetensors_model_is_described_without_importing_torch(checkpoints, tmp_path):
    model = str(checkpoints["qwen2.5-0.5b"])
    code = (
        "import sys; from plugin_utils import layers; d = layers.describe(sys.argv[1]);"
        "print(*sorted(d.adaptable_names()), d.output_layer, *({'torch', 'transformers'} & set(sys.modules)))"
    )
    env = {**os.environ, "SFT_LAYERS_CACHE": str(tmp_path / "kept")}
    out = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.stdout.split() == [*sorted(layers.built(model).adaptable_names()), "lm_head"], out.stderr
    assert not (tmp_path / "kept").exists(), "reading the headers again costs what reading a kept copy would"


def test_a_checkpoint_without_the_base_models_name_is_read_as_the_loaded_model_names_it(checkpoints, tmp_path):
    """A base model's checkpoint (LlamaModel's, no `model.`) and GPT-2 as published (no `transformer.`, its causal
    masks saved as weights): the load puts the weights under the base model, and drops the masks."""
    llama = checkpoints["llama-3-8b"]
    config = json.loads((llama / "config.json").read_text())
    base = {key.removeprefix("model."): found for key, found in shapes_of(llama).items() if key != "lm_head.weight"}
    assert_same_answers(read(checkpoint(tmp_path / "base", config, base)), layers.built(str(llama)))

    gpt2 = checkpoints["gpt2"]
    published = {key.removeprefix("transformer."): found for key, found in shapes_of(gpt2).items()}
    for block in range(CHECKPOINTS["gpt2"]["n_layer"]):
        published |= {f"h.{block}.attn.bias": ("U8", [1, 1, 32, 32]), f"h.{block}.attn.masked_bias": ("F32", [])}
    config = json.loads((gpt2 / "config.json").read_text())
    assert_same_answers(read(checkpoint(tmp_path / "gpt2", config, published)), layers.built(str(gpt2)))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_bitsandbytes_checkpoints_quantized_layers_are_the_linears_the_meta_build_sees(checkpoints, tmp_path, bits):
    tiny = checkpoints["qwen2.5-0.5b"]
    config = json.loads((tiny / "config.json").read_text())
    quantized = {}
    for key, (dtype, shape) in shapes_of(tiny).items():
        module = key.removesuffix(".weight")
        if not (key.endswith("proj.weight") and ".layers." in key):
            quantized[key] = (dtype, shape)
        elif bits == 4:
            quantized |= {
                key: ("U8", [shape[0] * shape[1] // 2, 1]),
                f"{key}.absmax": ("F32", [shape[0] * shape[1] // 64]),
                f"{key}.quant_map": ("F32", [16]),
                f"{key}.nested_absmax": ("F32", [1]),
                f"{key}.nested_quant_map": ("F32", [256]),
                f"{key}.quant_state.bitsandbytes__nf4": ("U8", [98]),
            }
        else:
            quantized |= {
                key: ("I8", shape),
                f"{module}.SCB": ("F32", [shape[0]]),
                f"{module}.weight_format": ("U8", []),
            }
    method = {"quant_method": "bitsandbytes", f"load_in_{bits}bit": True}
    folder = checkpoint(tmp_path / "quantized", {**config, "quantization_config": method}, quantized)
    assert read(folder) == read(tiny)
    assert_same_answers(read(folder), layers.built(folder))


def test_blocks_read_from_headers_are_refused_by_their_place_not_their_class(checkpoints):
    found = read(checkpoints["qwen2.5-0.5b"])
    assert found.unknown_target("mlp") == "'mlp' is a block, not a layer LoRA can adapt"
    assert found.unknown_target("rotary_emb") == "'rotary_emb' names no layer of this model"


@pytest.mark.parametrize(
    "case",
    [
        "no weights",
        "bin",
        "another model type",
        "remote code",
        "another quantization",
        "no module's weight",
        "a weight outside the model",
        "torn",
        "missing shard",
    ],
)
def test_what_the_headers_cannot_tell_exactly_is_left_to_the_meta_build(checkpoints, tmp_path, case):
    tiny = checkpoints["qwen2.5-0.5b"]
    config = json.loads((tiny / "config.json").read_text())
    tensors = shapes_of(tiny)
    folder = tmp_path / "model"
    if case == "no weights":
        folder = Path(model_folder(tmp_path, config))
    elif case == "bin":
        folder = Path(model_folder(tmp_path, config))
        (folder / "pytorch_model.bin").write_bytes(b"")
    elif case == "another model type":  # Gemma 3 with its vision tower: transformers renames its weights on load
        gemma3 = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}
        checkpoint(folder, gemma3, {f"language_model.{key}": found for key, found in tensors.items()})
    elif case == "remote code":
        checkpoint(folder, {**config, "auto_map": {"AutoModelForCausalLM": "modeling.Model"}}, tensors)
    elif case == "another quantization":
        checkpoint(folder, {**config, "quantization_config": {"quant_method": "fp8"}}, tensors)
    elif case == "no module's weight":  # an older checkpoint's saved rotary frequencies
        checkpoint(folder, config, {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": ("F32", [4])})
    elif case == "a weight outside the model":  # a vision tower the model type does not build
        checkpoint(folder, config, {**tensors, "vision_tower.patch_embedding.weight": ("F32", [16, 3, 2, 2])})
    elif case == "torn":
        checkpoint(folder, config, tensors)
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    else:  # an index naming a shard that is not there (a download cut short)
        shutil.copytree(checkpoints["llama-3-8b-sharded"], folder)
        next(folder.glob("*-of-*.safetensors")).unlink()
    assert read(folder) is None
    if case == "no weights":
        assert layers.describe(str(folder)) == layers.built(str(folder))


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
def test_a_misspelt_target_is_refused_by_the_check_where_the_weights_list_the_layers_else_before_training(
    tiny_model, tmp_path
):
    """The tiny model's weights are safetensors: their headers list the layers, so `--check` itself (torch-free)
    refuses the typo, and no rank starts. A model whose weights are a pickle is built on the meta device during
    the preparation instead: `--check` cannot know, and the run refuses it there, ending the ranks that started
    meanwhile."""
    import shutil

    import torch
    from safetensors.torch import load_file

    expected = "lora_target_modules: 'v_prj' names no layer of this model (did you mean 'v_proj'?)."
    config = base_config(tiny_model, tmp_path, lora_target_modules="q_proj,v_prj")
    path = write_config(tmp_path, config)
    for flags in (["--check"], ["--dry-run"], []):
        proc = run_main(["--config", path, *flags])
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr
        assert "launch:" not in proc.stderr

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    path = write_config(tmp_path, {**config, "model_name": str(pickled)})
    env = {"SFT_LAYERS_CACHE": str(tmp_path / "layers")}  # nothing kept from an earlier build of this config
    assert run_main(["--config", path, "--check"], env=env).returncode == 0  # torch-free: it cannot know
    proc = run_main(["--config", path], env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert "launch:" in proc.stderr  # the ranks had started; the refusal ended them
    assert not (tmp_path / "outputs").exists(), "nothing is written"
