"""Tests for the toy synthetic skills: exact answers, prompt sets and the verifier reward."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from transformers import PreTrainedTokenizerFast

from wrpo_core.toy.skills import (
    MAX_REWARD_WRONG,
    SKILLS,
    Skill,
    accuracy_by_skill,
    is_correct,
    make_prompts,
    parse_prompt,
    score_batch,
    solve,
    verifier_reward,
)

ALL_SKILLS = list(SKILLS)


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("reverse: abc", "cba"),
        ("reverse: banana", "ananab"),
        ("sort_digits: 5213", "1235"),
        ("sort_digits: 90807060", "00006789"),
        ("add: 17+25", "42"),
        ("add: 0+0", "0"),
        ("add: 999+999", "1998"),
        ("upper: cat", "CAT"),
        ("upper: fusion", "FUSION"),
        ("max_digit: 5213", "5"),
        ("max_digit: 00000000", "0"),
        ("caesar: abc", "bcd"),
        ("caesar: lazy", "mbaz"),
        ("caesar: zzz", "aaa"),
    ],
)
def test_solve_hand_checked(prompt: str, answer: str) -> None:
    assert solve(prompt) == answer


def test_at_least_six_skills_and_make_matches_solve() -> None:
    assert len(SKILLS) >= 6
    rng = random.Random(0)
    for name, skill in SKILLS.items():
        assert isinstance(skill, Skill) and skill.name == name
        for _ in range(50):
            prompt, answer = skill.make(rng)
            assert prompt.startswith(f"{name}: ")
            assert parse_prompt(prompt) == (name, prompt.removeprefix(f"{name}: "))
            assert solve(prompt) == answer


def test_skill_is_frozen() -> None:
    with pytest.raises(AttributeError):
        SKILLS["add"].name = "sub"  # type: ignore[misc]


def test_parse_prompt() -> None:
    assert parse_prompt("add: 17+25") == ("add", "17+25")
    assert parse_prompt("  reverse: abc\n") == ("reverse", "abc")


@pytest.mark.parametrize(
    "prompt",
    ["What is 2+2?", "reverse abc", "multiply: 3*4", "reverse: ABC", "add: 17-25", "upper: ", ""],
)
def test_parse_prompt_rejects_non_toy_prompt_naming_it(prompt: str) -> None:
    with pytest.raises(ValueError, match="toy") as excinfo:
        parse_prompt(prompt)
    assert repr(prompt) in str(excinfo.value)
    with pytest.raises(ValueError):
        solve(prompt)


def test_make_prompts_deterministic_by_seed() -> None:
    assert make_prompts(ALL_SKILLS, 60, seed=3) == make_prompts(ALL_SKILLS, 60, seed=3)
    assert make_prompts(ALL_SKILLS, 60, seed=3) != make_prompts(ALL_SKILLS, 60, seed=4)


def test_make_prompts_rows_balanced_unique_and_correct() -> None:
    rows = make_prompts(ALL_SKILLS, 600, seed=0)
    assert len(rows) == 600
    assert all(set(row) == {"prompt", "answer", "skill"} for row in rows)
    assert Counter(row["skill"] for row in rows) == dict.fromkeys(ALL_SKILLS, 100)
    assert len({row["prompt"] for row in rows}) == 600
    for row in rows:
        assert solve(row["prompt"]) == row["answer"]
        assert parse_prompt(row["prompt"])[0] == row["skill"]


def test_make_prompts_uneven_split_and_subset() -> None:
    rows = make_prompts(["add", "upper", "caesar"], 8, seed=1)
    assert [row["skill"] for row in rows] == ["add", "upper", "caesar"] * 2 + ["add", "upper"]
    assert make_prompts(["add"], 0, seed=1) == []


def test_make_prompts_errors() -> None:
    with pytest.raises(ValueError, match="unknown"):
        make_prompts(["reverse", "nope"], 4, seed=0)
    with pytest.raises(ValueError, match="repeat"):
        make_prompts(["add", "add"], 4, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        make_prompts([], 4, seed=0)
    with pytest.raises(ValueError, match="distinct prompts"):
        make_prompts(["add"], 1_000_001, seed=0)


def test_prompts_fit_tokenizer_vocab_and_length(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = make_prompts(ALL_SKILLS, 1200, seed=7)
    for row in rows:
        text = row["prompt"] + row["answer"]
        assert all(" " <= char <= "~" for char in text)
        ids = toy_tokenizer.encode(text)
        assert len(ids) == len(text)
        assert toy_tokenizer.unk_token_id not in ids
        assert len(text) <= 40


def test_verifier_reward_exact_wrong_closer_and_empty() -> None:
    prompt = "reverse: banana"
    assert verifier_reward(prompt, "ananab") == 1.0
    assert verifier_reward(prompt, "  ananab\n") == 1.0
    close, far = verifier_reward(prompt, "ananax"), verifier_reward(prompt, "banana")
    assert 0.0 < far < close < MAX_REWARD_WRONG < 1.0
    assert verifier_reward(prompt, "") == 0.0
    assert verifier_reward(prompt, "   ") == 0.0
    # Length differences are penalised: a correct prefix is worth less than the full answer.
    assert verifier_reward(prompt, "anan") < verifier_reward(prompt, "ananaX")
    assert verifier_reward(prompt, "ananabananab") < MAX_REWARD_WRONG
    assert verifier_reward("add: 17+25", "43") > verifier_reward("add: 17+25", "7")


def test_verifier_reward_range_on_random_responses() -> None:
    rng = random.Random(0)
    rows = make_prompts(ALL_SKILLS, 120, seed=2)
    for row in rows:
        response = "".join(rng.choice("abcXYZ0123+ ") for _ in range(rng.randint(0, 12)))
        reward = verifier_reward(row["prompt"], response)
        assert 0.0 <= reward <= 1.0
        assert (reward == 1.0) == is_correct(row["prompt"], response)
        if reward < 1.0:
            assert reward <= MAX_REWARD_WRONG


def test_score_batch_is_correct_and_accuracy_by_skill() -> None:
    prompts = ["add: 1+2", "add: 2+2", "upper: ab", "caesar: az"]
    responses = ["3", "5", " AB ", "ba"]
    scores = score_batch(prompts, responses)
    assert scores == [verifier_reward(p, r) for p, r in zip(prompts, responses, strict=True)]
    assert scores[0] == 1.0 and scores[1] < 1.0 and scores[2] == 1.0 and scores[3] == 1.0
    assert [is_correct(p, r) for p, r in zip(prompts, responses, strict=True)] == [True, False, True, True]
    assert accuracy_by_skill(prompts, responses) == {"add": 0.5, "upper": 1.0, "caesar": 1.0}
    with pytest.raises(ValueError):
        score_batch(prompts, responses[:-1])
    with pytest.raises(ValueError):
        accuracy_by_skill(prompts, responses[:-1])
