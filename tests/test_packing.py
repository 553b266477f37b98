"""Shared-prompt packing: [prompt, y_ws, y_wt, y_l] in one row gives the log-probs, WRPO loss and
gradients of the unpacked batch (one row per response, `ResponseCollator`), which stays the
independent computation. Tiny random-weight models built here; fp32 and bf16; padding; the toy
tokenizer's real chat template with its special tokens.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from toy_quadruples import quadruples_table
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from wrpo_core.config import WRPOConfig, WRPOJobConfig
from wrpo_core.logprobs import grouped_logps
from wrpo_core.objectives import constant_alpha
from wrpo_core.packing import (
    PACKED_KEY,
    PackedResponseCollator,
    attention_mask_for,
    block_mask,
    choose_collator,
    packing_problem,
    score_positions,
    segment_logps,
)
from wrpo_core.reference import compute_reference_logps
from wrpo_core.schemas import QUADRUPLES, write_parquet
from wrpo_core.tokenization import IGNORE_INDEX, ResponseCollator, encode_example
from wrpo_core.toy.tiny_models import build_tiny_llama
from wrpo_core.train.metrics import read_metrics
from wrpo_core.train.wrpo import WRPOTrainer, build_wrpo_trainer, train_wrpo

FP32_ATOL, FP32_RTOL = 1e-5, 1e-6
"""Packed and unpacked run the same float32 operations on differently shaped tensors: they differ
only by rounding. A summed log-prob of -200 is held to 1.5e-5 in float32 (one ulp), hence the
relative term (measured: <= 3.1e-5 absolute, 1.6e-7 relative, on sums of 5 to 230)."""

BF16_ATOL = 1e-3
"""bf16 keeps 8 significant bits: the unpacked bf16 pass itself is 5e-3 to 1.4e-2 off the fp32
values on these sums (asserted below, so this bound stays under bf16's own error). Packing may
change the rounding (other tensor shapes, other kernels on GPU) but must not add error of that size;
measured on CPU: <= 3e-5."""

# (prompt, y_ws, y_wt, y_l) token counts: prompts and responses of different lengths, so both
# layouts pad, a one-token prompt and a one-token response included.
LENGTHS = [(15, 30, 17, 11), (42, 9, 25, 40), (1, 50, 45, 35), (30, 1, 30, 30)]
FAMILIES = [
    ("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("mistral", "eager"), ("qwen2", "sdpa"),
    ("qwen2", "eager"), ("qwen3", "sdpa"), ("gemma2", "eager"), ("phi3", "sdpa"),
]  # fmt: skip


def random_examples(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 100, (n,), generator=generator).tolist()

    return [{"prompt_ids": ids(p), "response_ids": [ids(a), ids(b), ids(c)]} for p, a, b, c in lengths]


def tiny_model(model_type: str, attention: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight 2-layer model of `model_type` (grouped-query attention: 4 heads, 2 kv heads)."""
    config = AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return model.float().eval()


def both_layouts(examples: list[dict], pad: int = 0) -> tuple[dict, dict]:
    return ResponseCollator(pad_token_id=pad)(examples), PackedResponseCollator(pad_token_id=pad)(examples)


# --- the packed layout ------------------------------------------------------------------------


def test_packed_row_layout_positions_segments_and_labels():
    examples = [
        {"prompt_ids": [5, 6, 7], "response_ids": [[10, 11], [12], [13, 14, 15]]},
        {"prompt_ids": [8], "response_ids": [[20], [21, 22], [23]]},
    ]
    batch = PackedResponseCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 10, 11, 12, 13, 14, 15],
        [8, 20, 21, 22, 23, 0, 0, 0, 0],
    ]
    assert batch["position_ids"].tolist()[0] == [0, 1, 2, 3, 4, 3, 3, 4, 5]  # each response from len(prompt)
    assert batch["position_ids"].tolist()[1][:5] == [0, 1, 1, 2, 1]
    assert batch[PACKED_KEY].tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 3], [0, 1, 2, 2, 3, -1, -1, -1, -1]]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX, 20, 21, 22, 23] + [IGNORE_INDEX] * 4
    assert batch["attention_mask"].tolist()[1] == [1] * 5 + [0] * 4
    # Every response's first token is predicted from the prompt's LAST position, the rest from t - 1.
    assert score_positions(batch[PACKED_KEY]).tolist()[0][3:] == [2, 3, 2, 2, 6, 7]
    assert score_positions(batch[PACKED_KEY]).tolist()[1][1:5] == [0, 0, 2, 0]


def test_block_mask_sees_the_prompt_and_its_own_response_only():
    segments = torch.tensor([[0, 0, 1, 1, 2, 3, -1]])
    allowed = block_mask(segments)[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # y_wt: the prompt and itself, not y_ws
        [1, 1, 0, 0, 0, 1, 0],  # y_l
        [0, 0, 0, 0, 0, 0, 1],  # padding attends only to itself (no empty softmax row)
    ]
    eager = attention_mask_for(segments, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and eager[0, 0, 4, 2] == torch.finfo(torch.bfloat16).min
    assert eager[0, 0, 4, 1] == 0
    with pytest.raises(ValueError, match="flash_attention_2"):
        attention_mask_for(segments, "flash_attention_2", torch.float32)


def test_collator_refuses_an_empty_prompt_and_unequal_response_counts():
    with pytest.raises(ValueError, match=r"example 1 .*empty prompt_ids"):
        PackedResponseCollator(0)(
            [{"prompt_ids": [1], "response_ids": [[2]]}, {"prompt_ids": [], "response_ids": [[3]]}]
        )
    with pytest.raises(ValueError, match=r"example 1 .*2 responses"):
        PackedResponseCollator(0)([{"prompt_ids": [1], "response_ids": [[2]]}, {"prompt_ids": [1], "response_ids": [[3], [4]]}])  # fmt: skip


# --- log-probs: packed == unpacked ---------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "attention"), FAMILIES)
def test_packed_logps_match_the_unpacked_rows(model_type, attention):
    model = tiny_model(model_type, attention)
    assert packing_problem(model, max_length=128) is None
    unpacked, packed = both_layouts(random_examples())
    with torch.no_grad():
        expected, expected_lengths = grouped_logps(model, unpacked)
        got, lengths = grouped_logps(model, packed)
    assert torch.equal(lengths, expected_lengths)
    assert lengths.tolist() == [[a, b, c] for _, a, b, c in LENGTHS]
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert packed["attention_mask"].sum() < unpacked["attention_mask"].sum()  # fewer tokens encoded


def test_the_test_would_see_responses_leaking_into_each_other():
    """A plain causal mask over the packed row (y_wt sees y_ws) moves y_wt's and y_l's log-probs."""
    model = tiny_model("llama", "sdpa")
    unpacked, packed = both_layouts(random_examples())
    with torch.no_grad():
        expected, _ = grouped_logps(model, unpacked)
        leaky = model(
            input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
            position_ids=packed["position_ids"], use_cache=False,
        ).logits  # fmt: skip
    leaked, _ = segment_logps(leaky, packed["labels"], packed[PACKED_KEY], 3)
    # y_ws sees only the prompt either way; y_wt and y_l now also see the responses before them.
    torch.testing.assert_close(leaked[:, 0], expected[:, 0], atol=FP32_ATOL, rtol=FP32_RTOL)
    assert (leaked[:, 1:] - expected[:, 1:]).abs().max() > 1e-2


def test_first_response_token_is_scored_from_the_prompts_last_position():
    """Independent of both collators: log p(first token | prompt) from a forward of the prompt alone."""
    model = tiny_model("llama", "eager")
    examples = random_examples()
    packed = PackedResponseCollator(0)(examples)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=attention_mask_for(
            packed[PACKED_KEY], "eager", torch.float32), position_ids=packed["position_ids"]).logits  # fmt: skip
        for i, example in enumerate(examples):
            prompt = torch.tensor([example["prompt_ids"]])
            alone = torch.log_softmax(model(prompt).logits[0, -1], -1)
            last = len(example["prompt_ids"]) - 1
            assert score_positions(packed[PACKED_KEY])[i, last + 1].item() == last
            packed_logp = torch.log_softmax(logits[i, last], -1)
            for response in example["response_ids"]:
                assert packed_logp[response[0]].item() == pytest.approx(alone[response[0]].item(), abs=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("weights_in_bf16", [False, True], ids=["bf16-autocast", "bf16-weights"])
def test_packed_logps_match_in_bf16(attention, weights_in_bf16):
    model = tiny_model("llama", attention)
    unpacked, packed = both_layouts(random_examples())
    with torch.no_grad():
        fp32, _ = grouped_logps(model, unpacked)
        if weights_in_bf16:
            model = model.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not weights_in_bf16):
            expected, _ = grouped_logps(model, unpacked)
            got, _ = grouped_logps(model, packed)
    assert (expected.float() - fp32).abs().max() > BF16_ATOL, "not a bf16 computation: vacuous check"
    torch.testing.assert_close(got.float(), expected.float(), atol=BF16_ATOL, rtol=0)


def test_real_chat_template_with_special_tokens(toy_tokenizer):
    quadruples = [
        ("reverse: abc", "cba", "cb", "abc, I think"),
        ("add: 12+30, then explain the carry in one sentence", "42", "forty-two", "4"),
        ("upper: mouse", "MOUSE", "MOUS", "mouse"),
    ]
    examples = []
    for prompt, *responses in quadruples:
        encoded = encode_example(toy_tokenizer, prompt, responses, max_length=96, max_prompt_length=64)
        examples.append({"prompt_ids": encoded.prompt_ids, "response_ids": encoded.response_ids})
    unpacked, packed = both_layouts(examples, pad=toy_tokenizer.pad_token_id)
    text = toy_tokenizer.decode(packed["input_ids"][0][packed["attention_mask"][0].bool()])
    assert text.startswith(
        "<s><|user|>reverse: abc<|end|><|assistant|>cba<|end|>cb<|end|>abc, I think<|end|>"
    )
    model = build_tiny_llama(toy_tokenizer, seed=1)
    with torch.no_grad():
        expected, expected_lengths = grouped_logps(model, unpacked)
        got, lengths = grouped_logps(model, packed)
    assert torch.equal(lengths, expected_lengths)
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


# --- WRPO loss and gradients --------------------------------------------------------------------


def loss_and_grads(policy, reference, batch, loss_type: str, tmp_path, autocast: bool = False):
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False
    )
    model = copy.deepcopy(policy).train()
    beta = 2.5 if loss_type == "simpo" else 0.1
    trainer = WRPOTrainer(
        model=model, args=args, wrpo=WRPOConfig(beta=beta, alpha=0.3, loss_type=loss_type),
        ref_model=copy.deepcopy(reference), alpha_schedule=constant_alpha(0.3),
        train_dataset=Dataset.from_list([{"x": 0}]), data_collator=lambda rows: rows,
    )  # fmt: skip
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far `a` is from `b`, relative to `b`'s norm."""
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def policy_and_reference():
    policy = tiny_model("llama", "sdpa")
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference that differs, so the log-ratios are not zero
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return policy, reference.requires_grad_(False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_wrpo_loss_and_every_gradient_match(policy_and_reference, loss_type, tmp_path):
    policy, reference = policy_and_reference
    unpacked, packed = both_layouts(random_examples())
    expected_loss, expected = loss_and_grads(policy, reference, unpacked, loss_type, tmp_path)
    loss, grads = loss_and_grads(policy, reference, packed, loss_type, tmp_path)
    assert loss == pytest.approx(expected_loss, abs=FP32_ATOL)
    assert abs(expected_loss - 0.6931) > 1e-3, "log-ratios are zero: the comparison would be vacuous"
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():  # measured: <= 1.2e-6 relative in norm, 1.2e-7 absolute
        assert relative(grads[name], grad) < 1e-5, name
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert max(g.abs().max().item() for g in expected.values()) > 1e-3, "gradients vanished: vacuous check"


def test_gradient_checkpointing_keeps_the_packed_gradients(policy_and_reference, tmp_path):
    """Activation checkpointing re-runs each layer with the same block mask and positions."""
    policy, reference = policy_and_reference
    _, packed = both_layouts(random_examples())
    loss, expected = loss_and_grads(policy, reference, packed, "sigmoid", tmp_path)
    checkpointed = copy.deepcopy(policy)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    again, grads = loss_and_grads(checkpointed, reference, packed, "sigmoid", tmp_path)
    assert again == pytest.approx(loss, abs=FP32_ATOL)
    for name, grad in expected.items():
        assert relative(grads[name], grad) < 1e-5, name


def test_wrpo_loss_and_gradients_match_in_bf16(policy_and_reference, tmp_path):
    """Under bf16 autocast, packing must be as accurate as the unpacked batch, measured against fp32.

    bf16 rounds differently for other tensor shapes (the backward sums over tokens in another
    order), so the packed and unpacked bf16 gradients differ by about as much as either differs
    from fp32: 0.4-0.8% in norm here (measured: packed vs unpacked 0.07-0.5%). The bound: each
    parameter's packed bf16 gradient is within 1.25x the unpacked one's distance to the fp32
    gradient (measured ratio 0.96-1.04), and within 1% of the unpacked bf16 gradient.
    """
    policy, reference = policy_and_reference
    unpacked, packed = both_layouts(random_examples())
    _, exact = loss_and_grads(policy, reference, unpacked, "sigmoid", tmp_path)
    expected_loss, expected = loss_and_grads(policy, reference, unpacked, "sigmoid", tmp_path, autocast=True)
    loss, grads = loss_and_grads(policy, reference, packed, "sigmoid", tmp_path, autocast=True)
    assert loss == pytest.approx(expected_loss, abs=BF16_ATOL)
    for name, grad in exact.items():
        bf16_error = relative(expected[name], grad)
        assert bf16_error > 1e-3, f"{name}: not a bf16 computation, vacuous check"
        assert relative(grads[name], grad) <= 1.25 * bf16_error, name
        assert relative(grads[name], expected[name]) < 0.01, name


# --- the reference pass and the job ---------------------------------------------------------------


def test_reference_pass_packed_matches_unpacked_in_row_order():
    model = tiny_model("llama", "sdpa")
    examples = random_examples(LENGTHS * 2 + [(4, 2, 3, 9)], seed=3)
    dataset = Dataset.from_list(examples)
    common = dict(pad_token_id=0, batch_size=3, progress=False)
    unpacked = compute_reference_logps(model, dataset, pack_prompt=False, **common)
    packed = compute_reference_logps(model, dataset, pack_prompt=True, **common)
    np.testing.assert_allclose(packed, unpacked, atol=FP32_ATOL, rtol=FP32_RTOL)
    with torch.no_grad():  # the row order: each example alone, unpacked
        alone = grouped_logps(model, ResponseCollator(0)([examples[-1]]))[0][0].double().numpy()
    np.testing.assert_allclose(unpacked[-1], alone, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_unsupported_models_fall_back_with_a_logged_reason(caplog):
    sdpa = tiny_model("llama", "sdpa")
    flash = copy.deepcopy(sdpa)
    flash.config._attn_implementation = "flash_attention_2"  # a config switch; no kernel runs here
    windowed = tiny_model("mistral", "sdpa")
    windowed.config.sliding_window = 32
    assert "flash_attention_2" in packing_problem(flash, 64)
    assert "sliding window (32 tokens)" in packing_problem(windowed, 64)
    assert packing_problem(windowed, 32) is None
    assert "not one packing was checked on" in packing_problem(tiny_model("gpt2", "eager"), 64)
    assert "not a transformers model" in packing_problem(torch.nn.Linear(2, 2), 64)
    with caplog.at_level(logging.INFO, logger="wrpo_core.packing"):
        chosen = choose_collator([sdpa, flash], pad_token_id=0, pack=True, max_length=64, where="here")
    assert isinstance(chosen, ResponseCollator)
    assert "here: shared-prompt packing off" in caplog.text and "flash_attention_2" in caplog.text
    assert isinstance(choose_collator([sdpa, None], pad_token_id=0, pack=True, max_length=64, where="x"),
                      PackedResponseCollator)  # fmt: skip
    assert isinstance(
        choose_collator([sdpa], pad_token_id=0, pack=False, max_length=64, where="x"), ResponseCollator
    )
    with pytest.raises(ValueError, match="sliding window"):  # a packed batch that a window would cut
        grouped_logps(windowed, PackedResponseCollator(0)(random_examples()))


def test_wrpo_job_trains_the_same_packed_and_unpacked(tmp_path, tiny_model_dir, caplog):
    data = str(tmp_path / "quadruples.parquet")
    write_parquet(quadruples_table(), data, QUADRUPLES)
    losses = {}
    for pack in (True, False):
        hp = WRPOConfig(
            max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
            gradient_checkpointing=False, logging_steps=1, save_steps=100, warmup_ratio=0.0, bf16=False,
            beta=0.5, alpha=0.3, alpha_schedule="constant", max_length=64, max_prompt_length=32, pack_prompt=pack,
        )  # fmt: skip
        job = WRPOJobConfig(
            model=tiny_model_dir, data=data, output_dir=str(tmp_path / f"pack-{pack}"), training=hp
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="wrpo_core.packing"):
            train_wrpo(job)
        packed_passes = [m for m in caplog.messages if "shared-prompt packing on" in m]
        assert len(packed_passes) == (2 if pack else 0), caplog.messages  # the reference pass and training
        losses[pack] = [row["loss"] for row in read_metrics(job.output_dir) if "loss" in row]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][-1] != pytest.approx(losses[True][0])  # it trained


def test_the_job_trainer_packs_by_default(tmp_path, tiny_model_dir, toy_tokenizer):
    def collator(**overrides):
        hp = WRPOConfig(max_length=64, max_prompt_length=32, bf16=False, **overrides)
        job = WRPOJobConfig(
            model=tiny_model_dir, data="unused.parquet", output_dir=str(tmp_path), training=hp
        )
        return build_wrpo_trainer(job, toy_tokenizer, None, None).data_collator

    assert isinstance(collator(), PackedResponseCollator)
    assert isinstance(collator(pack_prompt=False), ResponseCollator)
