"""`LLM`: the offline facade (load a model, build an engine, generate for a list of prompts)."""

from __future__ import annotations

from typing import Any

from pipelive_jax.config import DTYPES
from pipelive_jax.errors import ConfigError, RequestError
from pipelive_jax.models.registry import LoadedModel, load_model
from pipelive_jax.serving.engine import Engine
from pipelive_jax.serving.request import RequestOutput
from pipelive_jax.serving.sampling import SamplingParams


class LLM:
    """`LLM(model="smollm2-135m", plan=None, **engine_options)`; `plan=None` means one stage.

    `model` is a registry name, a path, or an already loaded `LoadedModel`. `dtype` is how the
    weights are stored: "float32" (default), "bfloat16" or "float16" (16-bit matmul inputs,
    float32 sums and activations: see `LlamaConfig.dtype`); a loaded model keeps its own. The
    KV cache's dtype is the engine option `kv_cache_dtype` (`EngineConfig`).
    """

    def __init__(
        self,
        model: str | LoadedModel = "smollm2-135m",
        plan: Any = None,
        *,
        dtype: str | None = None,
        **engine_options: Any,
    ) -> None:
        progress = engine_options.pop("progress", False)
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if isinstance(model, LoadedModel):
            if dtype is not None and dtype != model.config.dtype:
                raise ConfigError(
                    f"dtype={dtype!r} but the loaded model {model.name!r} is "
                    f"{model.config.dtype}: load it with load_model(..., dtype={dtype!r})"
                )
            self.loaded = model
        else:
            self.loaded = load_model(model, dtype=dtype or "float32", progress=progress)
        self.engine = Engine(self.loaded, plan, **engine_options)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in input order.

        A single prompt (a string or one list of token ids) is accepted as a list of one.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        if not isinstance(prompts, list) or not prompts:
            raise RequestError("prompts must be a non-empty list of strings or token-id lists")
        if params is None or isinstance(params, SamplingParams):
            plist = [params or SamplingParams()] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts):
                raise RequestError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        # Validate the whole batch first: a refused prompt must not leave the others queued.
        for p, sp in zip(prompts, plist, strict=True):
            if not isinstance(sp, SamplingParams):
                raise RequestError(f"params must be SamplingParams, got {type(sp).__name__}")
            sp.validate()
            self.engine.encode_prompt(p)
        # Final outputs are caught as they are published: the engine keeps only the most
        # recent finished requests (finished_retention), fewer than a big batch may have.
        done: dict[str, RequestOutput] = {}

        def keep(out: RequestOutput) -> None:
            if out.finished:
                done[out.request_id] = out

        ids = [
            self.engine.add_request(p, sp, on_output=keep)
            for p, sp in zip(prompts, plist, strict=True)
        ]
        while len(done) < len(ids):
            self.engine.step()
        return [done[i] for i in ids]
