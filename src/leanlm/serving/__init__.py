"""Serving: continuous batching on a paged KV cache with prefix caching and chunked prefill (`LLMEngine`),
and an OpenAI-compatible HTTP server (`leanlm serve`, serving/api.py). See docs/serving.md."""

from .block_manager import BlockManager
from .engine import LLMEngine, RequestOutput
from .scheduler import SamplingParams, Scheduler

__all__ = ["BlockManager", "LLMEngine", "RequestOutput", "SamplingParams", "Scheduler"]
