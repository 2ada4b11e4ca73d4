"""Evaluation: reference-protocol perplexity, lm-eval benchmarks (offline through local task copies)
and source-vs-MLA reports. Heavy imports (lm_eval) happen only when a function needs them."""

from .evaluate import EvalOptions, evaluate_model
from .perplexity import PerplexityResult, perplexity
from .report import compare, write_report

__all__ = ["EvalOptions", "PerplexityResult", "compare", "evaluate_model", "perplexity", "write_report"]
