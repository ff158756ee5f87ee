"""Byte accounting, max_pages / B_shrink against hand computations, refusals, live bytes."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipelive_jax.errors import AdmissionError
from pipelive_jax.memory import (
    RESERVED_PAGES,
    DeviceBudget,
    ModelShape,
    admit,
    check_admission,
    live_bytes_per_device,
    max_pages,
    round_capacity,
    stage_extra_bytes,
)
from pipelive_jax.plan import parse_plan

SMOLLM2 = ModelShape(
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    tie_embeddings=True,
)

# A toy model whose numbers are easy to follow by hand:
#   W = (attn 8*8 + 2*8*4 + 8*8 = 192) + (mlp 3*8*16 = 384) + (norms 2*8 = 16) = 592 * 4 B = 2368
#   embed = 32*8*4 = 1024; head (untied) = (8 + 32*8)*4 = 1056; P(page_size=2) = 2*1*2*4*4 = 64
TOY = ModelShape(
    num_layers=4,
    hidden_size=8,
    intermediate_size=16,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    vocab_size=32,
    tie_embeddings=False,
)


def test_smollm2_bytes():
    assert SMOLLM2.weight_bytes_per_layer() == 3_540_096 * 4
    assert SMOLLM2.embed_bytes() == 49152 * 576 * 4
    assert SMOLLM2.head_bytes() == 576 * 4  # tied: only the final norm
    assert SMOLLM2.total_weight_bytes() == 538_060_032  # NOTES.md: ~540 MB in fp32
    assert SMOLLM2.page_bytes_per_layer(16) == 2 * 3 * 16 * 64 * 4
    untied = ModelShape(**{**SMOLLM2.__dict__, "tie_embeddings": False})
    assert untied.head_bytes() == (576 + 49152 * 576) * 4
    bf16_kv = ModelShape(**{**SMOLLM2.__dict__, "kv_dtype_bytes": 2})
    assert bf16_kv.page_bytes_per_layer(16) == 2 * 3 * 16 * 64 * 2


def test_toy_bytes():
    assert TOY.weight_bytes_per_layer() == 2368
    assert TOY.embed_bytes() == 1024
    assert TOY.head_bytes() == 1056
    assert TOY.page_bytes_per_layer(2) == 64


def test_max_pages_hand_computed():
    budget = DeviceBudget(0, memory_bytes=1_000_000_000, utilization=0.9, workspace_bytes=8_000_000)
    # (900,000,000 - 10 * 14,160,384 - 8,000,000) // (10 * 24,576) = 750,396,160 // 245,760
    assert max_pages(budget, SMOLLM2, 10, 16) == 3053
    # extra bytes come off the top: the embedding on the first stage.
    assert max_pages(budget, SMOLLM2, 10, 16, extra_bytes=113_246_208) == (
        (750_396_160 - 113_246_208) // 245_760
    )
    assert budget.usable_bytes == 892_000_000


def test_max_pages_weights_do_not_fit_and_no_layers():
    tiny = DeviceBudget(0, memory_bytes=10_000_000)
    assert max_pages(tiny, SMOLLM2, 30, 16) == 0
    with pytest.raises(ValueError, match="at least one resident layer"):
        max_pages(tiny, SMOLLM2, 0, 16)


def test_stage_extra_bytes():
    three = parse_plan("1,2,1", num_layers=4)
    assert stage_extra_bytes(TOY, three, 0) == 1024
    assert stage_extra_bytes(TOY, three, 1) == 0
    assert stage_extra_bytes(TOY, three, 2) == 1056
    one = parse_plan(None, num_layers=30)
    assert stage_extra_bytes(SMOLLM2, one, 0) == SMOLLM2.embed_bytes() + 576 * 4
    # Tied embeddings: a last stage apart from the first holds its own copy of the embedding.
    two = parse_plan("15,15", num_layers=30)
    assert stage_extra_bytes(SMOLLM2, two, 1) == SMOLLM2.embed_bytes() + 576 * 4


def test_round_capacity():
    assert round_capacity(130, 64) == 128
    assert round_capacity(130, 64, mode="up") == 192
    assert round_capacity(128, 64, mode="up") == 128
    assert round_capacity(63, 64) == 0
    assert round_capacity(7, 1) == 7
    for bad in ((-1, 64), (10, 0)):
        with pytest.raises(ValueError):
            round_capacity(*bad)
    with pytest.raises(ValueError, match="mode"):
        round_capacity(1, 1, mode="sideways")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Admission


OLD = parse_plan("2,2", num_layers=4)  # [0:2)@0 | [2:4)@1
NEW = parse_plan("1,3", num_layers=4)  # [0:1)@0 | [1:4)@1: layer 1 moves 0 -> 1
BUDGETS = {
    0: DeviceBudget(0, memory_bytes=20_000, utilization=0.5),
    1: DeviceBudget(1, memory_bytes=30_000, utilization=0.5, workspace_bytes=1_000),
}


def test_admission_numbers_hand_computed():
    adm = admit(OLD, NEW, BUDGETS, TOY, page_size=2, pages_in_use={0: 29, 1: 29})
    d0, d1 = adm.devices[0], adm.devices[1]
    # Device 0: layers {0, 1} during the transition, embedding:
    #   (10,000 - 2*2368 - 1024) // (2*64) = 4240 // 128 = 33;  target {0}: 6608 // 64 = 103
    assert (d0.resident_layers_transition, d0.resident_layers_target) == (2, 1)
    assert d0.extra_bytes_transition == 1024
    assert (d0.max_pages_transition, d0.max_pages_target) == (33, 103)
    # Device 1: layers {1, 2, 3} (old {2, 3} union new {1, 2, 3}), head, 1000 B workspace:
    #   (15,000 - 1000 - 3*2368 - 1056) // (3*64) = 5840 // 192 = 30, same after the switch
    assert (d1.resident_layers_transition, d1.resident_layers_target) == (3, 3)
    assert (d1.max_pages_transition, d1.max_pages_target) == (30, 30)
    assert (adm.b_shrink, adm.device, adm.pages_needed) == (30, 1, 29)
    assert d0.pages_in_use == 29
    # 29 pages in use + the reserved page 0 = 30 <= B_shrink.
    assert adm.ok and adm.reason is None and adm.pages_that_fit == 29
    assert check_admission(OLD, NEW, BUDGETS, TOY, 2, {0: 29, 1: 29}) == adm


def test_admission_refused_message_and_numbers():
    adm = admit(OLD, NEW, BUDGETS, TOY, page_size=2, pages_in_use={0: 30, 1: 30})
    assert not adm.ok
    with pytest.raises(AdmissionError) as info:
        check_admission(OLD, NEW, BUDGETS, TOY, 2, {0: 30, 1: 30})
    msg = str(info.value)
    assert "device 1" in msg
    assert "30 pages are in use" in msg
    assert "can fit only 29 pages" in msg
    assert "3 layers during the transition" in msg
    assert "free at least 1 pages" in msg
    n = info.value.numbers
    assert (n["device"], n["pages_in_use"], n["pages_that_fit"], n["b_shrink"]) == (1, 30, 29, 30)
    assert n["resident_layers"] == 3
    assert n["devices"][0]["max_pages_transition"] == 33


def test_admission_granule_rounds_capacities_down():
    adm = admit(OLD, NEW, BUDGETS, TOY, 2, {0: 20, 1: 20}, granule=8)
    assert adm.devices[0].max_pages_transition == 32
    assert adm.devices[0].max_pages_target == 96
    assert adm.b_shrink == 24 and adm.ok
    assert not admit(OLD, NEW, BUDGETS, TOY, 2, {0: 24, 1: 24}, granule=8).ok


def test_admission_new_and_leaving_devices():
    new = parse_plan(
        {"stages": [{"devices": [0], "layers": [0, 2]}, {"devices": [2], "layers": [2, 4]}]},
        num_layers=4,
    )
    budgets = {**BUDGETS, 2: DeviceBudget(2, memory_bytes=8_000, utilization=1.0)}
    # Device 2 is new: it needs the pages every stage holds although it has none yet.
    adm = admit(OLD, new, budgets, TOY, 2, {0: 25, 1: 25})
    assert adm.devices[1].max_pages_target is None  # device 1 leaves the pipeline
    assert adm.devices[1].resident_layers_transition == 2
    # (8000 - 2*2368 - 1056) // 128 = 2208 // 128 = 17
    assert adm.devices[2].max_pages_transition == 17
    assert adm.device == 2 and adm.b_shrink == 17 and not adm.ok
    assert "device 2" in adm.reason and "25 pages are in use" in adm.reason


def test_admission_first_deployment_and_missing_budget():
    adm = admit(None, OLD, BUDGETS, TOY, 2, {})
    assert adm.devices[0].resident_layers_transition == 2
    assert adm.devices[0].max_pages_transition == adm.devices[0].max_pages_target == 33
    assert adm.pages_needed == 0 and adm.ok
    with pytest.raises(AdmissionError, match=r"no memory budget for device\(s\) \[1\]") as info:
        admit(OLD, NEW, {0: BUDGETS[0]}, TOY, 2, {})
    assert info.value.numbers == {"devices": [1]}


def test_admission_weights_do_not_fit():
    budgets = {0: DeviceBudget(0, 4_000, 1.0), 1: DeviceBudget(1, 100_000, 1.0)}
    with pytest.raises(AdmissionError, match="device 0 cannot even hold the weights"):
        check_admission(OLD, NEW, budgets, TOY, 2, {0: 1})


def test_admission_reserved_page_counts():
    assert RESERVED_PAGES == 1
    adm = admit(OLD, NEW, BUDGETS, TOY, 2, {0: 0, 1: 0})
    assert adm.ok and adm.pages_that_fit == adm.b_shrink - 1


# --------------------------------------------------------------------------------------------
# Live bytes from jax.live_arrays()


def _need_devices(n: int) -> list[jax.Device]:
    devs = jax.devices()
    if len(devs) < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return devs


def test_live_bytes_per_device():
    devs = _need_devices(8)
    gc.collect()
    before = live_bytes_per_device()

    def delta() -> dict[int, int]:
        now = live_bytes_per_device()
        return {
            d: now.get(d, 0) - before.get(d, 0)
            for d in set(now) | set(before)
            if now.get(d, 0) != before.get(d, 0)
        }

    a = jax.device_put(np.zeros((100, 10), np.float32), devs[2])
    b = jax.device_put(np.zeros(7, np.int8), devs[3])
    mesh = Mesh(np.array(devs[4:8]), ("x",))
    sharded = jax.device_put(np.zeros((8, 16), np.float32), NamedSharding(mesh, PartitionSpec("x")))
    replicated = jax.device_put(
        np.zeros(4, np.float64 if jax.config.x64_enabled else np.float32),
        NamedSharding(mesh, PartitionSpec()),
    )
    rep = replicated.nbytes
    assert delta() == {
        devs[2].id: 4000,
        devs[3].id: 7,
        **{d.id: 8 * 16 * 4 // 4 + rep for d in devs[4:8]},
    }
    a.delete()
    del b, sharded, replicated
    gc.collect()
    assert delta() == {}
