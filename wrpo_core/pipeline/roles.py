"""The names of the models a fusion run trains, as they appear in storage keys and stage names.

Defined in wrpo_core.config.names (the config refuses them as source and target names without
importing the pipeline); re-exported here for the pipeline's modules.
"""

from wrpo_core.config.names import DPO_BASELINE, FUSED, MODEL_ROLES, TARGET_SFT

__all__ = ["DPO_BASELINE", "FUSED", "MODEL_ROLES", "TARGET_SFT"]
