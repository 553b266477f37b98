"""Configuration models for a fusion run and its training jobs, loaded from YAML.

Every model forbids unknown keys, so a typo in a YAML file is an error that names the
field instead of a silently ignored setting. Defaults follow the WRPO paper
(arXiv 2412.03187) and the authors' released training configs.

    cfg = load_config("configs/paper.yaml", FusionConfig)

The parts: `run` (FusionConfig and its sections), `model_specs` (sources, target, reward model),
`training` (SFT / WRPO hyper-parameters, launchers, job configs), `discovery` (watch rules for new
hub models), `base` (loading, errors, coercion rules), `names` (the pipeline's own model and stage
names, refused as model names), `credentials` (credentials in a config: found, redacted, refused).
Every field carries a description, which the Prefect UI form and the docs show.
"""

from wrpo_core.config.base import ConfigError, ConfigModel, format_validation_error, load_config, parse_config
from wrpo_core.config.credentials import config_json, credential_fields, redacted_config_data
from wrpo_core.config.discovery import (
    DiscoveryConfig,
    SamplingClusterConfig,
    WatchRule,
    parse_parameter_count,
)
from wrpo_core.config.model_specs import ModelSpec, RewardModelSpec, SamplingConfig
from wrpo_core.config.run import (
    ComputeConfig,
    EvaluationConfig,
    FusionConfig,
    PromptsConfig,
    SplitConfig,
    StorageConfig,
)
from wrpo_core.config.training import (
    LaunchConfig,
    SFTConfig,
    SFTJobConfig,
    WRPOConfig,
    WRPOJobConfig,
    _TrainingHyperparameters,
)

__all__ = [
    "ComputeConfig",
    "ConfigError",
    "ConfigModel",
    "DiscoveryConfig",
    "EvaluationConfig",
    "FusionConfig",
    "LaunchConfig",
    "ModelSpec",
    "PromptsConfig",
    "RewardModelSpec",
    "SFTConfig",
    "SFTJobConfig",
    "SamplingClusterConfig",
    "SamplingConfig",
    "SplitConfig",
    "StorageConfig",
    "WRPOConfig",
    "WRPOJobConfig",
    "WatchRule",
    "_TrainingHyperparameters",
    "config_json",
    "credential_fields",
    "format_validation_error",
    "load_config",
    "parse_config",
    "parse_parameter_count",
    "redacted_config_data",
]
