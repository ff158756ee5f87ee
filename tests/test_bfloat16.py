"""bfloat16 storage (weights and KV cache) with float32 activations and sums.

What `LlamaConfig.dtype = "bfloat16"` promises: every matmul takes its activation input rounded
to bf16 and the bf16 weight, and sums in float32; K (after RoPE) and V are stored in bf16; the
rest (residual stream, norms, RoPE, softmax) is float32. The numpy reference models exactly that
with `round_to=bfloat16` (float64 elsewhere), and the tests check that the model is far closer to
it than to the same weights without the rounding. The serving path is then checked against the
model's own one-sequence forward pass, as the float32 engine tests do, with the KV cache in the
engine's dtype (float32 on CPU unless asked otherwise: see `EngineConfig.kv_cache_dtype`).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np
import numpy_reference as ref
import pytest

from pipelive_jax.config import load_config
from pipelive_jax.errors import ConfigError
from pipelive_jax.models.llama import LlamaModel, full_sequence_logits
from pipelive_jax.models.registry import LoadedModel, load_model
from pipelive_jax.planner import model_shape_for
from pipelive_jax.serving.engine import resolve_kv_dtype
from pipelive_jax.serving.llm import LLM
from pipelive_jax.serving.sampling import SamplingParams

N_NEW = 8
GREEDY = SamplingParams(max_tokens=N_NEW, ignore_eos=True)


def as_bf16(loaded: LoadedModel) -> LoadedModel:
    cfg = dataclasses.replace(loaded.config, dtype="bfloat16")
    model = LlamaModel.from_hf_state_dict(cfg, loaded.model.hf_state_dict())
    return dataclasses.replace(loaded, config=cfg, model=model)


@pytest.fixture(scope="module")
def tiny_bf16(tiny):
    return as_bf16(tiny)


@pytest.fixture(scope="module")
def smol_bf16():
    return load_model("smollm2-135m", dtype="bfloat16")


def _teacher_forced_greedy(
    model, prompt: list[int], generated: list[int], kv_dtype=None
) -> list[int]:
    """The greedy choice after each prefix of prompt + generated, from one full forward pass."""
    logits = full_sequence_logits(model, prompt + generated[:-1], kv_dtype=kv_dtype)
    return np.argmax(logits[len(prompt) - 1 :], axis=-1).tolist()


# ------------------------------------------------------------------ the model vs the reference


@pytest.mark.parametrize("length", [1, 8])
def test_tiny_bf16_matches_the_mixed_precision_reference(tiny_bf16, length):
    """Up to 8 tokens the model and the reference round every bf16 input alike: the logits
    agree to float32 rounding, while leaving the rounding out moves them by > 1e-3. (Longer
    sequences start to meet activations within float32 error of a bf16 rounding boundary,
    which the two sides then round to neighbouring values.)"""
    cfg = tiny_bf16.config
    assert {np.dtype(a.dtype) for a in tiny_bf16.model.hf_state_dict().values()} == {
        np.dtype(ml_dtypes.bfloat16)
    }
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, length).tolist()
    got = np.asarray(full_sequence_logits(tiny_bf16.model, ids))
    assert got.dtype == np.float32
    sd = tiny_bf16.model.hf_state_dict()
    want = ref.forward_hf(sd, dataclasses.asdict(cfg), ids, round_to=ml_dtypes.bfloat16)
    unrounded = ref.forward_hf(sd, dataclasses.asdict(cfg), ids)
    assert ref.max_scaled_error(got, want) < 1e-5
    assert ref.max_scaled_error(unrounded, want) > 1e-3


@pytest.mark.smollm2
def test_smollm2_bf16_stays_close_to_the_reference(smol_bf16):
    """Over 30 layers of 576 wide, some activations land within float32 error of a bf16
    rounding boundary, so the model cannot match the rounded reference to float32 rounding as
    the tiny one does; they stay within 1.5e-2 of the logit scale of each other (measured
    8e-3, the same size as the effect of the rounding itself) and pick the same greedy token
    at every position; a wrong weight layout or RoPE is off by whole units."""
    ids = smol_bf16.tokenizer.encode("The capital of France is")
    cfg = smol_bf16.config
    sd = smol_bf16.model.hf_state_dict()
    got = np.asarray(full_sequence_logits(smol_bf16.model, ids))
    want = ref.forward_hf(sd, dataclasses.asdict(cfg), ids, round_to=ml_dtypes.bfloat16)
    assert ref.max_scaled_error(got, want) < 1.5e-2
    assert np.array_equal(np.argmax(got, -1), np.argmax(want, -1))


# ------------------------------------------------------------------ serving in bf16


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "bfloat16"])
def test_tiny_bf16_engine_on_two_stages_matches_its_forward_pass(tiny_bf16, kv_cache_dtype):
    """Decode on two stages (float32 activations between them), with mixed-length prompts
    batched, gives the tokens of the one-sequence forward pass over a cache of the same dtype:
    float32 under "auto" on CPU, or bf16 pages when asked for."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 512, size=n).tolist() for n in (1, 5, 17, 30)]
    llm = LLM(tiny_bf16, plan=[2, 4], num_pages=64, max_model_len=64, kv_cache_dtype=kv_cache_dtype)
    kv_dtype = resolve_kv_dtype(kv_cache_dtype, "bfloat16", jax.devices()[0].platform)
    assert llm.engine.kv_dtype == kv_dtype
    for stage in llm.engine.executor.stages:
        assert {a.dtype for pair in stage.pools.as_list() for a in pair} == {kv_dtype}
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.token_ids) == N_NEW
        assert out.token_ids == _teacher_forced_greedy(
            tiny_bf16.model, prompt, out.token_ids, kv_dtype=kv_dtype
        )


@pytest.mark.smollm2
def test_smollm2_bf16_engine_on_two_stages_matches_its_forward_pass(smol_bf16):
    tok = smol_bf16.tokenizer
    prompts = [tok.encode(p) for p in ("The capital of France is", "Once upon a time, there was")]
    llm = LLM(smol_bf16, plan=[15, 15], num_pages=64, max_model_len=64)
    kv_dtype = llm.engine.kv_dtype
    assert kv_dtype == resolve_kv_dtype("auto", "bfloat16", jax.devices()[0].platform)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _teacher_forced_greedy(
            smol_bf16.model, prompt, out.token_ids, kv_dtype=kv_dtype
        )
        assert out.text == tok.decode(out.token_ids)


# ------------------------------------------------------------------ bad input


def test_auto_kv_dtype_is_float32_on_cpu_and_the_models_elsewhere():
    assert resolve_kv_dtype("auto", "bfloat16", "cpu") == np.float32
    assert resolve_kv_dtype("auto", "bfloat16", "gpu") == ml_dtypes.bfloat16
    assert resolve_kv_dtype("float16", "float32", "cpu") == np.float16


def test_kv_cache_dtype_from_a_config_reaches_the_engine_and_the_planner(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\nname = "tiny-random"\ndtype = "bfloat16"\n[plan]\nstages = [3, 3]\n'
        '[kv]\nnum_pages = 32\nkv_cache_dtype = "float32"\n'
    )
    opts = load_config(str(path)).engine_options()
    assert opts["kv_cache_dtype"] == "float32"
    shape = model_shape_for("smollm2-135m", "bfloat16", opts["kv_cache_dtype"])
    assert shape.page_bytes_per_layer(16) == 2 * model_shape_for(
        "smollm2-135m", "bfloat16"
    ).page_bytes_per_layer(16)
    path.write_text(path.read_text().replace('"float32"', '"fp8"'))
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        load_config(str(path))


def test_llm_refuses_an_unknown_dtype():
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        LLM("tiny-random", dtype="int8")


def test_engine_refuses_an_unknown_kv_cache_dtype(tiny):
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of"):
        LLM(tiny, kv_cache_dtype="fp8")


def test_llm_refuses_a_dtype_other_than_the_loaded_models(tiny):
    with pytest.raises(ConfigError, match="dtype='bfloat16' but the loaded model"):
        LLM(tiny, dtype="bfloat16")


def test_a_one_row_bf16_head_multiplies_bf16_without_widening_the_weight(tiny_bf16):
    """One sequence's logits: the product stays bf16 x bf16 (XLA on CPU would otherwise convert
    the whole [vocab, hidden] weight to float32 at every step) and equals the reference."""
    from flax import nnx

    from pipelive_jax.models.llama import split_model

    cfg = tiny_bf16.config
    defs, _, _, head_state = split_model(tiny_bf16.model)
    h = np.random.default_rng(0).standard_normal((1, cfg.hidden_size)).astype(np.float32)
    fn = jax.jit(lambda st, x: nnx.merge(defs.head_def, st)(x))
    hlo = fn.lower(head_state, h).compile().as_text()
    widened = f"f32[{cfg.vocab_size},{cfg.hidden_size}]"
    assert not [ln for ln in hlo.splitlines() if "convert" in ln and widened in ln]

    # The reference: the norm in float32 (as the model's), its output rounded to bf16.
    head = tiny_bf16.model.head
    w = np.asarray(head.weight[...]).astype(np.float64)
    g = np.asarray(head.norm.weight[...]).astype(np.float64)
    y = ref.rms_norm(h.astype(np.float64), g, cfg.rms_norm_eps).astype(np.float32)
    want = ref._linear(y.astype(np.float64), w, round_to=ml_dtypes.bfloat16)
    np.testing.assert_allclose(np.asarray(fn(head_state, h)), want, rtol=1e-4, atol=1e-5)
