"""Evaluation: held-out task accuracy (pass@1, pass@k, majority, format, length) through the engine."""

from .tasks import FamilyResult, evaluate_family, markdown_table

__all__ = ["FamilyResult", "evaluate_family", "markdown_table"]
