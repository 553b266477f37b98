"""The HF sampler's counter-based draws: the hash itself, uniformity, the sampled distribution, top-p, greedy.

Expected values are computed here independently: SplitMix64 on Python integers, and the
temperature / nucleus distribution with `math` on a hand-written logits vector.
"""

import math

import torch

from wrpo_core.sampling.hf import PerRowSampling, sample_tokens, seed_keys, uniform_draws

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (reference for the vectorised uint64 one)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def reference_uniform(seed: int, step: int) -> float:
    """The documented scheme: top 53 bits of mix(mix(seed) ^ mix((step + 1) * gamma)) / 2**53."""
    counter = splitmix64(((step + 1) * GAMMA) & MASK64)
    return (splitmix64(splitmix64(seed) ^ counter) >> 11) / float(1 << 53)


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 19: 43.82}
"""Chi-square critical values with P(chi2 > value) = 0.001, by degrees of freedom."""


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


def test_uniform_draws_equal_splitmix64_on_python_integers():
    seeds = [0, 1, 42, 2**62 + 12345, 2**63 - 1]
    for step in (0, 1, 7, 4095, 10**6):
        got = uniform_draws(seed_keys(seeds), step).tolist()
        assert got == [reference_uniform(seed, step) for seed in seeds]


def test_uniform_draws_are_uniform_over_seeds_and_over_steps():
    seeds = list(range(20_000))
    over_seeds = uniform_draws(seed_keys(seeds), 3)
    over_steps = torch.cat([uniform_draws(seed_keys([123456789]), step) for step in range(20_000)])
    for u in (over_seeds, over_steps):
        assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
        counts = torch.histc(u.float(), bins=20, min=0.0, max=1.0).long().tolist()
        assert chi_square(counts, [0.05] * 20) < CHI2_999[19], counts


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    seeds = [11, 22, 33, 44, 55, 66]
    processor = PerRowSampling(seeds, temperature=0.9, top_p=0.9, prompt_width=0)
    together = processor.draw(logits, step=5)
    for row, seed in enumerate(seeds):
        alone = PerRowSampling([seed], temperature=0.9, top_p=0.9, prompt_width=0).draw(
            logits[row : row + 1], 5
        )
        assert int(alone) == int(together[row])


def test_other_seeds_and_other_steps_draw_other_tokens():
    flat = torch.zeros(1, 1000)
    draws = {
        seed: [
            int(PerRowSampling([seed], temperature=1.0, top_p=1.0, prompt_width=0).draw(flat, t))
            for t in range(20)
        ]
        for seed in (1, 2)
    }
    assert draws[1] != draws[2]
    assert len(set(draws[1])) > 15  # 20 steps of one seed over 1000 equally likely tokens


def expected_distribution(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """softmax(logits / T), cut to the smallest most-likely set reaching top_p (ties by id), renormalised."""
    weights = [math.exp(x / temperature) for x in logits]
    probs = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        if mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return [p / mass if i in kept else 0.0 for i, p in enumerate(probs)]


def test_sampled_tokens_follow_softmax_with_temperature_and_top_p():
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]
    draws = 40_000
    for temperature, top_p in ((0.7, 0.9), (1.3, 1.0)):
        expected = expected_distribution(logits, temperature, top_p)
        u = uniform_draws(seed_keys(range(draws)), 0)
        tokens = sample_tokens(torch.tensor([logits] * draws), u, temperature=temperature, top_p=top_p)
        counts = torch.bincount(tokens, minlength=len(logits)).tolist()
        support = [i for i, p in enumerate(expected) if p > 0]
        assert [i for i, c in enumerate(counts) if c] == support
        critical = CHI2_999[len(support) - 1]
        stat = chi_square([counts[i] for i in support], [expected[i] for i in support])
        assert stat < critical, (temperature, top_p, counts, expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.08, 0.6, 0.02, 0.3]])
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)[:-1]
    cases = {0.5: {1}, 0.85: {1, 3}, 0.95: {0, 1, 3}, 1.0: {0, 1, 2, 3}}
    for top_p, nucleus in cases.items():
        tokens = sample_tokens(probs.log().expand(len(u), -1), u, temperature=1.0, top_p=top_p)
        assert set(tokens.tolist()) == nucleus, top_p
    # Ties are ordered by token id: 0.4 then the three 0.2s; 0.4 + 0.2 + 0.2 reaches 0.7, so token 3 is cut.
    tied = torch.tensor([[0.2, 0.2, 0.4, 0.2]]).log().expand(len(u), -1)
    assert set(sample_tokens(tied, u, temperature=1.0, top_p=0.7).tolist()) == {0, 1, 2}
    # Frequencies inside the nucleus follow the renormalised probabilities: 0.6 / 0.9 of u lands on token 1.
    tokens = sample_tokens(probs.log().expand(len(u), -1), u, temperature=1.0, top_p=0.85)
    assert abs((tokens == 1).double().mean().item() - 0.6 / 0.9) < 0.002


def test_temperature_zero_is_greedy():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    u = uniform_draws(seed_keys(range(5)), 0)
    assert torch.equal(sample_tokens(logits, u, temperature=0.0, top_p=0.9), logits.argmax(-1))
    processor = PerRowSampling(range(5), temperature=0.0, top_p=0.9, prompt_width=0)
    assert torch.equal(processor(torch.zeros((5, 2), dtype=torch.long), logits), logits)  # generate's argmax
