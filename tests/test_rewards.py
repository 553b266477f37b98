"""Reward scoring: HF sequence classifier batched by length, toy verifier, non-finite scores."""

import math

import pyarrow as pa
import pytest
from transformers import LlamaForSequenceClassification

from wrpo_core.config import RewardModelSpec
from wrpo_core.rewards import SequenceClassifierScorer, ToyVerifierScorer, score_samples
from wrpo_core.schemas import DataError
from wrpo_core.toy.tiny_models import tiny_llama_config

PROMPTS = ["reverse: abc", "add: 1+2", "upper: dog", "a much longer prompt " * 3]
RESPONSES = ["cba", "3", "DOG!", "x" * 40]


@pytest.fixture(scope="module")
def classifier_dir(toy_tokenizer, tmp_path_factory):
    config = tiny_llama_config(toy_tokenizer)
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    toy_tokenizer.save_pretrained(path)
    return str(path)


def test_scores_do_not_depend_on_batch_size(classifier_dir):
    one = SequenceClassifierScorer(RewardModelSpec(path=classifier_dir, batch_size=1), progress=False)
    four = SequenceClassifierScorer(RewardModelSpec(path=classifier_dir, batch_size=4), progress=False)
    a, b = one.score(PROMPTS, RESPONSES), four.score(PROMPTS, RESPONSES)
    assert a == pytest.approx(b, abs=1e-5)
    assert len(set(a)) == 4


def test_long_conversation_truncated_from_the_left(classifier_dir):
    scorer = SequenceClassifierScorer(RewardModelSpec(path=classifier_dir, max_length=16), progress=False)
    # Same last 16 tokens -> same score, although the prompts differ at the start.
    a, b = scorer.score(["A" * 30 + "q" * 20, "B" * 30 + "q" * 20], ["resp", "resp"])
    c = scorer.score(["A" * 30 + "q" * 3], ["resp"])[0]
    assert c != pytest.approx(a, abs=1e-6)
    assert a == pytest.approx(b, abs=1e-6)


def samples(texts):
    n = len(texts)
    return pa.table(
        {
            "prompt_id": ["p0", "p1"][:n],
            "model": ["m"] * n,
            "sample_index": pa.array(range(n), pa.int32()),
            "text": texts,
        }
    )


def test_score_samples_with_toy_verifier():
    table = score_samples(
        samples(["cba", "4"]), {"p0": "reverse: abc", "p1": "add: 1+2"}, ToyVerifierScorer()
    )
    scores = table["score"].to_pylist()
    assert scores[0] == 1.0 and scores[1] < 1.0
    assert table["reward_model"].to_pylist() == ["toy-verifier"] * 2


class NaNScorer:
    name = "broken-rm"

    def score(self, prompts, responses):
        return [0.5, math.nan]


def test_non_finite_score_names_the_sample():
    with pytest.raises(DataError, match=r"broken-rm .* nan .*prompt_id=p1, model=m, sample_index=1"):
        score_samples(samples(["a", "b"]), {"p0": "x", "p1": "y"}, NaNScorer())


def test_missing_prompt_is_named():
    with pytest.raises(DataError, match="prompt_id p1 has no prompt text"):
        score_samples(samples(["a", "b"]), {"p0": "x"}, ToyVerifierScorer())


def test_reward_model_loads_at_its_revision(classifier_dir, toy_tokenizer, tmp_path, monkeypatch):
    """An offline hub cache holds two commits of one reward model: the spec's revision picks the scorer."""
    import huggingface_hub.constants

    from wrpo_core.toy.families import add_to_hub_cache

    config = tiny_llama_config(toy_tokenizer)
    config.num_labels = 1
    other = LlamaForSequenceClassification(config)
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    toy_tokenizer.save_pretrained(other_dir)
    add_to_hub_cache(classifier_dir, tmp_path / "hub", "org/rm", commit="a" * 40, refs=("main",))
    add_to_hub_cache(other_dir, tmp_path / "hub", "org/rm", commit="b" * 40, refs=("v2",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def scores(path, revision=None):
        spec = RewardModelSpec(path=path, revision=revision)
        return SequenceClassifierScorer(spec, device="cpu", progress=False).score(PROMPTS, RESPONSES)

    assert scores("org/rm") == pytest.approx(scores(classifier_dir), abs=1e-6)
    at_v2 = scores("org/rm", "v2")
    assert at_v2 == pytest.approx(scores(str(other_dir)), abs=1e-6)
    assert at_v2 != pytest.approx(scores(classifier_dir), abs=1e-6)
    assert (
        SequenceClassifierScorer(RewardModelSpec(path="org/rm", revision="v2"), progress=False).name
        == "org/rm@v2"
    )
