"""Model loaders: Hugging Face directories, registry errors, Orbax checkpoints and layer restore."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from pipelive_jax.errors import ModelLoadError
from pipelive_jax.models.checkpoint import (
    is_checkpoint_dir,
    load_checkpoint_dir,
    restore_checkpoint,
    restore_layers,
    save_checkpoint,
)
from pipelive_jax.models.hf_loader import load_hf_dir, save_hf_dir
from pipelive_jax.models.llama import full_sequence_logits, split_model
from pipelive_jax.models.registry import TINY_RANDOM, load_model, tiny_random

needs_3_devices = pytest.mark.skipif(
    len(jax.devices()) < 3, reason="needs 3 devices (XLA_FLAGS host device count)"
)


def leaves_equal(a, b) -> bool:
    """Same tree structure and byte-identical leaves (dtype included)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-hf"
    save_hf_dir(tiny, path)
    return path


@pytest.fixture
def hf_copy(hf_dir, tmp_path):
    """A private copy of the tiny HF directory that a test may break."""
    return shutil.copytree(hf_dir, tmp_path / "model")


def edit_config(path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is ...]:
        del cfg[k]
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn) -> None:
    file = str(path / "model.safetensors")
    weights = fn(load_file(file))
    save_file(weights, file)


# --------------------------------------------------------------------------- Hugging Face dirs


def test_hf_round_trip_identical_arrays_and_logits(tiny, hf_dir):
    loaded = load_hf_dir(hf_dir)
    assert loaded.config == tiny.config
    assert loaded.tokenizer is None
    assert loaded.source == str(hf_dir)
    original = tiny.model.hf_state_dict()
    again = loaded.model.hf_state_dict()
    assert original.keys() == again.keys()
    for name in original:
        assert leaves_equal(original[name], again[name]), name
    ids = [1, 17, 42, 3, 99, 250, 7]
    np.testing.assert_array_equal(
        full_sequence_logits(loaded.model, ids), full_sequence_logits(tiny.model, ids)
    )


def test_load_model_routes_hf_directory(tiny, hf_dir):
    loaded = load_model(str(hf_dir))
    assert loaded.config == tiny.config
    assert leaves_equal(loaded.model.embed[...], tiny.model.embed[...])


def test_bf16_safetensors_and_tied_embeddings(tmp_path):
    cfg = dataclasses.replace(TINY_RANDOM, num_layers=2, tie_embeddings=True)
    tied = tiny_random(seed=3, config=cfg)
    save_hf_dir(tied, tmp_path / "f32")
    assert "lm_head.weight" not in load_file(str(tmp_path / "f32" / "model.safetensors"))
    as_bf16 = load_hf_dir(tmp_path / "f32", dtype="bfloat16")
    assert as_bf16.model.embed[...].dtype == np.dtype("bfloat16")
    save_hf_dir(as_bf16, tmp_path / "bf16")  # bf16 tensors in the file, as HF repos ship them
    raw = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert raw["model.embed_tokens.weight"].dtype == np.dtype("bfloat16")
    back = load_hf_dir(tmp_path / "bf16", dtype="float32")
    assert back.config.tie_embeddings
    expect = np.asarray(tied.model.embed[...]).astype("bfloat16").astype(np.float32)
    np.testing.assert_array_equal(np.asarray(back.model.embed[...]), expect)
    np.testing.assert_array_equal(np.asarray(back.model.head.weight[...]), expect)


def test_sharded_safetensors_with_index(tiny, hf_copy):
    weights = load_file(str(hf_copy / "model.safetensors"))
    os.remove(hf_copy / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(hf_copy / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    # Mistral repos also ship consolidated weights under other names: the index excludes them.
    save_file(
        {"tok_embeddings.weight": weights["model.embed_tokens.weight"]},
        str(hf_copy / "consolidated.safetensors"),
    )
    loaded = load_hf_dir(hf_copy)
    assert leaves_equal(loaded.model.hf_state_dict(), tiny.model.hf_state_dict())


@pytest.mark.parametrize(
    "changes",
    [
        {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None},
        {"eos_token_id": [2, 7]},  # Llama 3 lists every end-of-turn id
        {"rope_theta": ..., "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    ],
    ids=["mistral-no-window", "eos-list", "transformers5-rope"],
)
def test_config_variants_accepted(tiny, hf_copy, changes):
    edit_config(hf_copy, **changes)
    loaded = load_hf_dir(hf_copy)
    assert loaded.config == tiny.config


def test_unprefixed_tensor_names(tiny, hf_copy):
    edit_weights(hf_copy, lambda w: {k.removeprefix("model."): v for k, v in w.items()})
    assert leaves_equal(load_hf_dir(hf_copy).model.hf_state_dict(), tiny.model.hf_state_dict())


def test_tokenizer_read_when_present(hf_copy):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = HFTokenizer(WordLevel({"<s>": 1, "</s>": 2, "hi": 3, "[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    backend.save(str(hf_copy / "tokenizer.json"))
    loaded = load_hf_dir(hf_copy)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.encode("hi hi") == [3, 3]
    assert (loaded.tokenizer.bos_token_id, loaded.tokenizer.eos_token_id) == (1, 2)  # from config
    save_hf_dir(loaded, hf_copy.parent / "again")
    assert load_hf_dir(hf_copy.parent / "again").tokenizer.encode("hi") == [3]


def _drop(name):
    return lambda w: {k: v for k, v in w.items() if k != name}


def _reshape(name):
    return lambda w: {**w, name: np.zeros((3, 5), np.float32)}


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda p: os.remove(p / "config.json"), "no config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda p: edit_config(p, model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (
            lambda p: edit_config(p, architectures=["LlamaForSequenceClassification"]),
            "architecture 'LlamaForSequenceClassification' is not supported",
        ),
        (
            lambda p: edit_config(
                p, model_type="mistral", sliding_window=4096, max_position_embeddings=32768
            ),
            "sliding_window 4096 is not supported",
        ),
        (lambda p: edit_config(p, num_attention_heads=5), "num_heads 5 must be a multiple"),
        (lambda p: edit_config(p, hidden_size=...), "config.json has no 'hidden_size'"),
        (
            lambda p: edit_config(p, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            "unsupported rope_scaling",
        ),
        (lambda p: os.remove(p / "model.safetensors"), "no *.safetensors files"),
        (
            lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 5),
            "cannot read model.safetensors",
        ),
        (
            lambda p: edit_weights(p, _drop("model.layers.3.mlp.up_proj.weight")),
            "missing tensor 'model.layers.3.mlp.up_proj.weight'",
        ),
        (
            lambda p: edit_weights(p, _reshape("model.layers.1.self_attn.k_proj.weight")),
            "tensor 'model.layers.1.self_attn.k_proj.weight' has shape",
        ),
        (lambda p: edit_weights(p, _drop("lm_head.weight")), "missing tensor 'lm_head.weight'"),
    ],
    ids=[
        "no-config",
        "bad-json",
        "model-type",
        "architecture",
        "sliding-window",
        "bad-heads",
        "missing-key",
        "rope-scaling",
        "no-safetensors",
        "corrupt-safetensors",
        "missing-tensor",
        "shape-mismatch",
        "untied-no-head",
    ],
)
def test_hf_dir_errors_name_path_and_problem(hf_copy, breakage, expected):
    breakage(hf_copy)
    with pytest.raises(ModelLoadError) as err:
        load_hf_dir(hf_copy)
    msg = str(err.value)
    assert str(hf_copy) in msg
    assert expected in msg


def test_hf_dir_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_hf_dir(tmp_path / "absent")


# --------------------------------------------------------------------------- registry errors


def test_load_model_unknown_name():
    with pytest.raises(ModelLoadError, match="unknown model 'llama-9000'.*tiny-random"):
        load_model("llama-9000")


def test_tiny_random_honours_dtype_and_a_bad_dtype_is_named(tiny):
    import jax
    from flax import nnx

    from pipelive_jax.errors import ConfigError

    bf16 = load_model("tiny-random", dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(bf16.model))
    assert {str(a.dtype) for a in leaves} == {"bfloat16"}
    # The same seeded weights, rounded: not a different model.
    ref = jax.tree.leaves(nnx.state(tiny.model))
    assert all(np.array_equal(np.asarray(a), np.asarray(b.astype(a.dtype))) for a, b in zip(leaves, ref, strict=True))
    with pytest.raises(ConfigError, match="dtype must be one of float32, bfloat16, float16, got 'bogus'"):
        load_model("tiny-random", dtype="bogus")


def test_load_model_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(ModelLoadError) as err:
        load_model(missing)
    assert missing in str(err.value)


def test_load_model_non_gguf_file_named_gguf(tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"this is a text file, not GGUF\n" * 4)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(fake))
    msg = str(err.value)
    assert str(fake) in msg and "GGUF" in msg
    assert "Traceback" not in msg and "\n" not in msg


def test_load_model_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- Orbax checkpoints


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-ckpt"
    save_checkpoint(tiny.model, path)  # arrays live on device 0
    assert {a.devices().pop() for a in jax.tree.leaves(nnx.state(tiny.model))} == {jax.devices()[0]}
    return path


@pytest.fixture(scope="module")
def two_device_mesh():
    return Mesh(np.array(jax.devices()[1:3]), ("stage",))


def test_checkpoint_round_trip_whole_model(tiny, ckpt):
    assert is_checkpoint_dir(ckpt)
    model = restore_checkpoint(ckpt)
    assert model.config == tiny.config
    assert leaves_equal(nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(tiny.model)))
    loaded = load_checkpoint_dir(ckpt)
    assert loaded.config == tiny.config and loaded.source == str(ckpt)


def test_checkpoint_tied_embeddings(tmp_path):
    cfg = dataclasses.replace(TINY_RANDOM, num_layers=2, tie_embeddings=True)
    tied = tiny_random(seed=5, config=cfg)
    save_checkpoint(tied, tmp_path / "c")
    model = restore_checkpoint(tmp_path / "c")
    assert leaves_equal(nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(tied.model)))
    assert leaves_equal(model.head.weight[...], model.embed[...])


@needs_3_devices
def test_restore_layers_replicated_onto_other_devices(tiny, ckpt, two_device_mesh):
    target = NamedSharding(two_device_mesh, PartitionSpec())
    defs, _, states, _ = split_model(tiny.model)
    restored = restore_layers(ckpt, [2, 3], target)
    assert len(restored) == 2
    for got, want in zip(restored, states[2:4], strict=True):
        assert jax.tree.structure(got) == jax.tree.structure(want)  # a StageParams.layers entry
        assert leaves_equal(got, want)
        for leaf in jax.tree.leaves(got):
            assert leaf.sharding == target
            assert leaf.devices() == set(jax.devices()[1:3])
        nnx.merge(defs.layer_def, got)  # merges back into a DecoderLayer


@needs_3_devices
def test_restore_layers_sharded_over_two_devices(tiny, ckpt, two_device_mesh):
    target = NamedSharding(two_device_mesh, PartitionSpec("stage"))
    _, _, states, _ = split_model(tiny.model)
    (got,) = restore_layers(ckpt, [4], target)
    assert leaves_equal(got, states[4])
    kernel = got["q_proj"]["kernel"][...]
    want = np.asarray(states[4]["q_proj"]["kernel"][...])
    assert kernel.sharding == target
    shards = sorted(kernel.addressable_shards, key=lambda s: s.device.id)
    assert [s.device for s in shards] == jax.devices()[1:3]
    half = want.shape[0] // 2
    np.testing.assert_array_equal(np.asarray(shards[0].data), want[:half])
    np.testing.assert_array_equal(np.asarray(shards[1].data), want[half:])


@needs_3_devices
def test_restore_layers_reads_only_those_layers(tiny, ckpt, two_device_mesh, monkeypatch):
    asked = []
    real_restore = ocp.Checkpointer.restore

    def spy(self, directory, *args, **kwargs):
        asked.append(kwargs["args"].item)
        return real_restore(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.Checkpointer, "restore", spy)
    target = NamedSharding(two_device_mesh, PartitionSpec())
    _, _, states, _ = split_model(tiny.model)
    restored = restore_layers(ckpt, [5, 1], target)
    (item,) = asked
    assert set(item) == {"layers"} and set(item["layers"]) == {"1", "5"}  # no embed, no head
    assert leaves_equal(restored[0], states[5]) and leaves_equal(restored[1], states[1])
    assert not leaves_equal(restored[0], states[4])


def test_checkpoint_errors(tiny, ckpt, tmp_path):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ModelLoadError, match="no layer 6 .*6 layers"):
        restore_layers(ckpt, [6], one)
    with pytest.raises(ModelLoadError, match="not a pipelive checkpoint"):
        restore_checkpoint(tmp_path)
    with pytest.raises(FileExistsError):
        save_checkpoint(tiny.model, ckpt)


def test_checkpoint_restore_casts_dtype(tiny, ckpt):
    model = restore_checkpoint(ckpt, dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {np.dtype("bfloat16")}
    want = np.asarray(tiny.model.layers[2].q_proj.kernel[...]).astype("bfloat16")
    assert leaves_equal(model.layers[2].q_proj.kernel[...], want)
