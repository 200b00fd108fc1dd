"""Every TRL error and silent trap in shared/reference/trl-notes.md is impossible by construction or
caught by the plugin's own check. One test each, named for the trap."""

from __future__ import annotations

import dataclasses
import json

import pytest

from plugin_utils import launch, params, planning, sources, validation
from plugin_utils.errors import InvalidConfig
from plugin_utils.machine import Gpu, Machine
from plugin_utils.runfolder import Reporting
from plugin_utils.speed import Speed

from .conftest import SAMPLE, TEMPLATE, plan_of, prepare_data, spec_of


def spec(tmp_path, plan=None, packing=False, **overrides):
    # What main.py hands the worker: the run spec of these parameters and a CPU plan (packing is the plan's).
    return spec_of(str(tmp_path / "ckpt"), overrides, plan or plan_of(speed=Speed(packing=packing)))


def prepared_rows(tiny_model, **overrides):
    p = params.defaults()
    p = p.replace(model_name=tiny_model, dataset_name=str(SAMPLE), adaptor_name="a", **overrides)
    return p, prepare_data(p)


def test_seed_error_cannot_happen_no_formatting_func_reaches_trl(tiny_model):
    # TRL raises when a formatting function meets completion-only loss; the plugin applies the template
    # itself and hands TRL input_ids + labels, with the prompt masked.
    _, prepared = prepared_rows(tiny_model, formatting_template=TEMPLATE)
    from datasets import load_from_disk

    train = load_from_disk(prepared.path)["train"]
    assert train.column_names == ["input_ids", "labels"]
    assert any(label == -100 for label in train[0]["labels"])


def test_trap_formatted_text_ignored_on_prompt_completion_data_cannot_happen(tiny_model):
    # The old fix (completion_only_loss off) made TRL train on raw prompt+completion: here the
    # trained text of a templated row is the template's rendering.
    _, prepared = prepared_rows(tiny_model, formatting_template=TEMPLATE, completion_only_loss="false")
    first = json.loads(SAMPLE.read_text().splitlines()[0])
    assert prepared.samples[0]["trained_text"].startswith(f"Question: {first['prompt']}\nAnswer:")


def test_completion_only_loss_true_on_text_rows_is_an_error_not_silent(tiny_model, tmp_path):
    rows = tmp_path / "text.jsonl"
    rows.write_text('{"text": "hello world"}\n' * 4)
    p = params.defaults()
    p = p.replace(model_name=tiny_model, dataset_name=str(rows), adaptor_name="a", completion_only_loss="true")
    with pytest.raises(InvalidConfig, match="completion_only_loss"):
        prepare_data(p)


def test_labels_are_given_so_a_completion_mask_is_never_ignored(tmp_path, worker):
    args = worker._sft_config(spec(tmp_path))
    assert args.dataset_kwargs == {"skip_prepare_dataset": True}  # TRL takes our labels as they are


def test_padding_free_without_packing_is_never_set(tmp_path, worker):
    args = worker._sft_config(spec(tmp_path))
    assert not args.padding_free and not args.packing


def test_packing_always_has_a_max_length(tmp_path, worker):
    args = worker._sft_config(spec(tmp_path, packing=True))
    assert args.packing and args.max_length == 2048
    assert args.dataset_kwargs is None


def test_cpu_plan_sets_use_cpu_so_bf16_is_not_assumed(tmp_path, worker):
    # Without use_cpu, transformers raises "Your setup doesn't support bf16/gpu" on this machine.
    args = worker._sft_config(spec(tmp_path))
    assert args.use_cpu and not args.bf16 and not args.fp16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp16_and_bf16_are_never_both_on(tmp_path, precision, worker):
    # precision is one enum, so the plan names exactly one (fp16 needs a GPU and is refused on this machine).
    plan = plan_of(precision=precision)
    args = worker._sft_config(spec(tmp_path, plan=plan))
    assert (args.bf16, args.fp16) == (precision == "bf16", False)


def test_warmup_ratio_becomes_a_fractional_warmup_steps(tmp_path, worker):
    args = worker._sft_config(spec(tmp_path, warmup_ratio=0.1))
    assert args.warmup_steps == pytest.approx(0.1)


def test_report_to_is_explicit(tmp_path, worker):
    assert worker._sft_config(spec(tmp_path)).report_to in ([], "none", ["none"])


def test_report_to_reaches_the_first_ranks_trainer_alone(tmp_path, worker, monkeypatch):
    """TRL's default ("all" in older releases) would report to every tracker installed; the others' callbacks do
    nothing on a rank but the first, which alone gets the list."""
    reporting = Reporting(("tensorboard", "trackio"), str(tmp_path / "logs"), "my-adapter", "20261207-120000")
    reported = dataclasses.replace(spec(tmp_path), reporting=reporting)
    monkeypatch.setenv("RANK", "0")
    args = worker._sft_config(reported)
    assert args.report_to == ["tensorboard", "trackio"]
    assert (args.project, args.run_name) == ("my-adapter", "20261207-120000")
    monkeypatch.setenv("RANK", "1")
    assert worker._sft_config(reported).report_to == []


def test_lora_on_lm_head_is_caught_before_launch():
    p = params.defaults()
    p = p.replace(lora_target_modules="q_proj,lm_head")
    assert [f[1].parameter for f in validation.lora_not_on_lm_head(p)] == ["lora_target_modules"]


def test_a_peft_model_plus_a_lora_config_is_caught_before_launch(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    p = params.defaults()
    p = p.replace(model_name=str(tmp_path))
    assert [f[1].parameter for f in validation.model_is_not_an_adapter(p, sources.inspect_model(p.model_name))] == [
        "model_name"
    ]


def test_one_process_sees_one_gpu_so_trl_never_meets_data_parallel():
    p = params.defaults()
    p = p.replace(num_processes="1")
    two = Machine(gpus=[Gpu(0, "fake", 1, 8.0), Gpu(1, "fake", 1, 8.0)])  # a fake: no GPU exists here
    plan = planning.build(p, two)
    assert launch.rank_env(plan)["CUDA_VISIBLE_DEVICES"] == "0"


def tokenizer_without(tiny_model: str, folder, token: str) -> str:
    """A copy of the tiny model's tokenizer whose config leaves `token` (eos_token, pad_token) unset."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config[token] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def test_tokenizer_without_eos_is_an_error_naming_model_name(tiny_model, tmp_path):
    with pytest.raises(InvalidConfig, match="model_name: the tokenizer has no EOS token"):
        sources.load_tokenizer(tokenizer_without(tiny_model, tmp_path / "no-eos", "eos_token"))


def test_missing_pad_token_falls_back_to_eos(tiny_model, tmp_path):
    loaded = sources.load_tokenizer(tokenizer_without(tiny_model, tmp_path / "no-pad", "pad_token"))
    assert loaded.pad_token_id == loaded.eos_token_id


def test_datasets_are_never_streamed_so_max_steps_is_not_required(tiny_model):
    from datasets import Dataset, load_from_disk

    _, prepared = prepared_rows(tiny_model, formatting_template=TEMPLATE)
    assert isinstance(load_from_disk(prepared.path)["train"], Dataset)
