"""The training recipe: bf16 checkpoints that learn in SFT, the global batch, the authors' SFT options
(packing, loss on the prompt), and SimPO's beta."""

import importlib.util
import itertools
import json
import logging
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from wrpo_core.config import (
    ConfigError,
    FusionConfig,
    LaunchConfig,
    SFTConfig,
    SFTJobConfig,
    WRPOConfig,
    load_config,
    parse_config,
)
from wrpo_core.config.training import gradient_accumulation, planned_global_batch, planned_world_size
from wrpo_core.schemas import BEST_SOURCE, read_parquet, write_parquet
from wrpo_core.tokenization import IGNORE_INDEX, encode_example, end_of_turn_id
from wrpo_core.toy.skills import make_prompts
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer
from wrpo_core.train.common import effective_accumulation, training_arguments
from wrpo_core.train.sft import SFTCollator, check_packing_support, pack_examples, tokenize_sft, train_sft

ROOT = Path(__file__).resolve().parents[1]


def sft_table(n: int, seed: int = 0) -> pa.Table:
    rows = make_prompts(["reverse", "add", "upper"], n, seed=seed)
    return pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": [r["prompt"] for r in rows],
            "y_ws": [r["answer"] for r in rows],
            "y_ws_model": ["src"] * n,
            "y_ws_sample_index": pa.array([0] * n, pa.int32()),
            "y_ws_score": [1.0] * n,
        }
    )


@pytest.fixture()
def sft_data(tmp_path) -> str:
    url = str(tmp_path / "best_source.parquet")
    write_parquet(sft_table(12), url, BEST_SOURCE)
    return url


def sft_hp(**overrides) -> SFTConfig:
    base = dict(
        max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=7e-6,
        lr_scheduler_type="constant", warmup_ratio=0.0, gradient_checkpointing=False, logging_steps=1,
        save_steps=100, bf16=False, max_seq_length=64, max_prompt_length=32,
    )  # fmt: skip
    return SFTConfig(**{**base, **overrides})


# --- bf16 checkpoints learn in SFT -------------------------------------------------------------


def weight_change_norm(before: dict[str, torch.Tensor], folder: str) -> float:
    after = load_file(f"{folder}/model.safetensors")
    return math.sqrt(sum(float((after[k].float() - before[k].float()).pow(2).sum()) for k in before))


def test_sft_of_a_bf16_checkpoint_moves_its_weights_as_much_as_fp32(tmp_path, sft_data):
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=3).to(torch.bfloat16)  # weights a bf16 checkpoint can hold
    bf16_dir = save_tiny_model(model, tokenizer, tmp_path / "bf16")
    fp32_dir = save_tiny_model(model.to(torch.float32), tokenizer, tmp_path / "fp32")
    assert next(iter(load_file(f"{bf16_dir}/model.safetensors").values())).dtype == torch.bfloat16
    initial = {k: v.float() for k, v in load_file(f"{fp32_dir}/model.safetensors").items()}

    changes = {}
    for name, folder in (("bf16", bf16_dir), ("fp32", fp32_dir)):
        out = str(tmp_path / f"sft-{name}")
        train_sft(SFTJobConfig(model=folder, data=sft_data, output_dir=out, training=sft_hp()))
        changes[name] = weight_change_norm(initial, out)
    ratio = changes["bf16"] / changes["fp32"]
    print(f"weight change after 4 steps at lr 7e-6: bf16 {changes['bf16']:.3e}, fp32 {changes['fp32']:.3e}, "
          f"ratio {ratio:.3f}")  # fmt: skip
    assert changes["fp32"] > 1e-4
    assert 0.8 < ratio < 1.25


# --- global batch -------------------------------------------------------------------------------


def test_global_batch_sets_the_accumulation_for_the_number_of_processes():
    hp = SFTConfig(per_device_train_batch_size=8, global_batch_size=128)
    assert [gradient_accumulation(hp, n) for n in (1, 2, 8, 16)] == [16, 8, 2, 1]
    unset = SFTConfig(per_device_train_batch_size=8, gradient_accumulation_steps=3)
    assert [gradient_accumulation(unset, n) for n in (1, 8)] == [3, 3]  # as given: the batch grows
    torchrun = LaunchConfig(nproc_per_node=4, nnodes=2)
    ray = LaunchConfig(launcher="ray", num_workers=4, nproc_per_node=8)
    assert [planned_world_size(x) for x in (None, torchrun, ray)] == [1, 8, 4]
    assert [planned_global_batch(hp, x) for x in (None, torchrun, ray)] == [128, 128, 128]
    assert [planned_global_batch(unset, x) for x in (None, torchrun, ray)] == [24, 192, 96]


def test_a_global_batch_that_does_not_divide_is_an_error_naming_the_numbers():
    hp = SFTConfig(per_device_train_batch_size=8, global_batch_size=100)
    with pytest.raises(
        ValueError, match=r"global_batch_size 100 is not a multiple of .* 8 x 4 processes = 32"
    ):
        gradient_accumulation(hp, 4)
    with pytest.raises(
        ConfigError, match=r"job: .*global_batch_size 96 is not a multiple of .* 8 x 8 processes = 64"
    ):
        parse_config(
            {"model": "m", "data": "d", "output_dir": "o", "launch": {"nproc_per_node": 8},
             "training": {"per_device_train_batch_size": 8, "global_batch_size": 96}},
            SFTJobConfig, where="job",
        )  # fmt: skip


def test_every_job_logs_its_effective_global_batch(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="wrpo_core.train.common")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = training_arguments(sft_hp(per_device_train_batch_size=8, global_batch_size=32), str(tmp_path))
    assert args.gradient_accumulation_steps == 4
    args = training_arguments(
        sft_hp(per_device_train_batch_size=8, gradient_accumulation_steps=2), str(tmp_path)
    )
    assert args.gradient_accumulation_steps == 2
    lines = [r.getMessage() for r in caplog.records if "global batch" in r.getMessage()]
    assert lines[0].startswith("global batch 32 = 8 per device x 4 accumulation x 1 processes")
    assert lines[1].startswith("global batch 16 = 8 per device x 2 accumulation x 1 processes")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a 2-process job
    assert effective_accumulation(sft_hp(per_device_train_batch_size=8, global_batch_size=32)) == 2


def test_the_paper_config_trains_with_the_papers_global_batch_on_8_gpus():
    cfg = load_config(ROOT / "configs" / "paper.yaml", FusionConfig)
    assert (cfg.launch.launcher, planned_world_size(cfg.launch)) == ("local", 8)
    assert (cfg.sft.per_device_train_batch_size, cfg.wrpo.per_device_train_batch_size) == (8, 2)
    assert planned_global_batch(cfg.sft, cfg.launch) == 128
    assert planned_global_batch(cfg.wrpo, cfg.launch) == 128
    assert cfg.sft.packing and cfg.sft.loss_on_prompt  # the authors' SFT recipe


# --- the authors' SFT recipe: loss on the prompt, packing --------------------------------------


def segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """A packed row cut where its position ids restart: (input ids, labels) of each example."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in itertools.pairwise(starts)]


def test_loss_on_prompt_labels_the_whole_text(toy_tokenizer):
    table = sft_table(6)
    masked, _ = tokenize_sft(table, toy_tokenizer, sft_hp())
    whole, _ = tokenize_sft(table, toy_tokenizer, sft_hp(loss_on_prompt=True))
    for prompt, response, m, w in zip(
        table["prompt"].to_pylist(), table["y_ws"].to_pylist(), masked, whole, strict=True
    ):
        enc = encode_example(toy_tokenizer, prompt, [response], max_length=64, max_prompt_length=32)
        n_prompt = len(enc.prompt_ids)
        assert m["input_ids"] == w["input_ids"] == enc.prompt_ids + enc.response_ids[0]
        assert m["labels"] == [IGNORE_INDEX] * n_prompt + enc.response_ids[0]
        assert w["labels"] == [IGNORE_INDEX, *w["input_ids"][1:]]  # the prompt's tokens carry labels


def test_packing_fills_sequences_with_whole_examples_and_no_label_crosses_a_boundary(toy_tokenizer):
    table = sft_table(60)
    eot = end_of_turn_id(toy_tokenizer)
    for loss_on_prompt in (False, True):
        hp = sft_hp(max_seq_length=96, packing=True, loss_on_prompt=loss_on_prompt)
        single, _ = tokenize_sft(table, toy_tokenizer, hp.model_copy(update={"packing": False}))
        packed, _ = tokenize_sft(table, toy_tokenizer, hp)
        tokens = sum(len(r["input_ids"]) for r in single)
        assert all(len(r["input_ids"]) <= 96 for r in packed)
        assert math.ceil(tokens / 96) <= len(packed) <= math.ceil(tokens / 96) + 1  # ~ total / max_seq_length
        assert len(packed) < len(single) / 3
        found = sorted((ids, labels) for row in packed for ids, labels in segments(row))
        # every example once and whole, with its own labels; its first token is predicted from nothing
        assert found == sorted((r["input_ids"], r["labels"]) for r in single)
        for row in packed:
            for ids, labels in segments(row):
                assert labels[0] == IGNORE_INDEX
                assert ids[-1] == eot and labels[-1] == eot  # exactly one end-of-turn ends each example
                response = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
                assert response.count(eot) == (2 if loss_on_prompt else 1)  # user turn's end + response's
            assert sum(t == eot for t in row["input_ids"]) == 2 * len(segments(row))  # no separator added


def test_pack_examples_is_best_fit_and_refuses_an_example_too_long():
    groups = pack_examples([6, 5, 4, 3, 2], capacity=10)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="an example of 11 tokens does not fit a sequence of 10"):
        pack_examples([3, 11], capacity=10)


def test_packed_batches_restart_positions_and_have_no_attention_mask():
    batch = SFTCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]},
        ]
    )
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]  # padding: its own run
    assert batch["labels"].tolist()[1] == [-100, 6, -100, -100, -100]


def test_a_packed_sft_step_has_the_loss_of_its_examples_computed_one_by_one(tmp_path, tiny_model_dir):
    """Each packed example sees only itself: the loss equals an independent per-example computation."""
    data = str(tmp_path / "sft.parquet")
    write_parquet(sft_table(9), data, BEST_SOURCE)
    out = str(tmp_path / "packed")
    hp = sft_hp(
        max_steps=1, per_device_train_batch_size=16, learning_rate=1e-3, packing=True, loss_on_prompt=True
    )
    train_sft(SFTJobConfig(model=tiny_model_dir, data=data, output_dir=out, training=hp))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    table = read_parquet(data, BEST_SOURCE)
    total, count = 0.0, 0
    for prompt, response in zip(table["prompt"].to_pylist(), table["y_ws"].to_pylist(), strict=True):
        enc = encode_example(tokenizer, prompt, [response], max_length=64, max_prompt_length=32)
        ids = torch.tensor([enc.prompt_ids + enc.response_ids[0]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0], -1)
        total -= sum(logp[t - 1, ids[0, t]].item() for t in range(1, ids.shape[1]))
        count += ids.shape[1] - 1
    rows = [json.loads(line) for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in rows if "loss" in r)["loss"] == pytest.approx(total / count, rel=1e-4)


def test_packing_refuses_a_model_that_cannot_keep_examples_apart(tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    check_packing_support(model, "tiny")  # a built-in model: accepted
    custom = type("CustomLM", (LlamaForCausalLM,), {"__module__": "custom_modelling"})
    with pytest.raises(ValueError, match=r"tiny: training\.packing needs a built-in transformers model"):
        check_packing_support(custom(model.config), "tiny")


# --- SimPO's beta -------------------------------------------------------------------------------


def test_simpo_with_a_dpo_scale_beta_is_an_error_naming_beta_and_simpos_values():
    with pytest.raises(
        ValidationError, match=r"beta 0.01 .* loss_type 'simpo'.*beta 2.5 with simpo_gamma 1.375"
    ):
        WRPOConfig(loss_type="simpo")
    simpo = WRPOConfig(loss_type="simpo", beta=2.5)
    assert (simpo.beta, simpo.simpo_gamma) == (2.5, 1.375)
    assert WRPOConfig().beta == 0.01  # the paper's WRPO beta is unchanged
    with pytest.raises(ConfigError, match=r"run.yaml: wrpo.beta: .*set wrpo.beta"):
        parse_config(
            {"prompts": {"path": "p.jsonl"}, "sources": [{"path": "org/a"}], "target": {"path": "org/t"},
             "reward_model": {"path": "org/rm"}, "wrpo": {"loss_type": "simpo", "beta": 0.1}},
            FusionConfig, where="run.yaml",
        )  # fmt: skip


# --- where metrics go ----------------------------------------------------------------------------


def test_report_to_reaches_the_trainer_and_a_missing_package_is_named(tmp_path, monkeypatch):
    assert training_arguments(sft_hp(report_to="none"), str(tmp_path)).report_to in ("none", [], ["none"])
    assert training_arguments(sft_hp(), str(tmp_path)).report_to == ["tensorboard"]  # the default
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name)
    )
    with pytest.raises(ConfigError, match=r"report_to: 'wandb' needs the 'wandb' package.*report_to: none"):
        training_arguments(sft_hp(report_to="wandb"), str(tmp_path))
    with pytest.raises(ValidationError, match="report_to"):
        sft_hp(report_to="comet")
