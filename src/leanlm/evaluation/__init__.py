"""Evaluation harness: perplexity, generation speed, memory and cost, roofline profile."""

from .memory import checkpoint_bytes, cost_per_million_tokens, peak_rss_bytes, tensor_bytes
from .perplexity import PerplexityResult, perplexity
from .profile import RooflineReport, decode_costs, measure_bandwidth, measure_matmul_flops, roofline
from .speed import SpeedResult, compare_speed, hf_generator, measure_speed, protocol_prompts

__all__ = [
    "PerplexityResult", "perplexity", "SpeedResult", "compare_speed", "hf_generator", "measure_speed",
    "protocol_prompts", "RooflineReport", "roofline", "decode_costs", "measure_bandwidth",
    "measure_matmul_flops", "checkpoint_bytes", "cost_per_million_tokens", "peak_rss_bytes", "tensor_bytes",
]
