"""A Flax NNX Llama-family decoder that runs on the paged KV cache.

One path for the data: every forward pass, a one-sequence check or a pipeline stage of a
batched serving step, reads and writes KV through the kernels' paged layout
(`pipelive_jax.kernels`). A stage is "embed? + layers[a:b] + head?" (DESIGN.md §3): the model
holds its layers as a list of per-layer modules, and `StageParams` carries a stage's share as
per-layer parameter pytrees (`nnx.State`), so moving a layer moves exactly its bytes.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipelive_jax.kernels import paged_attention, write_kv


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (names follow Hugging Face's LlamaConfig)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Storage dtype of the weights (and the default of the KV cache's: the engine's
    # `kv_cache_dtype` decides). Activations (the residual stream, norms, RoPE, softmax) are
    # float32 whatever it is, and matmuls accumulate in float32: with "bfloat16", a matmul
    # takes bf16 inputs (the activation rounded once) and gives float32,
    # the mixed precision CPUs with AVX512-BF16/AMX and GPUs run fast. Doing the elementwise
    # work in bf16 as well was 4x slower on CPU, where XLA widens each bf16 op to f32 and back.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def __hash__(self) -> int:  # rope_scaling is a dict; hash the rest (used as a jit static)
        return hash(tuple(v for k, v in dataclasses.asdict(self).items() if k != "rope_scaling"))

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


# --------------------------------------------------------------------------- batch metadata


@jax.tree_util.register_dataclass
@dataclass
class BatchMeta:
    """Where one step's packed tokens sit in the paged cache (device arrays; shapes below).

    positions     [T] int32    absolute position of each new token (RoPE)
    slot_mapping  [T] int32    page_id * page_size + offset to write its K/V; -1 = padding
    cu_q_lens     [N+1] int32  sequence i owns tokens cu_q_lens[i]:cu_q_lens[i+1]
    kv_lens       [N] int32    cached tokens per sequence including this step's
    block_tables  [N, M] int32 page ids per sequence, page 0 past the end
    num_seqs      [] int32     sequences in use (rows past it are padding)
    logits_indices [R] int32   tokens whose logits the last stage returns
    """

    positions: jax.Array
    slot_mapping: jax.Array
    cu_q_lens: jax.Array
    kv_lens: jax.Array
    block_tables: jax.Array
    num_seqs: jax.Array
    logits_indices: jax.Array


# --------------------------------------------------------------------------- pure array math


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], with Llama-3 rope scaling when configured."""
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor = float(sc["factor"])
        low = float(sc.get("low_freq_factor", 1.0))
        high = float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif sc and sc.get("rope_type", sc.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {sc!r}: only 'llama3' is implemented")
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim // 2] for positions [T]."""
    ang = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout). x [T, heads, head_dim]; cos/sin [T, head_dim//2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# --------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32: weight [hidden]."""

    def __init__(self, dim: int, eps: float, *, dtype: Any = jnp.float32) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _linear(cfg: LlamaConfig, din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free projection: inputs cast to the weight dtype, float32 out (see LlamaConfig)."""
    return nnx.Linear(
        din,
        dout,
        use_bias=False,
        dtype=cfg.jnp_dtype,
        param_dtype=cfg.jnp_dtype,
        preferred_element_type=jnp.float32,
        rngs=rngs,
    )


class DecoderLayer(nnx.Module):
    """One Llama block: RMSNorm -> QKV -> RoPE -> KV write -> paged attention -> O -> RMSNorm -> SwiGLU.

    Linear kernels are [in, out] (Flax layout; Hugging Face stores [out, in]).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs) -> None:
        h, hd = cfg.hidden_size, cfg.head_dim
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=cfg.jnp_dtype)
        self.q_proj = _linear(cfg, h, cfg.num_heads * hd, rngs)
        self.k_proj = _linear(cfg, h, cfg.num_kv_heads * hd, rngs)
        self.v_proj = _linear(cfg, h, cfg.num_kv_heads * hd, rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * hd, h, rngs)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=cfg.jnp_dtype)
        self.gate_proj = _linear(cfg, h, cfg.intermediate_size, rngs)
        self.up_proj = _linear(cfg, h, cfg.intermediate_size, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, h, rngs)

    def __call__(
        self,
        x: jax.Array,
        k_pages: jax.Array,
        v_pages: jax.Array,
        meta: BatchMeta,
        cos: jax.Array,
        sin: jax.Array,
        *,
        cfg: LlamaConfig,
        max_q_len: int,
        backend: str,
        max_long_seqs: int | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, hidden] float32; pools [kv_heads, pages, page_size, head_dim] (the cache's
        dtype, which may differ from the weights') -> (x, k_pages, v_pages)."""
        t = x.shape[0]
        hd = cfg.head_dim
        y = self.input_norm(x)
        q = self.q_proj(y).reshape(t, cfg.num_heads, hd)
        k = self.k_proj(y).reshape(t, cfg.num_kv_heads, hd)
        v = self.v_proj(y).reshape(t, cfg.num_kv_heads, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, meta.slot_mapping)
        attn = paged_attention(
            q,
            k_pages,
            v_pages,
            meta.kv_lens,
            meta.block_tables,
            meta.cu_q_lens,
            meta.num_seqs,
            sm_scale=1.0 / math.sqrt(hd),
            max_q_len=max_q_len,
            backend=backend,
            max_long_seqs=max_long_seqs,
        )
        x = x + self.o_proj(attn.reshape(t, cfg.num_heads * hd))
        y = self.post_norm(x)
        x = x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))
        return x, k_pages, v_pages


class LMHead(nnx.Module):
    """Final RMSNorm + output projection. `weight` [vocab, hidden] (the embedding when tied)."""

    def __init__(self, cfg: LlamaConfig, weight: jax.Array) -> None:
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.jnp_dtype)
        self.weight = nnx.Param(weight)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [R, hidden] float32 -> logits [R, vocab] float32 (bf16 weights: bf16 inputs, f32 sums).

        One row (a one-sequence batch) is padded to two: XLA on CPU turns a one-row bf16
        product into a matrix-vector one that first converts the whole [vocab, hidden] weight
        to float32, 39 ms for SmolLM2's against 3 ms for two rows."""
        w = self.weight[...]
        y = self.norm(h).astype(w.dtype)
        r = y.shape[0]
        if r == 1 and w.dtype != jnp.float32:
            y = jnp.pad(y, ((0, 1), (0, 0)))
        return jnp.einsum("rh,vh->rv", y, w, preferred_element_type=jnp.float32)[:r]


class LlamaModel(nnx.Module):
    """The whole decoder: `embed` [vocab, hidden], `layers` (list of DecoderLayer), `head`."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg
        std = 0.02
        emb = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size)) * std
        self.embed = nnx.Param(emb.astype(cfg.jnp_dtype))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        if cfg.tie_embeddings:
            head_w = self.embed[...]
        else:
            head_w = (jax.random.normal(rngs.params(), emb.shape) * std).astype(cfg.jnp_dtype)
        self.head = LMHead(cfg, head_w)

    # ----- conversion to and from Hugging Face names (the interchange format of loaders)

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        """Weights under Hugging Face Llama names, linear weights [out, in], as numpy."""
        out: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.asarray(self.embed[...])}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = np.asarray(layer.input_norm.weight[...])
            out[p + "post_attention_layernorm.weight"] = np.asarray(layer.post_norm.weight[...])
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{name}.weight"] = np.asarray(getattr(layer, name).kernel[...]).T
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{name}.weight"] = np.asarray(getattr(layer, name).kernel[...]).T
        out["model.norm.weight"] = np.asarray(self.head.norm.weight[...])
        if not self.config.tie_embeddings:
            out["lm_head.weight"] = np.asarray(self.head.weight[...])
        return out

    @classmethod
    def from_hf_state_dict(
        cls, cfg: LlamaConfig, weights: dict[str, np.ndarray], *, progress: Any = None
    ) -> LlamaModel:
        """Builds the model from Hugging Face-named weights ([out, in] linear layout).

        Missing or mis-shaped tensors raise ValueError naming the tensor. `progress` is an
        optional callable invoked once per layer (the CLI's progress bar).
        """
        model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
        dt = cfg.jnp_dtype

        def take(name: str, shape: tuple[int, ...], transpose: bool = False) -> jax.Array:
            if name not in weights:
                raise ValueError(f"missing tensor {name!r}")
            w = np.asarray(weights[name])
            if transpose:
                w = w.T
            if w.shape != shape:
                raise ValueError(f"tensor {name!r} has shape {w.shape}, expected {shape}")
            return jnp.asarray(w, dtype=dt)

        h, hd = cfg.hidden_size, cfg.head_dim
        model.embed = nnx.Param(take("model.embed_tokens.weight", (cfg.vocab_size, h)))
        dims = {
            "q_proj": (h, cfg.num_heads * hd),
            "k_proj": (h, cfg.num_kv_heads * hd),
            "v_proj": (h, cfg.num_kv_heads * hd),
            "o_proj": (cfg.num_heads * hd, h),
            "gate_proj": (h, cfg.intermediate_size),
            "up_proj": (h, cfg.intermediate_size),
            "down_proj": (cfg.intermediate_size, h),
        }
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            layer.input_norm.weight = nnx.Param(take(p + "input_layernorm.weight", (h,)))
            layer.post_norm.weight = nnx.Param(take(p + "post_attention_layernorm.weight", (h,)))
            for name, shape in dims.items():
                group = (
                    "self_attn"
                    if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                    else "mlp"
                )
                getattr(layer, name).kernel = nnx.Param(
                    take(f"{p}{group}.{name}.weight", shape, transpose=True)
                )
            if progress is not None:
                progress()
        model.head.norm.weight = nnx.Param(take("model.norm.weight", (h,)))
        if cfg.tie_embeddings:
            model.head.weight = nnx.Param(model.embed[...])
        else:
            model.head.weight = nnx.Param(take("lm_head.weight", (cfg.vocab_size, h)))
        return model


# --------------------------------------------------------------------------- stages


@jax.tree_util.register_dataclass
@dataclass
class StageParams:
    """The parameters one pipeline stage holds, as pytrees (None where the stage lacks the part).

    embed  [vocab, hidden] on the first stage; layers: one `nnx.State` per layer of the stage's
    range, in order; head: the `LMHead` state on the last stage.
    """

    embed: jax.Array | None
    layers: list[Any]
    head: Any | None


@dataclass(frozen=True)
class ModelDefs:
    """Static structure shared by all stages: the config and the NNX graph definitions."""

    cfg: LlamaConfig
    layer_def: Any
    head_def: Any

    def __hash__(self) -> int:
        return hash((self.cfg, id(self.layer_def), id(self.head_def)))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ModelDefs)
            and self.cfg == other.cfg
            and self.layer_def is other.layer_def
            and self.head_def is other.head_def
        )


def split_model(model: LlamaModel) -> tuple[ModelDefs, jax.Array, list[Any], Any]:
    """(defs, embed [vocab, hidden], per-layer states, head state) of a model."""
    layer_def = None
    states = []
    for layer in model.layers:
        gd, st = nnx.split(layer)
        layer_def = layer_def or gd
        states.append(st)
    head_def, head_state = nnx.split(model.head)
    return ModelDefs(model.config, layer_def, head_def), model.embed[...], states, head_state


def stage_params(model: LlamaModel, start: int, end: int) -> StageParams:
    """The StageParams of layers [start, end) of a model (host-side views, not yet placed)."""
    _, embed, states, head = split_model(model)
    return StageParams(
        embed=embed if start == 0 else None,
        layers=states[start:end],
        head=head if end == model.config.num_layers else None,
    )


def stage_forward(
    defs: ModelDefs,
    params: StageParams,
    kv: list[tuple[jax.Array, jax.Array]],
    meta: BatchMeta,
    x: jax.Array,
    *,
    max_q_len: int,
    backend: str,
    max_long_seqs: int | None = None,
) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    """One pipeline stage's step: embed? + layers + head?  (pure; jitted by the executor).

    `max_q_len` and `max_long_seqs` are the attention's static bounds (`kernels.paged_attention`).

    x: token ids [T] int32 on the first stage, hidden [T, hidden] float32 otherwise.
    kv: per layer of the stage, (k_pages, v_pages) [kv_heads, pages, page_size, head_dim].
    Returns (kv, hidden [T, hidden]) or, on the last stage, (kv, logits [R, vocab] float32) for
    the tokens at meta.logits_indices.
    """
    cfg = defs.cfg
    h = params.embed[x].astype(jnp.float32) if params.embed is not None else x
    cos, sin = rope_tables(meta.positions, rope_inv_freq(cfg))
    new_kv = []
    for st, (k_pages, v_pages) in zip(params.layers, kv, strict=True):
        layer = nnx.merge(defs.layer_def, st)
        h, k_pages, v_pages = layer(
            h,
            k_pages,
            v_pages,
            meta,
            cos,
            sin,
            cfg=cfg,
            max_q_len=max_q_len,
            backend=backend,
            max_long_seqs=max_long_seqs,
        )
        new_kv.append((k_pages, v_pages))
    if params.head is not None:
        head = nnx.merge(defs.head_def, params.head)
        return new_kv, head(h[meta.logits_indices])
    return new_kv, h


@partial(jax.jit, static_argnames=("defs", "max_q_len", "backend"), donate_argnums=(2,))
def _stage_forward_jit(defs, params, kv, meta, x, *, max_q_len, backend):
    return stage_forward(defs, params, kv, meta, x, max_q_len=max_q_len, backend=backend)


_SPLITS: weakref.WeakKeyDictionary[LlamaModel, Any] = weakref.WeakKeyDictionary()


def _split_cached(model: LlamaModel) -> tuple[ModelDefs, jax.Array, list[Any], Any]:
    """split_model, remembered per model: ModelDefs hash by graph identity, so a fresh split
    would miss the jit cache and recompile on every call."""
    got = _SPLITS.get(model)
    if got is None:
        got = _SPLITS[model] = split_model(model)
    return got


def full_sequence_logits(
    model: LlamaModel,
    token_ids: list[int] | np.ndarray,
    *,
    page_size: int = 16,
    backend: str = "xla",
    kv_dtype: Any = None,
) -> np.ndarray:
    """Logits [T, vocab] for every position of one sequence, through the paged path.

    A check of the model as a whole (one stage holding every layer, a fresh cache in
    `kv_dtype`, default the model's dtype); serving goes through `serving.pipeline`.
    """
    ids = np.asarray(token_ids, dtype=np.int32)
    t = int(ids.shape[0])
    cfg = model.config
    n_pages = -(-t // page_size)
    meta = BatchMeta(
        positions=jnp.arange(t, dtype=jnp.int32),
        slot_mapping=jnp.arange(t, dtype=jnp.int32) + page_size,  # pages 1.. (0 is padding)
        cu_q_lens=jnp.array([0, t], jnp.int32),
        kv_lens=jnp.array([t], jnp.int32),
        block_tables=jnp.arange(1, n_pages + 1, dtype=jnp.int32)[None, :],
        num_seqs=jnp.array(1, jnp.int32),
        logits_indices=jnp.arange(t, dtype=jnp.int32),
    )
    shape = (cfg.num_kv_heads, n_pages + 1, page_size, cfg.head_dim)
    kd = cfg.jnp_dtype if kv_dtype is None else jnp.dtype(kv_dtype)
    kv = [(jnp.zeros(shape, kd), jnp.zeros(shape, kd)) for _ in model.layers]
    defs, embed, states, head = _split_cached(model)
    params = StageParams(embed=embed, layers=states, head=head)
    _, logits = _stage_forward_jit(
        defs, params, kv, meta, jnp.asarray(ids), max_q_len=t, backend=backend
    )
    return np.asarray(logits)
