"""pipelive-jax: live, in-place re-partitioning of pipeline-parallel LLM serving on JAX.

The user's vocabulary is `LLM` and `SamplingParams`; they are imported lazily so that
`import pipelive_jax` stays cheap (the CLI must set XLA_FLAGS before JAX is imported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from pipelive_jax.serving.llm import LLM
    from pipelive_jax.serving.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from pipelive_jax.serving.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pipelive_jax.serving.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pipelive_jax' has no attribute {name!r}")
