"""Tests for the toy character tokenizer and the tiny Llama builders."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model, tiny_llama_config
from wrpo_core.toy.tokenizer import TOY_CHAT_TEMPLATE, build_char_tokenizer

SAMPLE = "Hi there!\n  x = 3.14; (a, b) -> {c} ~ok?\n\tend"  # \t is outside the vocabulary
TEXT = "Hi there!\n  x = 3.14; (a, b) -> {c} ~ok? 0123456789 \"'`\\|@#$%^&*_+[]<>/\n"
CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course.\nDone."},
]


def test_encode_decode_round_trip_one_id_per_character(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = toy_tokenizer.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert toy_tokenizer.convert_ids_to_tokens(ids) == list(TEXT)
    assert toy_tokenizer.decode(ids) == TEXT
    assert toy_tokenizer.unk_token_id not in ids


def test_unknown_character_maps_to_unk(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = toy_tokenizer.encode(SAMPLE)
    assert len(ids) == len(SAMPLE)
    assert ids[SAMPLE.index("\t")] == toy_tokenizer.unk_token_id
    assert ids.count(toy_tokenizer.unk_token_id) == 1


def test_special_tokens_and_ids(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = toy_tokenizer
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert tok.bos_token == "<s>"
    assert tok.eos_token == "<|end|>"
    assert tok.unk_token == "<unk>"
    assert tok.padding_side == "right"
    assert len(tok) == 8 + 95 + 1
    markers = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<pad>", "<unk>"]
    assert set(markers) <= set(tok.all_special_tokens)
    assert len({tok.convert_tokens_to_ids(m) for m in markers}) == len(markers)
    assert build_char_tokenizer().get_vocab() == tok.get_vocab()


def test_chat_template_renders_expected_string(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    assert toy_tokenizer.chat_template == TOY_CHAT_TEMPLATE
    rendered = toy_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == "<s><|user|>What is 2+2?<|end|><|assistant|>4, of course.\nDone.<|end|>"


def test_chat_template_tokenizes_markers_as_single_ids(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = toy_tokenizer
    ids = tok.apply_chat_template(CONVERSATION, return_dict=False)
    user, assistant, end = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"])
    expected = [
        tok.bos_token_id,
        user,
        *tok.encode("What is 2+2?"),
        end,
        assistant,
        *tok.encode("4, of course.\nDone."),
        end,
    ]
    assert ids == expected
    assert tok.decode(ids, skip_special_tokens=True) == "What is 2+2?4, of course.\nDone."


def test_generation_prompt_ends_with_assistant_marker(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    system_and_user = [{"role": "system", "content": "Be brief."}, CONVERSATION[0]]
    rendered = toy_tokenizer.apply_chat_template(system_and_user, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>"
    ids = toy_tokenizer.apply_chat_template(system_and_user, add_generation_prompt=True, return_dict=False)
    assert ids[-1] == toy_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert ids.count(toy_tokenizer.bos_token_id) == 1


def test_tokenizer_save_load_round_trip(toy_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    toy_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == toy_tokenizer.get_vocab()
    assert loaded.all_special_tokens == toy_tokenizer.all_special_tokens
    assert loaded.all_special_ids == toy_tokenizer.all_special_ids
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(loaded, name) == getattr(toy_tokenizer, name)
    assert loaded.chat_template == TOY_CHAT_TEMPLATE
    assert loaded.padding_side == "right"
    assert loaded.encode(SAMPLE) == toy_tokenizer.encode(SAMPLE)
    assert loaded.decode(loaded.encode(TEXT)) == TEXT
    assert loaded.apply_chat_template(CONVERSATION, return_dict=False) == toy_tokenizer.apply_chat_template(
        CONVERSATION, return_dict=False
    )


def test_tiny_config_matches_tokenizer(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    config = tiny_llama_config(toy_tokenizer, hidden_size=32, num_heads=2)
    assert config.vocab_size == len(toy_tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 7)
    assert config.tie_word_embeddings is True
    assert config.intermediate_size == 128
    assert config.num_attention_heads == 2


def test_tiny_model_is_deterministic_by_seed(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    first = build_tiny_llama(toy_tokenizer, seed=0).state_dict()
    again = build_tiny_llama(toy_tokenizer, seed=0).state_dict()
    other = build_tiny_llama(toy_tokenizer, seed=1).state_dict()
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert all(tensor.dtype == torch.float32 for tensor in first.values())
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert not torch.equal(
        first["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"]
    )


def test_saved_model_gives_identical_logits(toy_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = build_tiny_llama(toy_tokenizer, seed=3)
    path = save_tiny_model(model, toy_tokenizer, tmp_path / "model")
    assert (Path(path) / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.dtype == torch.float32
    input_ids = torch.tensor([toy_tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)
    assert AutoTokenizer.from_pretrained(path).get_vocab() == toy_tokenizer.get_vocab()


def test_generate_with_left_padding(tiny_model_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.eval()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True
        )
        for c in ("hi", "a much longer prompt")
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"][0, 0].item() == 0  # the short prompt is padded on the left
    assert batch["input_ids"][0, 0].item() == tokenizer.pad_token_id
    new_tokens = 4
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    assert out.shape[0] == 2
    assert prompt_len < out.shape[1] <= prompt_len + new_tokens
    assert torch.equal(out[:, :prompt_len], batch["input_ids"])
    assert int(out.min()) >= 0 and int(out.max()) < len(tokenizer)
    # Left padding must not change what greedy decoding produces for the short prompt.
    single = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        alone = model.generate(**single, max_new_tokens=new_tokens, do_sample=False)
    generated = alone.shape[1] - single["input_ids"].shape[1]
    assert torch.equal(alone[0, -generated:], out[0, prompt_len : prompt_len + generated])
