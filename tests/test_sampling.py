"""HF sampler: per-sample seeds reproduce samples whatever the batch, n per prompt, finish reasons."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from wrpo_core.config import SamplingConfig
from wrpo_core.sampling import HFSampler, sample_seed
from wrpo_core.sampling.hf import PerRowSampling

PROMPTS = ["reverse: abc", "add: 1+2", "upper: dog", "max_digit: 4821", "caesar: xyz"]
IDS = [f"p{i}" for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def sampler(model, tokenizer, batch_size, **sampling):
    cfg = SamplingConfig(**{"n": 3, "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, **sampling})
    return HFSampler(model, tokenizer, "tiny", cfg, batch_size=batch_size, progress=False)


def rows(table):
    return sorted(
        zip(*(table[c].to_pylist() for c in ("prompt_id", "sample_index", "text", "seed")), strict=True)
    )


def test_samples_reproduce_whatever_the_batch_size(model, toy_tokenizer):
    a, report = sampler(model, toy_tokenizer, batch_size=5).sample(IDS, PROMPTS)
    b, _ = sampler(model, toy_tokenizer, batch_size=2).sample(IDS, PROMPTS)
    assert a.num_rows == 15 and report.samples == 15
    assert rows(a) == rows(b)
    texts = {t for _, _, t, _ in rows(a)}
    assert len(texts) > 5, "samples of an untrained model at temperature 1 should differ"
    assert set(a["finish_reason"].to_pylist()) <= {"stop", "length"}
    for pid, k, _, seed in rows(a):
        assert seed == sample_seed(42, "tiny", pid, k)


def test_another_seed_changes_samples(model, toy_tokenizer):
    a, _ = sampler(model, toy_tokenizer, batch_size=5).sample(IDS, PROMPTS)
    b, _ = sampler(model, toy_tokenizer, batch_size=5, seed=7).sample(IDS, PROMPTS)
    assert [t for *_, t, _ in rows(a)] != [t for *_, t, _ in rows(b)]


def test_greedy_samples_match_plain_generate(model, toy_tokenizer):
    table, _ = sampler(model, toy_tokenizer, batch_size=5, temperature=0.0, n=1).sample(IDS[:1], PROMPTS[:1])
    ids = toy_tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=toy_tokenizer.eos_token_id)
    expected = toy_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert table["text"][0].as_py() == expected
    assert table["prompt_tokens"][0].as_py() == ids.shape[1]


def test_length_finish_and_token_counts(model, toy_tokenizer):
    table, report = sampler(model, toy_tokenizer, batch_size=5, max_new_tokens=2).sample(IDS, PROMPTS)
    for reason, tokens in zip(
        table["finish_reason"].to_pylist(), table["completion_tokens"].to_pylist(), strict=True
    ):
        assert tokens <= 2
        assert reason == "stop" or tokens == 2
    assert report.finished_by_length == table["finish_reason"].to_pylist().count("length")


def test_empty_prompt_skipped_and_long_prompt_truncated(model, toy_tokenizer):
    s = sampler(model, toy_tokenizer, batch_size=4, n=1)
    s.max_prompt_tokens = 20
    table, report = s.sample(["e", "long", "ok"], ["   ", "reverse: " + "a" * 50, "add: 1+1"])
    assert report.prompts_skipped_empty == 1 and report.skipped_ids == ["e"]
    assert report.prompts_truncated == 1
    assert sorted(table["prompt_id"].to_pylist()) == ["long", "ok"]
    assert max(table["prompt_tokens"].to_pylist()) == 20


def test_top_p_keeps_only_the_nucleus():
    """0.6 + 0.3 reaches 0.8: only tokens 0 and 1 are ever forced, over 200 generated positions."""
    scores = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    processor = PerRowSampling([sample_seed(0, "m", "p", 0)], temperature=1.0, top_p=0.8, prompt_width=3)
    drawn = {
        int(processor(torch.zeros((1, 3 + step), dtype=torch.long), scores).argmax()) for step in range(200)
    }
    assert drawn == {0, 1}


def test_a_sample_is_the_same_alone_or_among_other_prompts(model, toy_tokenizer):
    alone, _ = sampler(model, toy_tokenizer, batch_size=5).sample(IDS[2:3], PROMPTS[2:3])
    among, _ = sampler(model, toy_tokenizer, batch_size=5).sample(IDS, PROMPTS)
    assert rows(alone) == [r for r in rows(among) if r[0] == IDS[2]]
    assert len({text for _, _, text, _ in rows(alone)}) > 1


def test_shared_prompt_prefill_samples_like_one_sample_per_prompt(model, toy_tokenizer):
    """n = 3 runs each prompt once and copies its KV cache to 3 rows; n = 1 lets generate prefill: same tokens."""
    three, _ = sampler(model, toy_tokenizer, batch_size=5, n=3).sample(IDS, PROMPTS)
    one, _ = sampler(model, toy_tokenizer, batch_size=5, n=1).sample(IDS, PROMPTS)
    assert rows(one) == [r for r in rows(three) if r[1] == 0]


def test_vllm_sampler_up_to_the_engine_call(toy_tokenizer, monkeypatch):
    """vLLM cannot run here: a stand-in engine checks the requests and maps its outputs to rows."""
    import sys
    import types

    from wrpo_core.config import ModelSpec
    from wrpo_core.sampling.vllm import VLLMSampler

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    fake = types.ModuleType("vllm")
    fake.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)

    eot = toy_tokenizer.eos_token_id
    chars = toy_tokenizer("cbaaa", add_special_tokens=False)["input_ids"]

    class Engine:
        def generate(self, prompts, params, use_tqdm):
            self.prompts, self.params = prompts, params
            # The text is decoded from the ids up to the end token, whatever vLLM's own text holds.
            done = types.SimpleNamespace(text="cba<|end|>", token_ids=[*chars[:3], eot], finish_reason="stop")
            cut = types.SimpleNamespace(text="cbaaa", token_ids=chars, finish_reason="length")
            return [types.SimpleNamespace(outputs=[done if i % 2 == 0 else cut]) for i in range(len(prompts))]

    spec = ModelSpec(
        path="org/m", name="m", backend="vllm", sampling={"n": 2, "max_new_tokens": 5, "seed": 3}
    )
    engine = Engine()
    table, report = VLLMSampler(engine, toy_tokenizer, spec, progress=False).sample(
        ["a", "e"], ["reverse: abc", " "]
    )
    expected_ids = toy_tokenizer(
        toy_tokenizer.apply_chat_template([{"role": "user", "content": "reverse: abc"}], tokenize=False,
                                          add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]  # fmt: skip
    assert [p["prompt_token_ids"] for p in engine.prompts] == [expected_ids, expected_ids]
    assert expected_ids.count(toy_tokenizer.bos_token_id) == 1
    first = engine.params[0]
    assert (first.n, first.temperature, first.top_p, first.max_tokens) == (1, 0.8, 0.95, 5)
    assert first.stop_token_ids == [toy_tokenizer.eos_token_id]
    assert [p.seed for p in engine.params] == [sample_seed(3, "m", "a", 0), sample_seed(3, "m", "a", 1)]
    assert table["finish_reason"].to_pylist() == ["stop", "length"]
    assert table["text"].to_pylist() == ["cba", "cbaaa"]
    assert table["completion_tokens"].to_pylist() == [4, 5]
    assert table["sample_index"].to_pylist() == [0, 1]
    assert report.prompts_skipped_empty == 1 and report.finished_by_length == 1


def test_vllm_sampler_stops_on_every_end_token_of_the_generation_config(toy_tokenizer, monkeypatch):
    import sys
    import types

    from transformers import GenerationConfig

    from wrpo_core.config import ModelSpec
    from wrpo_core.sampling.vllm import VLLMSampler

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    other = toy_tokenizer.convert_tokens_to_ids("</s>")
    chars = toy_tokenizer("ok", add_special_tokens=False)["input_ids"]

    class Engine:
        def generate(self, prompts, params, use_tqdm):
            self.params = params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                text="ok</s>", token_ids=[*chars, other], finish_reason="stop")])]  # fmt: skip

    engine = Engine()
    spec = ModelSpec(path="org/m", name="m", backend="vllm", sampling={"n": 1})
    sampler = VLLMSampler(engine, toy_tokenizer, spec, GenerationConfig(eos_token_id=[other]), progress=False)
    table, _ = sampler.sample(["a"], ["reverse: abc"])
    assert engine.params[0].stop_token_ids == [toy_tokenizer.eos_token_id, other]
    assert engine.params[0].max_tokens == 4096
    assert table["text"].to_pylist() == ["ok"] and table["completion_tokens"].to_pylist() == [3]


def test_vllm_requests_fit_the_engines_max_model_len(toy_tokenizer, monkeypatch):
    """A real engine says how long a sequence may be (model_config.max_model_len): long prompts are
    cut to half of it with the 4096 default, and each request's max_tokens is what its prompt leaves."""
    import sys
    import types

    from wrpo_core.config import ModelSpec
    from wrpo_core.sampling.vllm import VLLMSampler

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    chars = toy_tokenizer("ok", add_special_tokens=False)["input_ids"]

    class Engine:
        llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=128))

        def generate(self, prompts, params, use_tqdm):
            self.prompts, self.params = prompts, params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                text="ok", token_ids=chars, finish_reason="length")]) for _ in prompts]  # fmt: skip

    engine = Engine()
    spec = ModelSpec(path="org/m", name="m", backend="vllm", sampling={"n": 1})  # max_new_tokens 4096
    _, report = VLLMSampler(engine, toy_tokenizer, spec, progress=False).sample(
        ["long", "short"], ["reverse: " + "abcdefgh" * 40, "upper: hi"]
    )
    lengths = [len(p["prompt_token_ids"]) for p in engine.prompts]
    assert max(lengths) == 64 and report.prompts_truncated == 1  # half of 128 kept for the response
    assert [p.max_tokens for p in engine.params] == [128 - n for n in lengths]


def test_a_model_naming_its_own_cache_is_prefilled_by_generate(model, toy_tokenizer):
    """generate refuses a given cache next to generation_config.cache_implementation: no shared prefill then."""
    shared, _ = sampler(model, toy_tokenizer, batch_size=5).sample(IDS, PROMPTS)
    before = model.generation_config.cache_implementation
    model.generation_config.cache_implementation = "dynamic"
    try:
        own, _ = sampler(model, toy_tokenizer, batch_size=5).sample(IDS, PROMPTS)
    finally:
        model.generation_config.cache_implementation = before
    assert rows(own) == rows(shared)
