"""Tokenization and sampling on the REAL chat templates and special tokens of the paper's model families.

Each family (wrpo_core.toy.families) is a tiny random Llama whose tokenizer carries the published
template, special tokens and generation-config end tokens of Llama-3-Instruct, Gemma-2-it,
Qwen2-Instruct, Phi-3-medium, Mistral-Instruct and InternLM2.5-chat.
"""

from __future__ import annotations

import pytest
import torch

from wrpo_core.config import ModelSpec
from wrpo_core.models import load_generation_config, load_tokenizer
from wrpo_core.sampling import load_sampler
from wrpo_core.tokenization import (
    IGNORE_INDEX,
    ResponseCollator,
    encode_example,
    end_of_turn_id,
    prompt_text,
    stop_token_ids,
)
from wrpo_core.toy.families import FAMILIES, save_family_model

NAMES = sorted(FAMILIES)
ASSISTANT_HEADER = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma2": "<start_of_turn>model\n",
    "qwen2": "<|im_start|>assistant\n",
    "phi3": "<|assistant|>\n",
    "mistral": " [/INST]",
    "internlm2": "<|im_start|>assistant\n",
}
PROMPT = "Name two colours."
RESPONSES = ["Red and blue.", "Green\nand yellow, I think", "x"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {name: save_family_model(family, root / name) for name, family in FAMILIES.items()}


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    """transformers' own tokenization of a conversation (the reference the encoder must match)."""
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    )


def test_every_family_is_covered():
    assert set(FAMILIES) == set(ASSISTANT_HEADER)
    assert {"llama3", "gemma2", "qwen2", "phi3"} <= set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_end_of_turn_comes_from_the_template_not_eos(name, family_dirs):
    family = FAMILIES[name]
    tokenizer = load_tokenizer(family_dirs[name])
    expected = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert end_of_turn_id(tokenizer) == expected
    # Where the family's eos is another token, eos would be the wrong label and the wrong stop.
    assert (tokenizer.eos_token_id == expected) == (family.eos_token == family.end_of_turn)
    generation_config = load_generation_config(family_dirs[name])
    stops = stop_token_ids(tokenizer, generation_config)
    named = [tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos]
    assert stops[0] == expected
    assert set(stops) == {expected, *named, tokenizer.eos_token_id}
    assert len(stops) == len(set(stops))


@pytest.mark.parametrize("name", NAMES)
def test_prompt_masked_and_one_end_of_turn_per_response(name, family_dirs):
    family = FAMILIES[name]
    tokenizer = load_tokenizer(family_dirs[name])
    eot = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    user = [{"role": "user", "content": PROMPT}]
    out = encode_example(tokenizer, PROMPT, RESPONSES, max_length=512, max_prompt_length=256)

    # The prompt is exactly what the template renders with the generation prompt, header included.
    rendered = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt_text(tokenizer, PROMPT) == rendered
    assert out.prompt_ids == chat_ids(tokenizer, user, add_generation_prompt=True)
    assert tokenizer.decode(out.prompt_ids).endswith(ASSISTANT_HEADER[name])

    # BOS only where the template writes it, once, although the tokenizer may prepend its own.
    bos = tokenizer.bos_token_id
    in_template = family.bos_token is not None and rendered.startswith(family.bos_token)
    assert (out.prompt_ids.count(bos) if bos is not None else 0) == int(in_template)
    if family.adds_bos:
        assert tokenizer(rendered)["input_ids"][:2] == [bos, bos]  # the trap the encoder avoids

    for response, ids in zip(RESPONSES, out.response_ids, strict=True):
        assert ids[-1] == eot and ids.count(eot) == 1
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        end = full.index(family.end_of_turn, len(rendered)) + len(family.end_of_turn)
        assert tokenizer.decode(out.prompt_ids + ids) == full[:end]

    batch = ResponseCollator(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": out.prompt_ids, "response_ids": out.response_ids}]
    )
    n_prompt = len(out.prompt_ids)
    for row, ids in enumerate(out.response_ids):
        labels = batch["labels"][row].tolist()
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt : n_prompt + len(ids)] == ids
        assert set(labels[n_prompt + len(ids) :]) <= {IGNORE_INDEX}


def biased_sampler(path: str, favour: str, suppress: list[int], **sampling):
    """The HF sampler of `path` whose model strongly favours token `favour` and never emits `suppress`.

    Records the raw generated ids so tests can see which token ended each sample.
    """
    spec = ModelSpec(
        path=path, name="fam", sampling={"n": 3, "max_new_tokens": 48, "temperature": 1.0, **sampling}
    )
    sampler = load_sampler(spec, batch_size=8, progress=False)
    model = sampler.model
    bias = torch.zeros(model.config.vocab_size)
    bias[sampler.tokenizer.convert_tokens_to_ids(favour)] = 4.0
    bias[suppress] = float("-inf")
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    generated = []
    original = model.generate

    def generate(**kwargs):
        out = original(**kwargs)
        generated.extend(out[:, kwargs["input_ids"].shape[1] :].tolist())
        return out

    model.generate = generate
    return sampler, generated


def first_stop(tokens: list[int], stops: list[int]) -> int:
    return next(i for i, token in enumerate(tokens) if token in stops)


@pytest.mark.parametrize("name", NAMES)
def test_hf_sampling_stops_at_the_family_end_of_turn(name, family_dirs):
    family = FAMILIES[name]
    tokenizer = load_tokenizer(family_dirs[name])
    eot = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    stops = stop_token_ids(tokenizer, load_generation_config(family_dirs[name]))
    others = [s for s in stops if s != eot]
    sampler, generated = biased_sampler(family_dirs[name], family.end_of_turn, others)
    prompts = [PROMPT, "Say hi."]
    table, report = sampler.sample(["p0", "p1"], prompts)

    assert table["finish_reason"].to_pylist() == ["stop"] * 6 and report.finished_by_length == 0
    assert any(table["text"].to_pylist()), "the biased model should write something before stopping"
    for text in table["text"].to_pylist():
        assert family.end_of_turn not in text
    by_prompt = {p: len(chat_ids(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True))
                 for p in prompts}  # fmt: skip
    ids_of = {"p0": prompts[0], "p1": prompts[1]}
    assert [by_prompt[ids_of[p]] for p in table["prompt_id"].to_pylist()] == table[
        "prompt_tokens"
    ].to_pylist()
    # Rows come back in generation order: each ended at the end-of-turn token, counted once.
    assert len(generated) == 6
    for tokens, count in zip(generated, table["completion_tokens"].to_pylist(), strict=True):
        end = first_stop(tokens, stops)
        assert tokens[end] == eot
        assert count == end + 1


@pytest.mark.parametrize(
    "name", [n for n in NAMES if len(set(FAMILIES[n].generation_eos) - {FAMILIES[n].end_of_turn})]
)
def test_hf_sampling_stops_at_every_generation_config_end_token(name, family_dirs):
    family = FAMILIES[name]
    tokenizer = load_tokenizer(family_dirs[name])
    other = sorted(set(family.generation_eos) - {family.end_of_turn})[0]
    suppress = [tokenizer.convert_tokens_to_ids(t) for t in {family.end_of_turn, family.eos_token} - {other}]
    sampler, generated = biased_sampler(family_dirs[name], other, suppress)
    table, _ = sampler.sample(["p0"], [PROMPT])
    assert table["finish_reason"].to_pylist() == ["stop"] * 3
    other_id = tokenizer.convert_tokens_to_ids(other)
    assert all(other_id in tokens for tokens in generated)
    assert all(other not in text for text in table["text"].to_pylist())


def test_a_model_without_generation_config_stops_on_its_config_eos(family_dirs, tmp_path):
    import shutil

    folder = shutil.copytree(family_dirs["gemma2"], tmp_path / "gemma2")
    (folder / "generation_config.json").unlink()
    tokenizer = load_tokenizer(str(folder))
    generation_config = load_generation_config(str(folder))
    assert generation_config.eos_token_id == tokenizer.eos_token_id  # from config.json, as transformers does
    assert tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, generation_config)) == [
        "<end_of_turn>",
        "<eos>",
    ]


# --- revisions: every loader reads the spec's revision ------------------------------------------

REPO = "wrpo-test/tiny-chat"
MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture()
def hub_cache(family_dirs, tmp_path, monkeypatch):
    """An offline hub cache holding REPO twice: main = the Qwen2 family, tag v2 = the Llama-3 family."""
    import huggingface_hub.constants

    from wrpo_core.toy.families import add_to_hub_cache

    add_to_hub_cache(family_dirs["qwen2"], tmp_path / "hub", REPO, commit=MAIN, refs=("main",))
    add_to_hub_cache(family_dirs["llama3"], tmp_path / "hub", REPO, commit=V2, refs=("v2",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("revision", ["v2", V2])
def test_hf_sampler_loads_everything_at_the_revision(hub_cache, revision):
    default = load_sampler(ModelSpec(path=REPO, name="m"), progress=False)
    assert default.tokenizer.convert_ids_to_tokens(end_of_turn_id(default.tokenizer)) == "<|im_end|>"
    sampler = load_sampler(ModelSpec(path=REPO, name="m", revision=revision), progress=False)
    llama3 = FAMILIES["llama3"]
    assert sampler.tokenizer.chat_template == llama3.chat_template
    assert sampler.model.config.vocab_size == len(sampler.tokenizer) != default.model.config.vocab_size
    stops = stop_token_ids(sampler.tokenizer, sampler.model.generation_config)
    assert sampler.tokenizer.convert_ids_to_tokens(stops) == ["<|eot_id|>", "<|end_of_text|>"]


def test_vllm_sampler_gets_the_revision_for_weights_tokenizer_and_stops(hub_cache, monkeypatch):
    """vLLM cannot run here: a stand-in `vllm.LLM` records what the engine was asked to load."""
    import sys
    import types

    created = {}

    class LLM:
        def __init__(self, **kwargs):
            created.update(kwargs)

    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", fake)
    sampler = load_sampler(ModelSpec(path=REPO, name="m", backend="vllm", revision="v2"), progress=False)
    assert (created["model"], created["revision"], created["tokenizer_revision"]) == (REPO, "v2", "v2")
    assert sampler.tokenizer.chat_template == FAMILIES["llama3"].chat_template
    stops = stop_token_ids(sampler.tokenizer, sampler.generation_config)
    assert sampler.tokenizer.convert_ids_to_tokens(stops) == ["<|eot_id|>", "<|end_of_text|>"]
