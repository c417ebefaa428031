"""Structured pruning of LLaMA-family models into students of a planned shape.

- ``plan``: exact parameter counts and the shape planner, from an HF config alone.
- ``importance``: magnitude / activation (Minitron) / Taylor scores, cached as safetensors.
- ``surgery``: GQA-aware unit selection and cutting a student out of a model.
- ``structure``: which parameter axes belong to which prunable unit.

Heavy imports (torch, transformers) happen inside ``importance`` and ``surgery`` only.
"""

from downscale.pruning.plan import (
    COMPONENTS,
    SUPPORTED,
    ArchInfo,
    Plan,
    PlanError,
    Policy,
    Shape,
    arch_info,
    count_params,
    plan,
    student_config,
)

__all__ = ["COMPONENTS", "SUPPORTED", "ArchInfo", "Plan", "PlanError", "Policy", "Shape", "arch_info", "count_params",
           "plan", "student_config"]
