"""SFT and WRPO jobs end to end on a tiny model: masking, alpha schedule, reference log-probs, saving."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wrpo_core.config import SFTConfig, SFTJobConfig, WRPOConfig, WRPOJobConfig
from wrpo_core.logprobs import grouped_logps
from wrpo_core.reference import REFERENCE_FILE
from wrpo_core.schemas import BEST_SOURCE, QUADRUPLES, read_parquet, write_parquet
from wrpo_core.tokenization import IGNORE_INDEX, ResponseCollator, encode_example
from wrpo_core.train.sft import train_sft
from wrpo_core.train.wrpo import train_wrpo

PROMPTS = [f"reverse: {w}" for w in ["abc", "dog", "tree", "house", "mouse", "pen", "lamp", "cup"]]


def metrics(out_dir):
    with open(f"{out_dir}/metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def training_rows(out_dir):
    return [m for m in metrics(out_dir) if "loss" in m]


@pytest.fixture()
def sft_data(tmp_path):
    table = pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(8)],
            "prompt": PROMPTS,
            "y_ws": [p.split(": ")[1][::-1] for p in PROMPTS],
            "y_ws_model": ["src"] * 8,
            "y_ws_sample_index": pa.array([0] * 8, pa.int32()),
            "y_ws_score": [1.0] * 8,
        }
    )
    url = str(tmp_path / "best_source.parquet")
    write_parquet(table, url, BEST_SOURCE)
    return url


@pytest.fixture()
def quadruples(tmp_path):
    words = [p.split(": ")[1] for p in PROMPTS]
    table = pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(8)],
            "prompt": PROMPTS,
            "y_ws": [w[::-1] for w in words],
            "y_ws_model": ["src"] * 8,
            "y_ws_score": [1.0] * 8,
            "y_wt": [w[::-1][:-1] for w in words],
            "y_wt_score": [0.8] * 8,
            "y_l": [w for w in words],
            "y_l_score": [0.1] * 8,
            "ref_logp_ws": pa.nulls(8, pa.float64()),
            "ref_logp_wt": pa.nulls(8, pa.float64()),
            "ref_logp_l": pa.nulls(8, pa.float64()),
        }
    )
    url = str(tmp_path / "quadruples.parquet")
    write_parquet(table, url, QUADRUPLES)
    return url


def small(hp_class, **overrides):
    base = dict(
        max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-3,
        gradient_checkpointing=False, logging_steps=1, save_steps=100, warmup_ratio=0.0, bf16=False,
    )  # fmt: skip
    return hp_class(**{**base, **overrides})


def test_sft_loss_is_mean_over_response_tokens_and_model_is_saved(tmp_path, sft_data, tiny_model_dir):
    out = str(tmp_path / "sft")
    train_sft(
        SFTJobConfig(
            model=tiny_model_dir,
            data=sft_data,
            output_dir=out,
            training=small(SFTConfig, max_seq_length=64, max_prompt_length=32),
        )
    )

    # Independent check of the first logged loss: token-mean cross-entropy over response tokens only.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    table = read_parquet(sft_data, BEST_SOURCE)
    total, count = 0.0, 0
    for prompt, response in zip(table["prompt"].to_pylist(), table["y_ws"].to_pylist(), strict=True):
        enc = encode_example(tokenizer, prompt, [response], max_length=64, max_prompt_length=32)
        ids = torch.tensor([enc.prompt_ids + enc.response_ids[0]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0], -1)
        for t in range(len(enc.prompt_ids), ids.shape[1]):
            total -= logp[t - 1, ids[0, t]].item()
            count += 1
    rows = training_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == pytest.approx(total / count, rel=1e-4)
    assert rows[-1]["loss"] < rows[0]["loss"]

    trained = AutoModelForCausalLM.from_pretrained(out)
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    assert saved_tokenizer.chat_template == tokenizer.chat_template
    assert not torch.equal(trained.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_wrpo_job_precomputes_reference_and_follows_alpha_schedule(tmp_path, quadruples, tiny_model_dir):
    out = str(tmp_path / "wrpo")
    hp = small(
        WRPOConfig, per_device_train_batch_size=2, beta=0.5, alpha=0.1, max_length=64, max_prompt_length=32
    )
    train_wrpo(WRPOJobConfig(model=tiny_model_dir, data=quadruples, output_dir=out, training=hp))

    rows = training_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # alpha = 0.1 * global_step / 4, global_step being the optimizer steps already taken
    assert [r["alpha"] for r in rows] == pytest.approx([0.0, 0.025, 0.05, 0.075])
    for r in rows:
        for key in ("rewards/chosen", "rewards/source_chosen", "rewards/target_chosen", "rewards/rejected",
                    "rewards/margins", "rewards/accuracies", "rewards/source_accuracies",
                    "rewards/target_accuracies", "logps/source_chosen", "logps/target_chosen", "logps/rejected"):  # fmt: skip
            assert np.isfinite(r[key]), key
    # At step 1 the policy is the reference: every implicit reward is 0 and the loss is log 2.
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)

    # Stored reference log-probs equal an independent forward pass of the initial model.
    stored = read_parquet(f"{out}/{REFERENCE_FILE}", QUADRUPLES)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for i in (0, 5):
        enc = encode_example(tokenizer, stored["prompt"][i].as_py(),
                             [stored[c][i].as_py() for c in ("y_ws", "y_wt", "y_l")], max_length=64, max_prompt_length=32)  # fmt: skip
        for j, column in enumerate(("ref_logp_ws", "ref_logp_wt", "ref_logp_l")):
            ids = torch.tensor([enc.prompt_ids + enc.response_ids[j]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0], -1)
            expected = sum(logp[t - 1, ids[0, t]].item() for t in range(len(enc.prompt_ids), ids.shape[1]))
            assert stored[column][i].as_py() == pytest.approx(expected, abs=1e-4)

    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_on_the_fly_reference_gives_the_same_losses(tmp_path, quadruples, tiny_model_dir):
    losses = {}
    for precompute in (True, False):
        out = str(tmp_path / f"wrpo-{precompute}")
        hp = small(WRPOConfig, per_device_train_batch_size=4, beta=0.5, alpha=0.3, alpha_schedule="constant",
                   max_length=64, max_prompt_length=32, precompute_reference=precompute)  # fmt: skip
        train_wrpo(WRPOJobConfig(model=tiny_model_dir, data=quadruples, output_dir=out, training=hp))
        losses[precompute] = [r["loss"] for r in training_rows(out)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][-1] != pytest.approx(losses[True][0])


def test_wrpo_job_resumes_from_its_checkpoint(tmp_path, quadruples, tiny_model_dir):
    out = str(tmp_path / "wrpo")
    hp = small(WRPOConfig, per_device_train_batch_size=2, max_length=64, max_prompt_length=32, save_steps=2)
    train_wrpo(
        WRPOJobConfig(
            model=tiny_model_dir,
            data=quadruples,
            output_dir=out,
            training=hp.model_copy(update={"max_steps": 2}),
        )
    )
    assert (tmp_path / "wrpo" / "checkpoint-2").is_dir()
    train_wrpo(WRPOJobConfig(model=tiny_model_dir, data=quadruples, output_dir=out, training=hp))
    assert [r["step"] for r in training_rows(out)] == [1, 2, 3, 4]  # steps 1-2 were not redone


def test_ipo_and_simpo_jobs_run(tmp_path, quadruples, tiny_model_dir):
    for loss_type in ("ipo", "simpo"):
        out = str(tmp_path / loss_type)
        hp = small(
            WRPOConfig,
            per_device_train_batch_size=4,
            max_steps=2,
            loss_type=loss_type,
            beta=2.5 if loss_type == "simpo" else 0.01,  # SimPO's scale (its paper) vs DPO's
            max_length=64,
            max_prompt_length=32,
        )
        train_wrpo(WRPOJobConfig(model=tiny_model_dir, data=quadruples, output_dir=out, training=hp))
        assert all(np.isfinite(r["loss"]) for r in training_rows(out))
    assert not (tmp_path / "simpo" / REFERENCE_FILE).exists()  # SimPO is reference-free


def test_grouped_logps_shapes(toy_tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc = encode_example(toy_tokenizer, "p", ["a", "bb", "ccc"], max_length=32, max_prompt_length=16)
    batch = ResponseCollator(pad_token_id=0)(
        [{"prompt_ids": enc.prompt_ids, "response_ids": enc.response_ids}] * 2
    )
    logps, lengths = grouped_logps(model, batch)
    assert logps.shape == (2, 3)
    assert lengths.tolist() == [[2, 3, 4], [2, 3, 4]]  # response + end-of-turn
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == 18
