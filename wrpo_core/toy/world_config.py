"""The toy world's configuration: model shape, source and target training recipes, data sizes.

`WorldConfig` is everything that determines a toy world; its hash (with `CODE_VERSION`) names the
world's cache folder, so any change to these models or their defaults changes every cache key.
`wrpo_core.toy.world` builds a world from it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wrpo_core.toy.skills import SKILLS

CODE_VERSION = 1
"""Part of the cache key: bump it whenever the training recipe or data layout changes."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSize(_Model):
    """Shape of every tiny Llama in the world (sources and target alike)."""

    hidden_size: Annotated[int, Field(ge=4)] = 128
    num_layers: Annotated[int, Field(ge=1)] = 2
    num_heads: Annotated[int, Field(ge=1)] = 4
    intermediate_size: Annotated[int | None, Field(ge=4)] = Field(
        default=None, description="MLP width; None means 2 * hidden_size."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSize:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self

    def kwargs(self) -> dict[str, int]:
        """Keyword arguments for `build_tiny_llama`."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size or 2 * self.hidden_size,
        }


class _Optimization(_Model):
    max_steps: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: Annotated[float, Field(gt=0)] = 3e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 30
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.1, description="Cosine decay from lr to lr * min_lr_ratio over max_steps."
    )
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    check_every: Annotated[int, Field(ge=1)] = Field(
        default=50, description="Steps between dev-set checks (early stopping, snapshots, capping)."
    )


class SourceRecipe(_Optimization):
    """How every source is trained: its own skills only, until all reach `stop_accuracy` on dev."""

    max_steps: Annotated[int, Field(ge=1)] = 1200
    batch_size: Annotated[int, Field(ge=1)] = 64
    stop_accuracy: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.98, description="Stop once every own skill reaches this exact accuracy on the dev set."
    )


class TargetRecipe(_Optimization):
    """How the partly competent target is trained.

    It trains on all the sources' skills (weighted by `skill_weights`, default 1 each); at every
    check a skill whose dev accuracy is >= `cap` leaves the mix until it drops below again.
    Training stops when every skill's dev accuracy lies inside `band`, or at `max_steps`; the
    kept weights are the snapshot (one per check) whose dev accuracies fit `band` best.
    """

    max_steps: Annotated[int, Field(ge=1)] = 1500
    check_every: Annotated[int, Field(ge=1)] = 25
    cap: Annotated[float, Field(gt=0, le=1)] = 0.25
    band: tuple[float, float] = (0.15, 0.35)
    skill_weights: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)

    @field_validator("band")
    @classmethod
    def _ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        low, high = band
        if not 0 <= low <= high <= 1:
            raise ValueError(f"band must satisfy 0 <= low <= high <= 1, got {band}")
        return band


class DataSizes(_Model):
    """Prompts per skill in each disjoint block drawn for the world."""

    eval_per_skill: Annotated[int, Field(ge=1)] = 100
    dev_per_skill: Annotated[int, Field(ge=1)] = 100
    train_per_skill: Annotated[int, Field(ge=1)] = 5000


def _default_sources() -> dict[str, list[str]]:
    # One skill per specialist: each reaches 98% dev accuracy in 300-700 steps of batch 64, while
    # two word skills in one model interfere and take far longer (measured). Left
    # out of the default world (usable in a custom config): `add` (a tiny Llama stays near 0%
    # after 2000 steps), `caesar` (needs 1100-1500+ steps, some seeds stall at 60-70%) and
    # `max_digit` (its answer is the last digit of `sort_digits`' answer, so a generalist that
    # learns sorting at all gets max_digit 60-100% right: no partly competent target).
    return {
        "src-reverse": ["reverse"],
        "src-upper": ["upper"],
        "src-sort": ["sort_digits"],
    }


class WorldConfig(_Model):
    """Everything that determines a toy world; its hash (with `CODE_VERSION`) is the cache key."""

    seed: int = 0
    model: ModelSize = Field(default_factory=ModelSize)
    sources: dict[str, list[str]] = Field(
        default_factory=_default_sources, description="Source name -> the skills it specializes in."
    )
    source_training: SourceRecipe = Field(default_factory=SourceRecipe)
    target: TargetRecipe = Field(default_factory=TargetRecipe)
    data: DataSizes = Field(default_factory=DataSizes)

    @field_validator("sources")
    @classmethod
    def _known_skills(cls, sources: dict[str, list[str]]) -> dict[str, list[str]]:
        if not sources:
            raise ValueError("a world needs at least one source")
        for name, skills in sources.items():
            if not name or "/" in name or "\\" in name or name.startswith(".") or name == "target":
                raise ValueError(f"source name {name!r} must be a plain folder name other than 'target'")
            if not skills:
                raise ValueError(f"source {name!r} has no skills")
            unknown = [s for s in skills if s not in SKILLS]
            if unknown:
                raise ValueError(f"source {name!r}: unknown skills {unknown}; known: {sorted(SKILLS)}")
            if len(set(skills)) != len(skills):
                raise ValueError(f"source {name!r}: skills repeat: {skills}")
        return sources

    @model_validator(mode="after")
    def _weights_known(self) -> WorldConfig:
        extra = sorted(set(self.target.skill_weights) - set(self.skills()))
        if extra:
            raise ValueError(f"target.skill_weights names skills no source has: {extra}")
        return self

    def skills(self) -> list[str]:
        """The world's skills: every source's skills, in `SKILLS` order."""
        used = {s for skills in self.sources.values() for s in skills}
        return [s for s in SKILLS if s in used]

    def cache_key(self) -> str:
        """Hex digest of the config and `CODE_VERSION`: the name of the world's cache folder."""
        payload = json.dumps(
            {"code_version": CODE_VERSION, "config": self.model_dump(mode="json")}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def smallest(cls, seed: int = 0) -> WorldConfig:
        """A world that builds in a few seconds, for smoke tests; its models are not competent."""
        return cls(
            seed=seed,
            model=ModelSize(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
            source_training=SourceRecipe(max_steps=4, batch_size=4, warmup_steps=1, check_every=2),
            target=TargetRecipe(max_steps=4, batch_size=4, warmup_steps=1, check_every=2),
            data=DataSizes(eval_per_skill=3, dev_per_skill=2, train_per_skill=8),
        )
