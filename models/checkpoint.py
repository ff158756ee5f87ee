"""Orbax checkpoints of a model's weights, laid out so that one layer restores alone.

A checkpoint is a directory:

    <path>/pipelive_config.json   the LlamaConfig (its fields, as JSON)
    <path>/weights/               an Orbax PyTree checkpoint of
        {"embed": [vocab, hidden],
         "layers": {"0": <layer pure dict>, "1": ..., ...},
         "head": {"norm": {"weight": [hidden]}, "weight": [vocab, hidden]}}

A layer's pure dict is `nnx.to_pure_dict(nnx.split(layer)[1])` (`{"q_proj": {"kernel": [in, out]},
"input_norm": {"weight": [hidden]}, ...}`). With tied embeddings the head's `weight` is not
stored (it is `embed`). Each layer is its own subtree, so a new pipeline stage restores just its
layers, straight onto its devices (`restore_layers`), through Orbax's partial restore.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pipelive_jax.errors import ModelLoadError
from pipelive_jax.models.llama import DecoderLayer, LlamaConfig, LlamaModel
from pipelive_jax.models.registry import LoadedModel

CONFIG_FILE = "pipelive_config.json"
WEIGHTS_DIR = "weights"


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _weights_tree(model: LlamaModel) -> dict[str, Any]:
    layers = {str(i): nnx.to_pure_dict(nnx.state(layer)) for i, layer in enumerate(model.layers)}
    head = nnx.to_pure_dict(nnx.state(model.head))
    if model.config.tie_embeddings:
        del head["weight"]
    return {"embed": model.embed[...], "layers": layers, "head": head}


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` looks like a directory written by `save_checkpoint`."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
        os.path.join(path, WEIGHTS_DIR)
    )


def save_checkpoint(
    model: LlamaModel | LoadedModel, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Saves a model's config and weights (in their current dtype) as a checkpoint at `path`.

    Raises FileExistsError when `path` already holds weights, unless `overwrite`.
    """
    llama = model.model if isinstance(model, LoadedModel) else model
    path = os.path.abspath(os.fspath(path))  # Orbax wants absolute paths
    weights = os.path.join(path, WEIGHTS_DIR)
    if os.path.exists(weights) and not overwrite:
        raise FileExistsError(f"{path}: already holds a checkpoint (pass overwrite=True)")
    os.makedirs(path, exist_ok=True)
    import orbax.checkpoint as ocp

    _checkpointer().save(weights, args=ocp.args.PyTreeSave(_weights_tree(llama)), force=overwrite)
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(llama.config), f, indent=2)


def read_checkpoint_config(path: str | os.PathLike[str], dtype: str | None = None) -> LlamaConfig:
    """The LlamaConfig stored beside a checkpoint's weights (with `dtype` instead, if given)."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ModelLoadError(f"{path}: no {CONFIG_FILE} (not a pipelive checkpoint)")
    if not os.path.isdir(os.path.join(path, WEIGHTS_DIR)):
        raise ModelLoadError(f"{path}: no {WEIGHTS_DIR}/ directory (checkpoint incomplete)")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = LlamaConfig(**json.load(f))
        return cfg if dtype is None else dataclasses.replace(cfg, dtype=str(jnp.dtype(dtype)))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: {CONFIG_FILE} is not valid JSON ({e})") from e
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: {CONFIG_FILE} is not a LlamaConfig ({e})") from e


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs carrying `sharding` (set explicitly: nnx.eval_shape drops shardings)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _restore(path: str, target: dict[str, Any]) -> dict[str, Any]:
    """Partial restore of the subtree `target` (ShapeDtypeStructs) of a checkpoint's weights."""
    import orbax.checkpoint as ocp

    weights = os.path.abspath(os.path.join(path, WEIGHTS_DIR))
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    try:
        return _checkpointer().restore(weights, args=args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ModelLoadError(f"{path}: cannot restore checkpoint weights ({e})") from e


def _default_sharding(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding:
    return sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract_layer_state(cfg: LlamaConfig) -> nnx.State:
    """A DecoderLayer's state with ShapeDtypeStruct leaves (no arrays allocated)."""
    return nnx.split(nnx.eval_shape(lambda: DecoderLayer(cfg, rngs=nnx.Rngs(0))))[1]


def restore_layers(
    path: str | os.PathLike[str],
    layers: list[int],
    sharding: jax.sharding.Sharding,
    *,
    dtype: str | None = None,
) -> list[nnx.State]:
    """Restores only `layers` of a checkpoint, each array placed with `sharding`.

    Returns one `nnx.State` per requested layer, in the order asked, with the structure of
    `nnx.split(layer)[1]` (what `StageParams.layers` holds). Nothing else is read: the embedding,
    the head and other layers stay in storage. Every array gets the same `sharding` (replicated
    over a stage's mesh, or a NamedSharding whose spec divides every weight's shapes). Arrays
    keep the stored dtype unless `dtype` is given (Orbax casts while reading).
    """
    path = os.fspath(path)
    cfg = read_checkpoint_config(path, dtype)
    bad = [i for i in layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ModelLoadError(f"{path}: no layer {bad[0]} (the model has {cfg.num_layers} layers)")
    pure = _abstract(nnx.to_pure_dict(_abstract_layer_state(cfg)), sharding)
    target = {"layers": {str(i): pure for i in dict.fromkeys(layers)}}
    restored = _restore(path, target)["layers"]
    states = []
    for i in layers:
        st = _abstract_layer_state(cfg)
        nnx.replace_by_pure_dict(st, restored[str(i)])
        states.append(st)
    return states


def restore_checkpoint(
    path: str | os.PathLike[str],
    *,
    sharding: jax.sharding.Sharding | None = None,
    dtype: str | None = None,
) -> LlamaModel:
    """Restores a whole model; every array placed with `sharding` (default: the first device),
    in the stored dtype or `dtype` if given (the model's config then says `dtype`)."""
    path = os.fspath(path)
    cfg = read_checkpoint_config(path, dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaModel(cfg, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(state)
    head = dict(pure["head"])
    if cfg.tie_embeddings:
        del head["weight"]
    target = _abstract(
        {
            "embed": pure["embed"],
            "layers": {str(i): v for i, v in pure["layers"].items()},
            "head": head,
        },
        _default_sharding(sharding),
    )
    restored = _restore(path, target)
    if cfg.tie_embeddings:
        restored["head"]["weight"] = restored["embed"]
    nnx.replace_by_pure_dict(
        state,
        {
            "embed": restored["embed"],
            "layers": {int(i): v for i, v in restored["layers"].items()},
            "head": restored["head"],
        },
    )
    return nnx.merge(graphdef, state)


def load_checkpoint_dir(
    path: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> LoadedModel:
    """A checkpoint directory as a LoadedModel (tokenizer from a tokenizer.json beside it, if any)."""
    from pipelive_jax.models.tokenizer import Tokenizer

    path = os.fspath(path)
    model = restore_checkpoint(path, sharding=sharding, dtype=dtype)
    tok = (
        Tokenizer.from_hf_dir(path)
        if os.path.isfile(os.path.join(path, "tokenizer.json"))
        else None
    )
    name = os.path.basename(os.path.normpath(path))
    return LoadedModel(name, model.config, model, tok, path)
