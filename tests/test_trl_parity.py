"""Parity with TRL: WRPO at alpha = 0 / 1 is TRL's DPO (sigmoid) on (y_wt, y_l) / (y_ws, y_l).

Both sides run their own full path on the same tiny model and batch: TRL tokenizes the
conversational pair with its own code and computes its loss; we tokenize the quadruple,
collate [y_ws, y_wt, y_l] and compute the WRPO loss. Loss and every gradient must agree.
"""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from wrpo_core.config import WRPOConfig
from wrpo_core.objectives import constant_alpha
from wrpo_core.tokenization import ResponseCollator, encode_example
from wrpo_core.toy.tiny_models import build_tiny_llama
from wrpo_core.train.common import checkpointing_arguments
from wrpo_core.train.wrpo import WRPOTrainer

trl = pytest.importorskip("trl")

BETA = 0.1
QUADRUPLES = [
    {"prompt": "reverse: abc", "y_ws": "cba", "y_wt": "cab", "y_l": "zz top"},
    {"prompt": "add: 2+2", "y_ws": "4", "y_wt": "four", "y_l": "5, surely"},
]


@pytest.fixture(scope="module")
def models(toy_tokenizer):
    policy = build_tiny_llama(toy_tokenizer, seed=0)
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference that differs, so log-ratios are not zero
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return policy, reference.requires_grad_(False).eval()


def trl_loss_and_grads(tokenizer, policy, reference, chosen_key, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": q["prompt"]}],
            "chosen": [{"role": "assistant", "content": q[chosen_key]}],
            "rejected": [{"role": "assistant", "content": q["y_l"]}],
        }
        for q in QUADRUPLES
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        **checkpointing_arguments(False), per_device_train_batch_size=2, beta=BETA, loss_type=["sigmoid"],
        max_length=None, precompute_ref_log_probs=False, save_strategy="no", logging_strategy="no", seed=0,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )  # fmt: skip
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    model = trainer.model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def wrpo_loss_and_grads(tokenizer, policy, reference, alpha, tmp_path):
    examples = []
    for q in QUADRUPLES:
        enc = encode_example(
            tokenizer, q["prompt"], [q["y_ws"], q["y_wt"], q["y_l"]], max_length=256, max_prompt_length=128
        )
        examples.append({"prompt_ids": enc.prompt_ids, "response_ids": enc.response_ids})
    batch = ResponseCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    args = TrainingArguments(
        output_dir=str(tmp_path / "ours"), report_to="none", use_cpu=True, remove_unused_columns=False
    )
    model = copy.deepcopy(policy)
    trainer = WRPOTrainer(
        model=model, args=args, wrpo=WRPOConfig(beta=BETA, alpha=alpha), ref_model=copy.deepcopy(reference),
        alpha_schedule=constant_alpha(alpha), train_dataset=Dataset.from_list(examples),
        data_collator=ResponseCollator(pad_token_id=tokenizer.pad_token_id),
    )  # fmt: skip
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("alpha", "chosen_key"), [(0.0, "y_wt"), (1.0, "y_ws")])
def test_wrpo_matches_trl_dpo(toy_tokenizer, models, tmp_path, alpha, chosen_key):
    policy, reference = models
    trl_loss, trl_grads = trl_loss_and_grads(toy_tokenizer, policy, reference, chosen_key, tmp_path)
    our_loss, our_grads = wrpo_loss_and_grads(toy_tokenizer, policy, reference, alpha, tmp_path)
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    assert abs(trl_loss - 0.6931) > 1e-3, "log-ratios are zero: the comparison would be vacuous"
    assert trl_grads.keys() == our_grads.keys()
    for name, grad in trl_grads.items():
        torch.testing.assert_close(
            our_grads[name], grad, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert max(g.abs().max().item() for g in our_grads.values()) > 1e-4, "gradients vanished: vacuous check"


def test_intermediate_alpha_differs_from_both_dpo_pairs(toy_tokenizer, models, tmp_path):
    policy, reference = models
    half, _ = wrpo_loss_and_grads(toy_tokenizer, policy, reference, 0.5, tmp_path)
    wt, _ = trl_loss_and_grads(toy_tokenizer, policy, reference, "y_wt", tmp_path)
    ws, _ = trl_loss_and_grads(toy_tokenizer, policy, reference, "y_ws", tmp_path)
    assert abs(half - wt) > 1e-6 and abs(half - ws) > 1e-6
