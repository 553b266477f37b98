"""Chat-template tokenization, truncation, the collator and summed log-probs."""

import copy

import pytest
import torch

from wrpo_core.logprobs import sequence_logps
from wrpo_core.tokenization import (
    IGNORE_INDEX,
    ResponseCollator,
    encode_example,
    end_of_turn_id,
    stop_token_ids,
    template_end_of_turn_id,
    truncate,
)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_and_response_split_at_assistant_header(toy_tokenizer):
    tok = toy_tokenizer
    out = encode_example(tok, "ab", ["cd", "xyz"], max_length=64, max_prompt_length=32)
    assert out.prompt_ids == ids(tok, "<s><|user|>ab<|end|><|assistant|>")
    assert out.response_ids == [ids(tok, "cd<|end|>"), ids(tok, "xyz<|end|>")]
    assert tok.decode(out.prompt_ids + out.response_ids[0]) == tok.apply_chat_template(
        [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}], tokenize=False
    )
    assert not out.prompt_truncated and out.responses_truncated == 0


def test_exactly_one_end_of_turn_with_trailing_template_text(toy_tokenizer):
    # A Qwen-like template writes "\n" after the end-of-turn token: it must not become a label.
    tok = copy.deepcopy(toy_tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    eot = end_of_turn_id(tok)
    out = encode_example(tok, "ab", ["cd"], max_length=64, max_prompt_length=32)
    assert out.response_ids[0] == ids(tok, "cd<|end|>")
    assert out.response_ids[0].count(eot) == 1


def test_end_of_turn_appended_when_template_has_none(toy_tokenizer):
    tok = copy.deepcopy(toy_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    out = encode_example(tok, "ab", ["cd"], max_length=64, max_prompt_length=32)
    assert out.response_ids[0] == [*ids(tok, "cd\n"), end_of_turn_id(tok)]


def test_prompt_truncated_from_left_keeping_bos(toy_tokenizer):
    tok = toy_tokenizer
    out = encode_example(tok, "0123456789" * 3, ["abcdef"], max_length=20, max_prompt_length=12)
    full_prompt = ids(tok, "<s><|user|>" + "0123456789" * 3 + "<|end|><|assistant|>")
    assert out.prompt_truncated
    assert len(out.prompt_ids) == 12
    assert out.prompt_ids[0] == tok.bos_token_id
    assert out.prompt_ids[1:] == full_prompt[-11:]
    assert out.response_ids[0] == ids(tok, "abcdef<|end|>")  # 12 + 7 fits in 20


def test_response_cut_when_still_too_long():
    out = truncate([1, 5, 5, 5], [[9] * 10, [8] * 3], max_length=8, max_prompt_length=2, bos_id=1)
    assert out.prompt_ids == [1, 5]
    assert out.response_ids == [[9] * 6, [8] * 3]
    assert out.responses_truncated == 1


def test_no_truncation_when_it_fits():
    out = truncate([1, 5, 5, 5], [[9] * 4], max_length=8, max_prompt_length=2, bos_id=1)
    assert out.prompt_ids == [1, 5, 5, 5] and out.response_ids == [[9] * 4]


def test_missing_chat_template_is_named(toy_tokenizer):
    tok = copy.deepcopy(toy_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        encode_example(tok, "ab", ["cd"], max_length=64, max_prompt_length=32)


def test_collator_is_response_major_and_masks_prompt():
    collate = ResponseCollator(pad_token_id=0)
    batch = collate(
        [
            {"prompt_ids": [1, 2], "response_ids": [[3], [4, 4], [5]], "ref_logps": [-1.0, -2.0, -3.0]},
            {"prompt_ids": [1, 2, 2], "response_ids": [[6], [7], [8, 8, 8]], "ref_logps": [-4.0, -5.0, -6.0]},
        ]
    )
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 0, 0, 0],
        [1, 2, 2, 6, 0, 0],
        [1, 2, 4, 4, 0, 0],
        [1, 2, 2, 7, 0, 0],
        [1, 2, 5, 0, 0, 0],
        [1, 2, 2, 8, 8, 8],
    ]
    m = IGNORE_INDEX
    assert batch["labels"][1].tolist() == [m, m, m, 6, m, m]
    assert batch["labels"][5].tolist() == [m, m, m, 8, 8, 8]
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]


def test_sequence_logps_against_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, IGNORE_INDEX], [IGNORE_INDEX, 2, 2, 6, 0]])
    total, count = sequence_logps(logits, labels)
    for row in range(2):
        expected = 0.0
        for t in range(1, 5):
            if labels[row, t] != IGNORE_INDEX:
                expected += torch.log_softmax(logits[row, t - 1], -1)[labels[row, t]].item()
        assert total[row].item() == pytest.approx(expected, abs=1e-5)
    assert count.tolist() == [2, 4]


def test_end_of_turn_is_the_templates_even_when_eos_differs(toy_tokenizer):
    # Like Gemma-2 (<eos> vs <end_of_turn>) or Phi-3 (<|endoftext|> vs <|end|>): labels and stops need <|end|>.
    tok = copy.deepcopy(toy_tokenizer)
    tok.eos_token = "</s>"
    end = tok.convert_tokens_to_ids("<|end|>")
    assert template_end_of_turn_id(tok) == end == end_of_turn_id(tok) != tok.eos_token_id
    out = encode_example(tok, "ab", ["cd"], max_length=64, max_prompt_length=32)
    assert out.response_ids[0] == ids(tok, "cd<|end|>")
    assert end_of_turn_id(tok, "</s>") == tok.eos_token_id  # an explicit token still wins


def test_end_of_turn_needs_a_template_that_writes_the_reply(toy_tokenizer):
    tok = copy.deepcopy(toy_tokenizer)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{% endfor %}"
    with pytest.raises(ValueError, match="does not write the assistant message's content"):
        end_of_turn_id(tok)


def test_stop_tokens_add_every_generation_config_end_token(toy_tokenizer):
    from transformers import GenerationConfig

    tok = toy_tokenizer
    end, other = tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("</s>")
    assert stop_token_ids(tok) == [end]
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=other)) == [end, other]
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[other, end])) == [end, other]
    assert stop_token_ids(tok, GenerationConfig()) == [end]
