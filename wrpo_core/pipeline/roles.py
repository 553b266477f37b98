"""The names of the models a fusion run trains, as they appear in storage keys and stage names."""

TARGET_SFT = "target-sft"
"""The target after SFT on (x, y_ws): WRPO's policy start and reference."""

FUSED = "wrpo"
"""The fused model: Target-SFT after WRPO."""

DPO_BASELINE = "dpo"
"""The DPO baseline (WRPO at alpha 0 on the same data), trained only when asked for (the demo)."""
