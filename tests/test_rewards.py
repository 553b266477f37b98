"""Reward scoring: HF sequence classifier batched by length, toy verifier, non-finite scores, pad choice."""

import dataclasses
import math

import pyarrow as pa
import pytest
import torch
from transformers import LlamaForSequenceClassification

from wrpo_core.config import RewardModelSpec
from wrpo_core.rewards import (
    SequenceClassifierScorer,
    ToyVerifierScorer,
    choose_pad_id,
    length_classes,
    prefix_batches,
    score_samples,
    shared_prefix_length,
    shares_prefixes,
)
from wrpo_core.schemas import DataError
from wrpo_core.toy.families import FAMILIES, build_family_tokenizer
from wrpo_core.toy.tiny_models import tiny_llama_config

PROMPTS = ["reverse: abc", "add: 1+2", "upper: dog", "a much longer prompt " * 3]
RESPONSES = ["cba", "3", "DOG!", "x" * 40]


def save_classifier(tokenizer, path, seed: int | None = None) -> str:
    """A tiny random Llama sequence classifier (one label; weights from `seed`, default 0) and `tokenizer`."""
    config = tiny_llama_config(tokenizer)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def classifier_dir(toy_tokenizer, tmp_path_factory):
    return save_classifier(toy_tokenizer, tmp_path_factory.mktemp("rm"))


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

    other_dir = save_classifier(toy_tokenizer, tmp_path / "other", seed=7)  # other weights
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


def test_pad_id_is_the_dedicated_pad_when_free_else_the_highest_free_id():
    rows = [[5, 6, 9], [1, 9]]
    assert choose_pad_id(rows, preferred=0, special_ids={1, 2}, size=10) == 0  # dedicated, unused
    assert choose_pad_id(rows, preferred=2, special_ids={1, 2}, size=10) == 8  # EOS-like: another special
    assert choose_pad_id(rows, preferred=5, special_ids={1, 2}, size=10) == 8  # occurs in a row
    assert choose_pad_id(rows, preferred=None, special_ids=set(), size=7) == 4
    with pytest.raises(DataError, match="use all 3 token ids"):
        choose_pad_id([[0, 1], [2]], preferred=None, special_ids=set(), size=3)


@pytest.fixture(scope="module")
def eos_in_text_classifier_dir(tmp_path_factory):
    """A Llama classifier whose tokenizer has no pad and whose EOS (<|eot_id|>) ends every chat turn."""
    tokenizer = build_family_tokenizer(dataclasses.replace(FAMILIES["llama3"], eos_token="<|eot_id|>"))
    return save_classifier(tokenizer, tmp_path_factory.mktemp("rm_eos"), seed=1)


def test_batched_scores_read_the_last_real_token_when_eos_is_in_the_text(eos_in_text_classifier_dir):
    """A standard classifier pools at the last non-pad token: with an EOS pad it skipped the closing <|eot_id|>."""
    prompts = [f"q{i} " * (i % 7 + 1) + "<|eot_id|> more" * (i % 2) for i in range(12)]
    responses = [f"answer {i}" * (i % 5 + 1) for i in range(12)]
    one = SequenceClassifierScorer(
        RewardModelSpec(path=eos_in_text_classifier_dir, batch_size=1), progress=False
    )
    four = SequenceClassifierScorer(
        RewardModelSpec(path=eos_in_text_classifier_dir, batch_size=4), progress=False
    )
    a, b = one.score(prompts, responses), four.score(prompts, responses)
    # Independent reference: one unpadded conversation, pad_token_id None -> the last token's logit.
    model = four.model
    model.config.pad_token_id = None
    with torch.inference_mode():
        reference = [
            float(
                model(
                    input_ids=torch.tensor([four.tokenizer(t, add_special_tokens=False)["input_ids"]])
                ).logits[0, 0]
            )
            for t in four._texts(prompts, responses)
        ]
    assert a == pytest.approx(reference, abs=1e-5) and b == pytest.approx(reference, abs=1e-5)
    assert four.tokenizer.pad_token_id is None and four.pad_token_id != four.tokenizer.eos_token_id
    model.config.pad_token_id = four.tokenizer.eos_token_id  # what the EOS fallback did: another token
    with torch.inference_mode():
        at_eos = [
            float(
                model(
                    input_ids=torch.tensor([four.tokenizer(t, add_special_tokens=False)["input_ids"]])
                ).logits[0, 0]
            )
            for t in four._texts(prompts, responses)
        ]
    assert all(abs(x - y) > 1e-4 for x, y in zip(at_eos, reference, strict=True))


def whole_conversation_scores(scorer: SequenceClassifierScorer, prompts, responses) -> list[float]:
    """Independent reference: each conversation alone, unpadded, pad_token_id None (the last token's logit)."""
    model = scorer.model
    saved, model.config.pad_token_id = model.config.pad_token_id, None
    try:
        with torch.inference_mode():
            return [
                float(model(input_ids=torch.tensor([ids])).logits[0, 0])
                for ids in scorer.tokenizer(
                    scorer._texts(prompts, responses),
                    add_special_tokens=False,
                    truncation=True,
                    max_length=scorer.max_length,
                )["input_ids"]
            ]
    finally:
        model.config.pad_token_id = saved


def test_a_prompts_shared_prefix_is_run_once_and_scores_like_whole_conversations(classifier_dir):
    """Four prompts x several responses (one prompt alone, one response twice), batches of 5 conversations."""
    prompts = ["reverse: abcdef"] * 4 + ["add: 12+30"] * 3 + ["upper: dog"] + ["a longer prompt " * 3] * 4
    responses = [
        "fedcba",
        "f",
        "fedcba" * 4,
        "fedcba",
        "42",
        "4",
        "42 is the sum",
        "DOG",
        "x",
        "y" * 30,
        "zz",
        "x",
    ]
    scorer = SequenceClassifierScorer(RewardModelSpec(path=classifier_dir, batch_size=5), progress=False)
    assert scorer.shares_prefixes
    embedded = []
    hook = scorer.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: embedded.append(int((args[0] != scorer.pad_token_id).sum()))
    )
    try:
        shared = scorer.score(prompts, responses)
    finally:
        hook.remove()
    reference = whole_conversation_scores(scorer, prompts, responses)
    assert shared == pytest.approx(reference, abs=1e-5)
    whole = sum(len(ids) for ids in scorer.tokenizer(scorer._texts(prompts, responses))["input_ids"])
    assert (
        sum(embedded) < 0.75 * whole
    )  # the prompts' tokens went through the model once per batch, not per row


def test_shared_prefixes_with_conversations_cut_from_the_left(classifier_dir):
    prompts = ["q" * 30 + "tail"] * 3 + ["short"] * 2
    responses = ["abc", "abcdefgh" * 3, "z", "1", "22"]
    scorer = SequenceClassifierScorer(
        RewardModelSpec(path=classifier_dir, batch_size=8, max_length=24), progress=False
    )
    assert scorer.score(prompts, responses) == pytest.approx(
        whole_conversation_scores(scorer, prompts, responses), abs=1e-5
    )


def test_shared_prefix_length_leaves_every_row_a_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2]]) == 1  # identical rows: the last token stays each row's own
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0


def test_prefix_batches_keep_a_prompts_conversations_together():
    encoded = [[1, 2, 3, 9], [5, 6], [1, 2, 3, 8, 8], [5, 7], [4]]
    batches = prefix_batches(encoded, ["a", "b", "a", "b", "c"], batch_size=3)
    assert sorted(sorted(b) for b in batches) == [[(0, 3), (2, 3)], [(1, 1), (3, 1), (4, 0)]]
    assert sorted(i for b in batches for i, _ in b) == [0, 1, 2, 3, 4] and all(len(b) <= 3 for b in batches)


def test_only_transformers_own_classifiers_share_prefixes(toy_tokenizer):
    """Custom code (ArmoRM's pools and gates on positions of the whole conversation) is scored whole."""
    config = tiny_llama_config(toy_tokenizer)
    config.num_labels = 1

    class CustomClassifier(LlamaForSequenceClassification):
        pass

    assert shares_prefixes(LlamaForSequenceClassification(config))
    assert not shares_prefixes(CustomClassifier(config))


def test_length_classes_keep_padding_under_half_of_each_pass():
    lengths = [3, 40, 21, 19, 10, 41, 1]
    assert length_classes(lengths) == [[5, 1, 2], [3, 4], [0], [6]]  # 41 40 21 | 19 10 | 3 | 1
    assert length_classes([5, 5, 5]) == [[0, 1, 2]]
