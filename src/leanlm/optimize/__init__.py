"""`leanlm optimize`: search recipes and deployments for the cheapest one within a quality bound (docs/optimize.md)."""

from .search import OBJECTIVES, OptimizeConfig, optimize, parse_loss, parse_search_budget

__all__ = ["OBJECTIVES", "OptimizeConfig", "optimize", "parse_loss", "parse_search_budget"]
