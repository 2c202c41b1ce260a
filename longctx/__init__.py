"""longctx: long-context LLM inference (Qwen2 architecture, 128K-1M tokens)."""

from longctx.config import DCAConfig, EngineConfig, ModelConfig
from longctx.engine.outputs import RequestOutput
from longctx.entrypoints.llm import LLM
from longctx.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "DCAConfig", "EngineConfig", "ModelConfig"]
__version__ = "0.1.0"
