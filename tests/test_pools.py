"""StagePools: allocation, layers in and out, byte-exact remap / compaction / shrink / grow,
refusals that change nothing, and the one-layer peak of a resize measured on the device."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipelive_jax.errors import AdmissionError, PipeliveError
from pipelive_jax.kv import pools as pools_mod
from pipelive_jax.kv.pools import (
    KVSpec,
    StagePools,
    capacity_bucket,
    compaction_plan,
    round_capacity,
)
from pipelive_jax.memory import live_bytes_per_device

SPEC = KVSpec(kv_heads=2, head_dim=8, page_size=4, dtype=jnp.float32)


def _device(i: int) -> jax.Device:
    devs = jax.devices()
    if len(devs) <= i:
        pytest.skip(f"needs {i + 1} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return devs[i]


def _filled(spec: KVSpec, num_pages: int, device, layers, seed: int = 0) -> StagePools:
    """Pools whose every page holds distinct random values (numpy copies kept by the caller)."""
    pools = StagePools(spec, num_pages, device, layers)
    rng = np.random.default_rng(seed)
    for layer in pools.layers:
        k, v = (
            jax.device_put(
                rng.standard_normal(pools.pool_shape()).astype(spec.dtype), pools.sharding
            )
            for _ in range(2)
        )
        pools.set_layer(layer, k, v)
    return pools


def _host(pools: StagePools) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    # Copies, not views: on CPU `np.asarray(array)` aliases the device buffer, and a buffer with
    # an outside reference cannot be donated (XLA silently copies instead).
    return {
        layer: (np.array(k, copy=True), np.array(v, copy=True))
        for layer, (k, v) in pools.pools.items()
    }


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------------------------
# Allocation and layers


def test_allocation_zeroed_and_placed():
    dev = _device(1)
    pools = StagePools(SPEC, 16, dev, layers=[7, 3, 5])
    assert pools.layers == (3, 5, 7)
    assert pools.pool_shape() == (2, 16, 4, 8)
    assert pools.bytes_per_layer() == 2 * 2 * 16 * 4 * 8 * 4
    assert pools.total_bytes() == 3 * pools.bytes_per_layer()
    assert SPEC.page_bytes() * 16 == pools.bytes_per_layer()
    for k, v in pools.as_list():
        assert k.devices() == {dev} and v.devices() == {dev}
        assert not np.asarray(k).any() and not np.asarray(v).any()
    pools.check_invariants()


def test_allocator_is_cached_per_shape():
    dev = _device(1)
    pools_mod._zeros_pair_fn.cache_clear()
    StagePools(SPEC, 12, dev, layers=range(4))
    StagePools(SPEC, 12, dev, layers=range(2))
    info = pools_mod._zeros_pair_fn.cache_info()
    assert (info.misses, info.hits) == (1, 5)


def test_add_remove_set_layer():
    dev = _device(1)
    pools = StagePools(SPEC, 8, dev, layers=[0, 1])
    pools.add_layer(4)
    assert pools.layers == (0, 1, 4)
    with pytest.raises(ValueError, match="layer 4 already has pools"):
        pools.add_layer(4)
    k, v = pools.remove_layer(1)
    assert pools.layers == (0, 4) and k.shape == (2, 8, 4, 8)
    with pytest.raises(ValueError, match=r"layer 1 has no pools on this stage \(layers \(0, 4\)\)"):
        pools.remove_layer(1)
    pools.set_layer(9, k, v)
    assert pools.layers == (0, 4, 9) and pools.pools[9] == (k, v)
    with pytest.raises(ValueError, match=r"expected float32\[2, 8, 4, 8\]"):
        pools.set_layer(9, k[:, :4], v)
    with pytest.raises(ValueError, match="expected float32"):
        pools.set_layer(9, k.astype(jnp.bfloat16), v)
    other = jax.device_put(np.zeros(k.shape, np.float32), _device(2))
    with pytest.raises(ValueError, match="placed on"):
        pools.set_layer(9, other, v)
    pairs = pools.as_list([9, 0])
    assert pairs[0] == (k, v)
    pools.set_all(pairs, [9, 0])
    with pytest.raises(ValueError, match="2 pool pairs for 3 layers"):
        pools.set_all(pairs)
    pools.check_invariants()
    pools.delete()
    assert pools.layers == () and k.is_deleted()


def test_capacity_checks():
    dev = _device(0)
    with pytest.raises(ValueError, match="at least 2 pages"):
        StagePools(SPEC, 1, dev)
    with pytest.raises(ValueError, match="positive integer"):
        KVSpec(kv_heads=0, head_dim=8, page_size=4)


def test_capacity_bucket():
    assert capacity_bucket(130) == 128
    assert capacity_bucket(130, up=True) == 192
    assert capacity_bucket(130, granule=16) == 128
    assert capacity_bucket(100, [32, 64, 128]) == 64
    assert capacity_bucket(100, [32, 64, 128], up=True) == 128
    with pytest.raises(ValueError, match="no capacity bucket fits"):
        capacity_bucket(10, [32, 64])
    with pytest.raises(ValueError, match="no capacity bucket holds"):
        capacity_bucket(100, [32, 64], up=True)
    assert round_capacity is pools_mod.round_capacity


# --------------------------------------------------------------------------------------------
# Compaction plan (pure)


def test_compaction_plan_example():
    src, dst = compaction_plan(np.array([9, 2, 7, 4]), target=6)
    # Live below 6: {2, 4}; free below 6: {1, 3, 5}; movers in order: 7 -> 1, 9 -> 3.
    assert src.tolist() == [7, 9] and dst.tolist() == [1, 3]
    assert src.dtype == np.int32 and dst.dtype == np.int32
    src, dst = compaction_plan(np.array([9, 2, 7, 4]))  # tightest: target 5
    assert src.tolist() == [7, 9] and dst.tolist() == [1, 3]
    src, dst = compaction_plan(np.array([], np.int32), target=4)
    assert src.size == 0 and dst.size == 0


def test_compaction_plan_errors():
    with pytest.raises(AdmissionError, match="4 live pages cannot fit a capacity of 4 pages") as e:
        compaction_plan(np.array([1, 2, 3, 9]), target=4)
    assert e.value.numbers == {"pages_in_use": 4, "capacity": 4}
    with pytest.raises(ValueError, match="page 0 cannot be live"):
        compaction_plan(np.array([0, 3]))
    with pytest.raises(ValueError, match="distinct"):
        compaction_plan(np.array([3, 3]))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_compaction_plan_properties(data):
    live = np.array(sorted(data.draw(st.sets(st.integers(1, 200), max_size=60))), np.int64)
    target = data.draw(st.integers(len(live) + 1, 260))
    src, dst = compaction_plan(live, target)
    assert sorted(src.tolist()) == sorted(x for x in live.tolist() if x >= target)
    assert all(1 <= d < target for d in dst.tolist())
    assert not set(dst.tolist()) & set(live.tolist())
    mapping = dict(zip(src.tolist(), dst.tolist(), strict=True))
    after = [mapping.get(p, p) for p in live.tolist()]
    assert len(set(after)) == len(after) and max(after, default=0) < target


# --------------------------------------------------------------------------------------------
# Moving pages: byte-identical against numpy


def test_remap_pages_matches_numpy():
    dev = _device(1)
    pools = _filled(SPEC, 16, dev, [0, 2, 5])
    before = _host(pools)
    old_arrays = pools.as_list()
    src = np.array([3, 9, 14, 9])
    dst = np.array([9, 1, 3, 15])  # overlapping src/dst and a repeated source
    pools.remap_pages(src, dst)
    for layer, (k0, v0) in before.items():
        for a0, a in ((k0, pools.pools[layer][0]), (v0, pools.pools[layer][1])):
            want = a0.copy()
            want[:, dst] = a0[:, src]
            assert _same_bytes(np.asarray(a), want)
    # The old pools were donated: nothing keeps a second copy alive.
    assert all(k.is_deleted() and v.is_deleted() for k, v in old_arrays)
    pools.check_invariants()


def test_remap_pages_validation():
    dev = _device(1)
    pools = _filled(SPEC, 8, dev, [0])
    before = _host(pools)
    for src, dst, msg in [
        ([0], [1], r"src page ids must be in \[1, 8\)"),
        ([1], [8], r"dst page ids must be in \[1, 8\)"),
        ([1, 2], [3, 3], "distinct"),
        ([1, 2], [3], "src has 2 pages but dst has 1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            pools.remap_pages(np.array(src), np.array(dst))
    pools.remap_pages(np.array([], np.int32), np.array([], np.int32))
    for layer, (k0, v0) in before.items():
        assert _same_bytes(np.asarray(pools.pools[layer][0]), k0)
        assert _same_bytes(np.asarray(pools.pools[layer][1]), v0)


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_compact_then_shrink_keeps_live_pages(data):
    dev = _device(1)
    num_pages = 32
    live = np.array(
        sorted(data.draw(st.sets(st.integers(1, num_pages - 1), max_size=20))), np.int64
    )
    target = data.draw(st.integers(max(2, len(live) + 1), num_pages))
    pools = _filled(SPEC, num_pages, dev, [1, 3], seed=len(live))
    before = _host(pools)
    src, dst = compaction_plan(live, target)
    pools.remap_pages(src, dst)
    mapping = dict(zip(src.tolist(), dst.tolist(), strict=True))
    new_ids = np.array([mapping.get(p, p) for p in live.tolist()], np.int64)
    pools.resize(target, live_max_page=int(new_ids.max(initial=0)))
    assert pools.num_pages == target
    pools.check_invariants()
    for layer, (k0, v0) in before.items():
        k, v = (np.asarray(a) for a in pools.pools[layer])
        assert _same_bytes(k[:, new_ids], k0[:, live]) and _same_bytes(v[:, new_ids], v0[:, live])


def test_grow_and_shrink_byte_identical():
    dev = _device(2)
    pools = _filled(SPEC, 12, dev, [0, 1, 2])
    before = _host(pools)
    pools.resize(40)
    assert pools.num_pages == 40
    pools.check_invariants()
    for layer, (k0, v0) in before.items():
        for a0, a in zip((k0, v0), (np.asarray(x) for x in pools.pools[layer]), strict=True):
            assert _same_bytes(a[:, :12], a0)
            assert not a[:, 12:].any()
    pools.resize(7, live_max_page=6)
    for layer, (k0, v0) in before.items():
        for a0, a in zip((k0, v0), (np.asarray(x) for x in pools.pools[layer]), strict=True):
            assert _same_bytes(a, a0[:, :7])
    pools.resize(7, live_max_page=100)  # same size: nothing to do, nothing refused
    assert pools.num_pages == 7


def test_shrink_below_live_pages_refused_changes_nothing():
    dev = _device(2)
    pools = _filled(SPEC, 16, dev, [4, 5])
    arrays = dict(pools.pools)
    before = _host(pools)
    with pytest.raises(AdmissionError, match="page 9 is in use") as info:
        pools.resize(8, live_max_page=9)
    assert isinstance(info.value, PipeliveError)
    assert info.value.numbers == {"num_pages": 16, "new_num_pages": 8, "live_max_page": 9}
    with pytest.raises(AdmissionError, match="page 8 is in use"):
        pools.resize(8, live_max_page=8)
    with pytest.raises(AdmissionError, match="needs the highest live page id"):
        pools.resize(8)
    assert pools.num_pages == 16 and pools.pools == arrays
    for layer, (k0, v0) in before.items():
        assert _same_bytes(np.asarray(pools.pools[layer][0]), k0)
        assert _same_bytes(np.asarray(pools.pools[layer][1]), v0)
    pools.check_invariants()


# --------------------------------------------------------------------------------------------
# Peak memory of a resize, measured with jax.live_arrays()


@pytest.mark.parametrize(("old", "new"), [(24, 64), (64, 24)])
def test_resize_peak_is_one_layer(old, new):
    dev = _device(5)
    gc.collect()
    base = live_bytes_per_device().get(dev.id, 0)
    num_layers = 6
    pools = _filled(SPEC, old, dev, range(num_layers))
    old_layer, new_layer = SPEC.pool_bytes(old), SPEC.pool_bytes(new)
    assert live_bytes_per_device()[dev.id] - base == num_layers * old_layer
    bound = max(old_layer, new_layer) * num_layers + new_layer
    seen: list[int] = []

    def on_layer_step(layer: int) -> None:
        used = live_bytes_per_device().get(dev.id, 0) - base
        done = len(seen) + 1
        # Old arrays are gone before the next layer allocates: the device holds exactly the
        # converted layers at the new size and the rest at the old size, and never more than
        # the pools plus one layer's pool.
        assert used == done * new_layer + (num_layers - done) * old_layer
        assert used <= bound
        seen.append(layer)

    pools.resize(new, live_max_page=new - 1, on_layer_step=on_layer_step)
    assert seen == list(range(num_layers))
    assert live_bytes_per_device()[dev.id] - base == num_layers * new_layer
    pools.delete()


def test_sharded_pools():
    devs = jax.devices()
    if len(devs) < 8:
        pytest.skip("needs 8 devices")
    mesh = Mesh(np.array(devs[6:8]), ("tp",))
    sharding = NamedSharding(mesh, PartitionSpec("tp"))  # kv_heads split over two devices
    gc.collect()
    base = live_bytes_per_device()
    pools = _filled(SPEC, 10, sharding, [0, 1])
    live = live_bytes_per_device()
    for d in devs[6:8]:
        assert live[d.id] - base.get(d.id, 0) == pools.total_bytes() // 2
    before = _host(pools)
    pools.remap_pages(np.array([7]), np.array([2]))
    pools.resize(20)
    pools.check_invariants()
    for layer, (k0, _) in before.items():
        k = np.asarray(pools.pools[layer][0])
        want = np.zeros((2, 20, 4, 8), np.float32)
        want[:, :10] = k0
        want[:, 2] = k0[:, 7]
        assert _same_bytes(k, want)
        assert pools.pools[layer][0].sharding.is_equivalent_to(sharding, 4)
