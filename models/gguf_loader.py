"""Reads a llama-architecture GGUF file: hyper-parameters, dequantized weights, tokenizer data.

Weights come out under Hugging Face names with linear weights [out, in] (the interchange format
of `LlamaModel.from_hf_state_dict`). llama.cpp's converter permutes the rows of the Q and K
projections so that its RoPE can rotate adjacent pairs; we rotate halves (Hugging Face's layout),
so the permutation is undone here (`unpermute_qk`); tests/test_model_vs_reference.py proves the
pair matches llama.cpp's own computation on the raw file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelive_jax.errors import ModelLoadError
from pipelive_jax.models.llama import LlamaConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass
class GGUFContents:
    """What a GGUF file gives us: config, HF-named weights and raw tokenizer metadata."""

    config: LlamaConfig
    weights: dict[str, np.ndarray]
    metadata: dict[str, Any]


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's converter permutation of Q/K rows. w [rows, cols] -> same shape.

    The converter did `w.reshape(n_heads, 2, rows//n_heads//2, cols).swapaxes(1, 2)`, which
    interleaves the two halves of each head; this puts them back.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # pragma: no cover - fields of unknown kinds are skipped
        return None


def read_metadata(reader: Any) -> dict[str, Any]:
    return {name: _field_value(f) for name, f in reader.fields.items()}


def read_gguf(
    path: str | os.PathLike[str], *, progress: Any = None, dtype: str = "float32"
) -> GGUFContents:
    """Reads and dequantizes a llama GGUF file. Raises ModelLoadError naming the path and problem.

    `progress(n)` is called with the tensor count first and then once per tensor (for a bar).
    """
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (only 'llama')")

    def need(key: str) -> Any:
        if meta.get(key) is None:
            raise ModelLoadError(f"{path}: metadata key {key!r} is missing")
        return meta[key]

    n_heads = int(need("llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv") or n_heads)
    hidden = int(need("llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = int(meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []))
    rope_scaling = None
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise ModelLoadError(
            f"{path}: rope scaling {meta['llama.rope.scaling.type']!r} in GGUF is not supported"
        )
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_layers=int(need("llama.block_count")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=int(meta.get("llama.rope.dimension_count") or hidden // n_heads),
        rope_theta=float(meta.get("llama.rope.freq_base") or 10000.0),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon") or 1e-5),
        tie_embeddings="output.weight" not in names,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(meta.get("llama.context_length") or 8192),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        dtype=dtype,
    )
    if progress is not None:
        progress(len(reader.tensors))
    weights: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot dequantize tensor {t.name}: {e}") from e
        arr = np.asarray(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[t.name]
        else:
            parts = t.name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                continue  # tensors we do not use (e.g. rope_freqs)
            hf = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
            if parts[2] == "attn_q":
                arr = unpermute_qk(arr, n_heads)
            elif parts[2] == "attn_k":
                arr = unpermute_qk(arr, n_kv)
        weights[hf] = arr
        if progress is not None:
            progress(None)
    return GGUFContents(config=cfg, weights=weights, metadata=meta)
