"""Synthetic skills for the toy world: tiny exact-answer tasks, prompt sets and a verifier reward.

Every prompt is `"<skill>: <argument>"` in printable ASCII, e.g. `"reverse: banana"` -> `"ananab"`,
`"add: 17+25"` -> `"42"`. Source models are trained as specialists on different skills so that
fusion into the target has something to gain; `verifier_reward` scores their responses.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_REWARD_WRONG = 0.9
"""Highest reward a wrong (non-exact) response can get; an exact answer gets 1.0."""

_PROMPT_RE = re.compile(r"([a-z_]+): (.+)")


@dataclass(frozen=True)
class Skill:
    """One synthetic task: how to draw an argument, which arguments are valid, and the exact answer."""

    name: str
    draw: Callable[[random.Random], str]
    """Draw a random argument (the text after `"<name>: "`)."""
    argument_pattern: str
    """Regex (full match) of arguments `solve` accepts; drawn arguments always match it."""
    answer: Callable[[str], str]
    """Exact answer for a valid argument."""
    size: int
    """Number of distinct arguments `draw` can produce (bounds how many unique prompts exist)."""

    def make(self, rng: random.Random) -> tuple[str, str]:
        """Draw one `(prompt, answer)` pair from `rng`."""
        argument = self.draw(rng)
        return f"{self.name}: {argument}", self.answer(argument)


def _word(rng: random.Random, low: int = 3, high: int = 8) -> str:
    """Random lowercase letter string of `low`..`high` letters."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _digits(rng: random.Random, low: int = 4, high: int = 8) -> str:
    """Random digit string of `low`..`high` digits (leading zeros allowed)."""
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(low, high)))


def _sum(argument: str) -> str:
    """Answer of `add`: the decimal sum of `"a+b"`."""
    left, right = argument.split("+")
    return str(int(left) + int(right))


def _shift(word: str) -> str:
    """Answer of `caesar`: each lowercase letter moved one place on, `z` wrapping to `a`."""
    return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)


_WORDS = sum(26**k for k in range(3, 9))
_DIGIT_STRINGS = sum(10**k for k in range(4, 9))

SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("reverse", _word, r"[a-z]+", lambda w: w[::-1], _WORDS),
        Skill("sort_digits", _digits, r"[0-9]+", lambda d: "".join(sorted(d)), _DIGIT_STRINGS),
        Skill(
            "add",
            lambda rng: f"{rng.randint(0, 999)}+{rng.randint(0, 999)}",
            r"[0-9]{1,6}\+[0-9]{1,6}",
            _sum,
            1000 * 1000,
        ),
        Skill("upper", _word, r"[a-z]+", str.upper, _WORDS),
        Skill("max_digit", _digits, r"[0-9]+", lambda d: max(d), _DIGIT_STRINGS),
        Skill("caesar", _word, r"[a-z]+", _shift, _WORDS),
    )
}


def parse_prompt(prompt: str) -> tuple[str, str]:
    """Split a toy prompt into `(skill_name, argument)`; ValueError naming the prompt if it is not one.

    Surrounding whitespace is ignored; the argument must fully match the skill's `argument_pattern`.
    """
    match = _PROMPT_RE.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a toy skill prompt (expected '<skill>: <argument>'): {prompt!r}")
    name, argument = match.groups()
    skill = SKILLS.get(name)
    if skill is None:
        raise ValueError(f"unknown toy skill {name!r} in prompt {prompt!r}; known: {sorted(SKILLS)}")
    if re.fullmatch(skill.argument_pattern, argument) is None:
        raise ValueError(
            f"bad argument for toy skill {name!r} in prompt {prompt!r}; expected /{skill.argument_pattern}/"
        )
    return name, argument


def solve(prompt: str) -> str:
    """Exact answer of a toy prompt (ValueError if it is not one)."""
    name, argument = parse_prompt(prompt)
    return SKILLS[name].answer(argument)


def make_prompts(skill_names: Sequence[str], n: int, seed: int) -> list[dict[str, str]]:
    """Build `n` unique toy rows `{"prompt", "answer", "skill"}`, deterministic in `seed`.

    Rows cycle through `skill_names` in order (row `i` has skill `skill_names[i % k]`), so counts
    per skill differ by at most one, in the whole list and in every prefix. Duplicate draws are
    retried; ValueError if a skill cannot supply its share of unique prompts, or on unknown,
    repeated or no skill names.
    """
    names = list(skill_names)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not names:
        raise ValueError("make_prompts needs at least one skill name")
    unknown = [name for name in names if name not in SKILLS]
    if unknown:
        raise ValueError(f"unknown toy skills {unknown}; known: {sorted(SKILLS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"skill names repeat: {names}")
    for index, name in enumerate(names):
        share = len(range(index, n, len(names)))
        if share > SKILLS[name].size:
            raise ValueError(
                f"toy skill {name!r} has only {SKILLS[name].size} distinct prompts; "
                f"{share} requested (n={n} over {len(names)} skills)"
            )

    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for i in range(n):
        skill = SKILLS[names[i % len(names)]]
        for _ in range(10_000):
            prompt, answer = skill.make(rng)
            if prompt not in seen:
                break
        else:  # pragma: no cover - only when a share is close to the skill's size
            raise ValueError(f"could not draw a new unique prompt for toy skill {skill.name!r} (n={n})")
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": answer, "skill": skill.name})
    return rows


def _levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def verifier_reward(prompt: str, response: str) -> float:
    """Reward of `response` to a toy prompt: 1.0 if exact (whitespace-stripped), else partial credit.

    Partial credit is `0.9 * (1 - levenshtein / max(len))`, in [0, 0.9): closer wrong answers score
    higher and length differences cost edits. An empty response scores 0.0. ValueError if `prompt`
    is not a toy prompt.
    """
    answer = solve(prompt)
    given = response.strip()
    if given == answer:
        return 1.0
    if not given:
        return 0.0
    similarity = 1.0 - _levenshtein(given, answer) / max(len(given), len(answer))
    return MAX_REWARD_WRONG * similarity


def score_batch(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """`verifier_reward` for each `(prompt, response)` pair; ValueError if the lengths differ."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [verifier_reward(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]


def is_correct(prompt: str, response: str) -> bool:
    """Whether `response` is the exact answer to a toy prompt (surrounding whitespace ignored)."""
    return response.strip() == solve(prompt)


def accuracy_by_skill(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per skill, keyed in first-seen order; ValueError if the lengths differ."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    totals: dict[str, list[int]] = {}
    for prompt, response in zip(prompts, responses, strict=True):
        counts = totals.setdefault(parse_prompt(prompt)[0], [0, 0])
        counts[0] += is_correct(prompt, response)
        counts[1] += 1
    return {name: correct / total for name, (correct, total) in totals.items()}
