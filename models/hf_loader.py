"""Hugging Face style model directories: `config.json` + `*.safetensors` (+ `tokenizer.json`).

Reads the Llama family as transformers writes it (`LlamaForCausalLM`; SmolLM is one; Mistral
without a sliding window is the same network) into `LlamaModel`, and writes a model back in that
layout (`save_hf_dir`, which tests use to turn tiny-random into a directory). Tensors are read with
`safetensors.numpy`, which returns bfloat16 as `ml_dtypes.bfloat16` arrays; `from_hf_state_dict`
casts them to the requested dtype.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from pipelive_jax.errors import ModelLoadError
from pipelive_jax.models.llama import LlamaConfig, LlamaModel, rope_inv_freq
from pipelive_jax.models.registry import LoadedModel
from pipelive_jax.models.tokenizer import Tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_INDEX_FILE = "model.safetensors.index.json"


# --------------------------------------------------------------------------- config.json


def _read_json(path: str, file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: {os.path.basename(file)} is not valid JSON ({e})") from e
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read {os.path.basename(file)} ({e.strerror})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: {os.path.basename(file)} must hold a JSON object")
    return data


def _first_id(value: Any) -> int | None:
    """bos/eos ids may be null, an int or (Llama 3) a list: the first one stands for the rest."""
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def config_from_hf(hf: dict[str, Any], *, path: str, dtype: str = "float32") -> LlamaConfig:
    """A LlamaConfig from a Hugging Face config.json dict; ModelLoadError when unsupported."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{path}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    archs = hf.get("architectures") or []
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise ModelLoadError(
            f"{path}: architecture {unsupported[0]!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    window = hf.get("sliding_window")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    if window is not None and int(window) < max_pos:
        raise ModelLoadError(
            f"{path}: sliding_window {window} is not supported "
            f"(only full attention: sliding_window null or >= max_position_embeddings {max_pos})"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ModelLoadError(f"{path}: {key}=true is not supported (Llama layers have no bias)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")
    if dtype not in SUPPORTED_DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported (use one of {SUPPORTED_DTYPES})")

    def need(key: str) -> int:
        if key not in hf:
            raise ModelLoadError(f"{path}: config.json has no {key!r}")
        return int(hf[key])

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    # transformers 5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
    rope = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    try:
        cfg = LlamaConfig(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rope_theta=theta,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            dtype=dtype,
        )
        rope_inv_freq(cfg)  # rejects rope_scaling types we do not implement, now, not mid-serve
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: config.json: {e}") from e
    return cfg


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """The Hugging Face config.json dict of a LlamaConfig (inverse of `config_from_hf`)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": cfg.dtype,
    }


# --------------------------------------------------------------------------- safetensors


def _safetensors_files(path: str) -> list[str]:
    """The shard files: those the index names if there is one (repos may also ship a
    `consolidated.safetensors` under other names), else every *.safetensors file."""
    index = os.path.join(path, _INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(path, index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{path}: {_INDEX_FILE} has no 'weight_map' object")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        for f in files:
            if not os.path.isfile(f):
                raise ModelLoadError(
                    f"{path}: {_INDEX_FILE} names {os.path.basename(f)}, which is missing"
                )
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files (a model directory needs weights)")
    return files


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a directory's safetensors shards, by name, as numpy (bf16 as ml_dtypes)."""
    from safetensors import SafetensorError
    from safetensors.numpy import safe_open

    weights: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for file in _safetensors_files(path):
        base = os.path.basename(file)
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if name in weights:
                        raise ModelLoadError(
                            f"{path}: tensor {name!r} is in both {source[name]} and {base}"
                        )
                    weights[name] = f.get_tensor(name)
                    source[name] = base
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot read {base} ({e})") from e
    # A bare `LlamaModel` (no LM head class) saves without the "model." prefix.
    if "model.embed_tokens.weight" not in weights and "embed_tokens.weight" in weights:
        weights = {
            ("" if k.startswith("lm_head.") else "model.") + k: v for k, v in weights.items()
        }
    return weights


# --------------------------------------------------------------------------- public entry


def load_hf_dir(path: str | os.PathLike[str], *, dtype: str = "float32") -> LoadedModel:
    """Loads a Hugging Face style Llama-family directory.

    Needs `config.json` and `*.safetensors` (sharded with an index or not); `tokenizer.json`
    (+ `tokenizer_config.json`) is optional (tokenizer None without it). Weights are cast to
    `dtype` (float32, bfloat16 or float16). Every failure is a ModelLoadError naming the
    directory and what was wrong (file, key, tensor or shape).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: not a directory (a Hugging Face model directory expected)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelLoadError(f"{path}: no config.json (a Hugging Face model directory needs one)")
    cfg = config_from_hf(_read_json(path, config_file), path=path, dtype=dtype)
    weights = read_safetensors(path)
    try:
        model = LlamaModel.from_hf_state_dict(cfg, weights)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        try:
            tokenizer = Tokenizer.from_hf_dir(path)
        except ModelLoadError:
            raise
        except Exception as e:  # the tokenizers library raises its own exception types
            raise ModelLoadError(f"{path}: cannot read tokenizer.json ({e})") from e
        if tokenizer.bos_token_id is None:
            tokenizer.bos_token_id = cfg.bos_token_id
        if tokenizer.eos_token_id is None:
            tokenizer.eos_token_id = cfg.eos_token_id
    name = os.path.basename(os.path.normpath(path))
    return LoadedModel(name, cfg, model, tokenizer, path)


def save_hf_dir(model: LoadedModel | LlamaModel, path: str | os.PathLike[str]) -> None:
    """Writes `config.json` + `model.safetensors` (+ the tokenizer, when a LoadedModel has one).

    Tensors keep the model's dtype; linear weights are written [out, in] as transformers does.
    The directory is created if needed; existing files of these names are replaced.
    """
    from safetensors.numpy import save_file

    loaded = model if isinstance(model, LoadedModel) else None
    llama = model.model if isinstance(model, LoadedModel) else model
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(llama.config), f, indent=2)
    tensors = {k: np.ascontiguousarray(v) for k, v in llama.hf_state_dict().items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if loaded is not None and loaded.tokenizer is not None:
        _save_tokenizer(loaded.tokenizer, path)


def _save_tokenizer(tok: Tokenizer, path: str) -> None:
    tok._tok.save(os.path.join(path, "tokenizer.json"))

    def token(i: int | None) -> str | None:
        return tok._tok.id_to_token(i) if i is not None else None

    conf = {
        "bos_token": token(tok.bos_token_id),
        "eos_token": token(tok.eos_token_id),
        "add_bos_token": tok.add_bos,
        "chat_template": tok.chat_template,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2)
