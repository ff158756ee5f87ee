"""PipelinePlan parsing, validation (every PlanError path), JSON round trips and plan_diff."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelive_jax.errors import PlanError
from pipelive_jax.plan import LayerMove, PipelinePlan, StageSpec, parse_plan, plan_diff


def _plan(*stages: tuple[int, int, int]) -> dict:
    """{"stages": ...} from (device, start, end) triples."""
    return {"stages": [{"devices": [d], "layers": [s, e]} for d, s, e in stages]}


# --------------------------------------------------------------------------------------------
# Accepted forms


def test_forms_agree():
    expected = PipelinePlan((StageSpec((0,), 0, 15), StageSpec((1,), 15, 30)))
    forms = [
        expected,
        [15, 15],
        (15, 15),
        "15,15",
        " 15 , 15 ",
        "[15, 15]",
        _plan((0, 0, 15), (1, 15, 30)),
        json.dumps(_plan((0, 0, 15), (1, 15, 30))),
        _plan((0, 0, 15), (1, 15, 30))["stages"],
        {"stages": [{"devices": 0, "layers": [0, 15]}, {"devices": 1, "layers": [15, 30]}]},
    ]
    for form in forms:
        assert parse_plan(form, num_layers=30, num_devices=2) == expected, form


def test_none_is_one_stage_on_device_0():
    p = parse_plan(None, num_layers=7)
    assert p == PipelinePlan((StageSpec((0,), 0, 7),))
    assert p.num_stages == 1 and p.num_layers == 7 and p.devices == (0,)


def test_plan_properties():
    p = parse_plan(_plan((3, 0, 4), (1, 4, 5), (6, 5, 12)), num_layers=12, num_devices=8)
    assert p.num_stages == 3
    assert p.num_layers == 12
    assert p.devices == (3, 1, 6)
    assert [p.stage_of_layer(i) for i in range(12)] == [0] * 4 + [1] + [2] * 7
    assert p.stages[2].num_layers == 7 and p.stages[2].layers == range(5, 12)
    assert p.stage_of_device(6) == 2 and p.stage_of_device(0) is None
    assert p.layers_on(1) == range(4, 5) and list(p.layers_on(0)) == []
    assert str(p) == "[0:4)@3 | [4:5)@1 | [5:12)@6"
    assert p.to_json() == _plan((3, 0, 4), (1, 4, 5), (6, 5, 12))
    for bad in (-1, 12, 1.0):
        with pytest.raises(PlanError, match="outside the plan's layers 0..11"):
            p.stage_of_layer(bad)


def test_multi_device_stage_str_and_json():
    spec = {"stages": [{"devices": [0, 1], "layers": [0, 3]}, {"devices": [2], "layers": [3, 4]}]}
    p = parse_plan(spec, num_layers=4, num_devices=4)
    assert str(p) == "[0:3)@0,1 | [3:4)@2"
    assert p.to_json() == spec
    assert p.devices == (0, 1, 2)


def test_from_counts_and_validate():
    p = PipelinePlan.from_counts([2, 3], devices=[5, 4])
    assert str(p) == "[0:2)@5 | [2:5)@4"
    assert p.validate(num_layers=5, num_devices=6) is p
    with pytest.raises(PlanError, match="stage 0 uses unknown device 5"):
        p.validate(num_layers=5, num_devices=5)
    with pytest.raises(PlanError, match="2 layer counts but 1 devices"):
        PipelinePlan.from_counts([2, 3], devices=[0])


def test_direct_construction_is_checked():
    with pytest.raises(PlanError, match="gap between stage 0"):
        PipelinePlan((StageSpec((0,), 0, 2), StageSpec((1,), 3, 5)))
    with pytest.raises(PlanError, match="no stages"):
        PipelinePlan(())


# --------------------------------------------------------------------------------------------
# Every PlanError path


ERROR_CASES = [
    # (spec, num_devices, message regex)
    ({"stages": []}, None, r"the plan has no stages"),
    ([], None, r"the plan has no stages"),
    (
        _plan((0, 0, 10), (1, 12, 30)),
        None,
        r"gap between stage 0 \(ends at layer 10\) and stage 1 \(starts at layer 12\): "
        r"layers \[10, 12\) belong to no stage",
    ),
    (
        _plan((0, 0, 10), (1, 8, 30)),
        None,
        r"stage 0 and stage 1 overlap on layers \[8, 10\); stage 1 must start at layer 10",
    ),
    (_plan((0, 2, 30)), None, r"stage 0 starts at layer 2: layers \[0, 2\) belong to no stage"),
    (_plan((0, -1, 30)), None, r"stage 0 starts at layer -1; layer indices start at 0"),
    (
        _plan((0, 0, 10), (1, 10, 32)),
        None,
        r"stage 1 ends at layer 32, out of range: the model has 30 layers",
    ),
    (
        [10, 10],
        None,
        r"covers layers \[0, 20\) but the model has 30 layers: layers \[20, 30\) belong to no "
        r"stage; the last stage \(stage 1\) must end at 30",
    ),
    ("10,10", None, r"covers layers \[0, 20\)"),
    (
        _plan((0, 0, 10), (9, 10, 30)),
        8,
        r"stage 1 uses unknown device 9: there are 8 devices \(ids 0..7\)",
    ),
    ([10, 10, 10], 2, r"stage 2 uses unknown device 2: there are 2 devices"),
    (
        _plan((0, 0, 10), (0, 10, 30)),
        None,
        r"device 0 is used by stage 0 and stage 1; a device can hold one stage only",
    ),
    (
        {"stages": [{"devices": [3, 3], "layers": [0, 30]}]},
        None,
        r"stage 0 lists device 3 twice",
    ),
    (_plan((0, 0, 10), (1, 10, 10), (2, 10, 30)), None, r"stage 1 is empty: layers \[10, 10\)"),
    ([10, 0, 20], None, r"stage 1 is empty"),
    (
        {"stages": [{"devices": [0], "layers": [0, 10]}, {"devices": [], "layers": [10, 30]}]},
        None,
        r"stage 1 has no devices",
    ),
    ({"stages": [{"devices": [-1], "layers": [0, 30]}]}, None, r"stage 0: device ids must be"),
    ({"stages": [{"devices": [0], "layers": [0, "a"]}]}, None, r"stage 0: layers must be \[start"),
    ({"stages": [{"devices": [0], "layers": [0]}]}, None, r"stage 0: layers must be \[start"),
    ({"stages": [{"devices": [0], "layers": "0-30"}]}, None, r"stage 0: layers must be \[start"),
    ({"stages": [{"devices": [0], "layers": [0.0, 30]}]}, None, r"stage 0: layers must be"),
    ({"stages": [{"devices": [0], "layers": [True, 30]}]}, None, r"stage 0: layers must be"),
    ({"stages": [{"devices": "gpu0", "layers": [0, 30]}]}, None, r"stage 0: devices must be a"),
    ({"stages": [{"devices": [0.5], "layers": [0, 30]}]}, None, r"stage 0: devices must be a"),
    (
        {"stages": [{"devices": [0], "layers": [0, 30], "tp": 2}]},
        None,
        r"stage 0 has unknown key\(s\) \['tp'\]",
    ),
    ({"stages": [{"devices": [0]}]}, None, r"stage 0 has no 'layers' key"),
    ({"stages": [{"layers": [0, 30]}]}, None, r"stage 0 has no 'devices' key"),
    ({"stages": [[0, 30]]}, None, r"stage 0 must be an object"),
    ({"stages": "0-30"}, None, r'"stages" must be a list of stages'),
    ({"stage": []}, None, r"unknown plan key\(s\) \['stage'\]"),
    ({}, None, r'the plan has no "stages" key'),
    ([10, 2.5], None, r"stage 1: layer counts must be positive integers, got 2.5"),
    ([-5, 35], None, r"stage 0: layer counts must be positive integers, got -5"),
    ("ten,twenty", None, r"cannot parse plan 'ten,twenty'"),
    ("10,", None, r"cannot parse plan '10,'"),
    ("", None, r"cannot parse plan ''"),
    ('{"stages": [', None, r"cannot parse plan JSON"),
    (3.5, None, r"cannot read a plan from a float"),
]


@pytest.mark.parametrize(("spec", "num_devices", "message"), ERROR_CASES)
def test_plan_errors(spec, num_devices, message):
    with pytest.raises(PlanError, match=message) as info:
        parse_plan(spec, num_layers=30, num_devices=num_devices)
    # Every message names a stage, a device, a layer range, or says which forms are accepted.
    text = str(info.value)
    assert any(w in text for w in ("stage", "device", "layers", "a plan is")), text


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        parse_plan([10, 10], num_layers=30)


@pytest.mark.parametrize("num_layers", [0, -3, 2.0, None])
def test_bad_num_layers(num_layers):
    with pytest.raises(PlanError, match="num_layers must be a positive integer"):
        parse_plan(None, num_layers=num_layers)


# --------------------------------------------------------------------------------------------
# Hypothesis: random valid plans


@st.composite
def plans(draw, max_layers: int = 64, max_devices: int = 16, num_layers: int | None = None):
    if num_layers is None:
        num_layers = draw(st.integers(1, max_layers))
    num_stages = draw(st.integers(1, min(8, num_layers, max_devices)))
    cuts = (
        sorted(
            draw(
                st.sets(
                    st.integers(1, num_layers - 1), min_size=num_stages - 1, max_size=num_stages - 1
                )
            )
        )
        if num_stages > 1
        else []
    )
    bounds = [0, *cuts, num_layers]
    devices = draw(st.permutations(range(max_devices)))
    width = draw(st.integers(1, max(1, max_devices // num_stages)))
    stages = tuple(
        StageSpec(tuple(devices[i * width : (i + 1) * width]), bounds[i], bounds[i + 1])
        for i in range(len(bounds) - 1)
    )
    return PipelinePlan(stages)


@settings(max_examples=200, deadline=None)
@given(plans())
def test_json_round_trip(plan):
    n = plan.num_layers
    assert parse_plan(plan.to_json(), num_layers=n, num_devices=16) == plan
    assert parse_plan(json.dumps(plan.to_json()), num_layers=n, num_devices=16) == plan
    assert parse_plan(plan, num_layers=n) == plan
    # stage_of_layer agrees with the ranges; devices are listed stage by stage, without repeats.
    for i, s in enumerate(plan.stages):
        assert all(plan.stage_of_layer(layer) == i for layer in s.layers)
    assert len(set(plan.devices)) == len(plan.devices)
    assert str(plan).count("|") == plan.num_stages - 1


@settings(max_examples=100, deadline=None)
@given(plans(max_layers=40))
def test_counts_round_trip(plan):
    counts = [s.num_layers for s in plan.stages]
    p = parse_plan(",".join(map(str, counts)), num_layers=plan.num_layers)
    assert [s.num_layers for s in p.stages] == counts
    assert p.devices == tuple(range(plan.num_stages))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_diff_partitions_layers(data):
    old = data.draw(plans(max_layers=32))
    new = data.draw(plans(num_layers=old.num_layers, max_devices=data.draw(st.integers(2, 16))))
    diff = plan_diff(old, new)
    moved = diff.moved_layers
    assert sorted(moved + diff.stays) == list(range(old.num_layers))
    for m in diff.moves:
        assert m.src_devices == old.stages[old.stage_of_layer(m.layer)].devices
        assert m.dst_devices == new.stages[new.stage_of_layer(m.layer)].devices
        assert m.src_devices != m.dst_devices
    for layer in diff.stays:
        assert old.stages[old.stage_of_layer(layer)].devices == (
            new.stages[new.stage_of_layer(layer)].devices
        )
    assert plan_diff(old, old).is_noop
    routes = diff.by_route()
    assert sorted(x for layers in routes.values() for x in layers) == list(moved)


# --------------------------------------------------------------------------------------------
# plan_diff examples


def test_diff_shift_boundary_right():
    old = parse_plan("15,15", num_layers=30)
    new = parse_plan("10,20", num_layers=30)
    diff = plan_diff(old, new)
    assert diff.moves == tuple(LayerMove(i, 0, 1, (0,), (1,)) for i in range(10, 15))
    assert diff.stays == tuple(range(10)) + tuple(range(15, 30))
    assert not diff.is_noop
    assert diff.moves_from(0) == diff.moves and diff.moves_to(1) == diff.moves
    assert diff.moves_from(1) == () and diff.by_route() == {((0,), (1,)): tuple(range(10, 15))}


def test_diff_shift_boundary_left():
    diff = plan_diff(parse_plan("15,15", num_layers=30), parse_plan("20,10", num_layers=30))
    assert diff.moves == tuple(LayerMove(i, 1, 0, (1,), (0,)) for i in range(15, 20))


def test_diff_scale_out():
    old = parse_plan(None, num_layers=30)
    new = parse_plan("10,10,10", num_layers=30)
    diff = plan_diff(old, new)
    assert diff.stays == tuple(range(10))
    assert diff.by_route() == {
        ((0,), (1,)): tuple(range(10, 20)),
        ((0,), (2,)): tuple(range(20, 30)),
    }
    assert {m.dst_stage for m in diff.moves} == {1, 2}


def test_diff_swap_devices_moves_everything():
    old = parse_plan("15,15", num_layers=30)
    new = parse_plan(_plan((1, 0, 15), (0, 15, 30)), num_layers=30)
    assert plan_diff(old, new).moved_layers == tuple(range(30))


def test_diff_stage_renumbering_is_not_a_move():
    old = parse_plan(_plan((1, 0, 10), (2, 10, 30)), num_layers=30)
    new = parse_plan(_plan((0, 0, 5), (1, 5, 10), (2, 10, 30)), num_layers=30)
    diff = plan_diff(old, new)
    # Layers 5..9 stay on device 1 although their stage index changes from 0 to 1.
    assert diff.moves == tuple(LayerMove(i, 0, 0, (1,), (0,)) for i in range(5))
    assert diff.stays == tuple(range(5, 30))


def test_diff_identical_is_noop():
    p = parse_plan("3,4", num_layers=7)
    diff = plan_diff(p, parse_plan([3, 4], num_layers=7))
    assert diff.is_noop and diff.stays == tuple(range(7))


def test_diff_different_models_refused():
    with pytest.raises(PlanError, match="old plan has 30 layers, the new one 20"):
        plan_diff(parse_plan("15,15", num_layers=30), parse_plan("10,10", num_layers=20))
