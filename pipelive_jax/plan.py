"""Pipeline plans: which devices hold which contiguous range of layers, and how two plans differ.

A `PipelinePlan` is a tuple of `StageSpec`s. Stage i holds the half-open layer range
`[start, end)` on the devices `devices` (one device per stage for now; the tuple leaves room for
tensor-parallel stages). A well-formed plan covers layers `0 .. num_layers-1` exactly once, in
order, with no empty stage, and never puts one device in two stages.

Plans are written in four forms, all read by `parse_plan`:

- JSON, the canonical form (RPC, TOML, reports)::

      {"stages": [{"devices": [0], "layers": [0, 15]}, {"devices": [1], "layers": [15, 30]}]}

- a list of layer counts, stage i on device i: ``[15, 15]``;
- the same as a string shorthand: ``"15,15"``;
- ``None``: every layer in one stage on device 0.

`plan_diff` says which layers change devices between two plans; the live controller moves
exactly those layers' weights and KV pages.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelive_jax.errors import PlanError

__all__ = [
    "LayerMove",
    "PipelinePlan",
    "PlanDiff",
    "StageSpec",
    "parse_plan",
    "plan_diff",
]


def _is_int(x: object) -> bool:
    # bool is an int subclass; `True` as a layer index or device id is always a mistake.
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: layers `[start, end)` on `devices` (jax device ids)."""

    devices: tuple[int, ...]
    start: int
    end: int

    def __post_init__(self) -> None:
        if isinstance(self.devices, list):  # keep the spec hashable
            object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def to_json(self) -> dict[str, list[int]]:
        return {"devices": list(self.devices), "layers": [self.start, self.end]}

    def __str__(self) -> str:
        devs = ",".join(str(d) for d in self.devices)
        return f"[{self.start}:{self.end})@{devs}"


@dataclass(frozen=True)
class PipelinePlan:
    """An ordered tuple of stages that covers layers `0 .. num_layers-1` exactly once.

    Invariants (checked at construction, so every `PipelinePlan` in existence holds them):
    at least one stage; stage 0 starts at layer 0; each stage starts where the previous one
    ends; no stage is empty; every stage has at least one device; no device id appears twice in
    the plan. Whether the plan fits a given model and machine (`num_layers`, `num_devices`) is
    checked by `parse_plan` / `validate`.
    """

    stages: tuple[StageSpec, ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        object.__setattr__(self, "stages", stages)
        _check_stages(
            [(s.devices, s.start, s.end) for s in stages], num_layers=None, num_devices=None
        )
        object.__setattr__(self, "_starts", tuple(s.start for s in stages))

    @classmethod
    def from_counts(
        cls, counts: Sequence[int], devices: Sequence[int] | None = None
    ) -> PipelinePlan:
        """Stages of `counts[i]` layers each, stage i on `devices[i]` (default: device i)."""
        if devices is None:
            devices = range(len(counts))
        if len(devices) != len(counts):
            raise PlanError(
                f"{len(counts)} layer counts but {len(devices)} devices; give one device per stage"
            )
        stages = []
        start = 0
        for i, (count, dev) in enumerate(zip(counts, devices, strict=True)):
            if not _is_int(count) or count < 0:
                raise PlanError(f"stage {i}: layer counts must be positive integers, got {count!r}")
            stages.append(StageSpec(devices=(dev,), start=start, end=start + count))
            start += count
        return cls(tuple(stages))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_layers(self) -> int:
        """Total layers of the plan (the end of the last stage)."""
        return self.stages[-1].end

    @property
    def devices(self) -> tuple[int, ...]:
        """Every device id of the plan, stage by stage."""
        return tuple(d for s in self.stages for d in s.devices)

    def stage_of_layer(self, layer: int) -> int:
        """Index of the stage that holds global layer `layer`."""
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise PlanError(
                f"layer {layer!r} is outside the plan's layers 0..{self.num_layers - 1}"
            )
        return bisect.bisect_right(self._starts, layer) - 1

    def stage_of_device(self, device: int) -> int | None:
        """Index of the stage that uses `device`, or None if the plan does not use it."""
        for i, s in enumerate(self.stages):
            if device in s.devices:
                return i
        return None

    def layers_on(self, device: int) -> range:
        """The layers resident on `device` under this plan (empty if the device is unused)."""
        i = self.stage_of_device(device)
        return self.stages[i].layers if i is not None else range(0)

    def validate(self, *, num_layers: int, num_devices: int | None = None) -> PipelinePlan:
        """Check this plan against a model and machine; returns self, raises `PlanError`."""
        _check_stages(
            [(s.devices, s.start, s.end) for s in self.stages],
            num_layers=num_layers,
            num_devices=num_devices,
        )
        return self

    def to_json(self) -> dict[str, list[dict[str, list[int]]]]:
        return {"stages": [s.to_json() for s in self.stages]}

    def __str__(self) -> str:
        return " | ".join(str(s) for s in self.stages)


# --------------------------------------------------------------------------------------------
# Validation and parsing


_RawStage = tuple[Sequence[int], int, int]  # (devices, start, end), not yet validated

_FORMS = (
    'a plan is {"stages": [{"devices": [0], "layers": [0, 15]}, ...]}, '
    'a list of layer counts like [15, 15], or a string like "15,15"'
)


def _check_stages(
    stages: Sequence[_RawStage],
    *,
    num_layers: int | None,
    num_devices: int | None,
) -> None:
    """Raise `PlanError` for the first problem found, naming the stage.

    `stages` holds (devices, start, end) per stage, already type-checked by the parsers (but
    checked again here, because `StageSpec` can be built directly).
    """
    if not stages:
        raise PlanError(f"the plan has no stages; {_FORMS}")
    owner: dict[int, int] = {}
    prev_end = 0
    for i, (devices, start, end) in enumerate(stages):
        if not _is_int(start) or not _is_int(end):
            raise PlanError(
                f"stage {i}: layers must be [start, end] integers, got {[start, end]!r}"
            )
        if not isinstance(devices, tuple | list) or not all(_is_int(d) for d in devices):
            raise PlanError(f"stage {i}: devices must be a list of integer ids, got {devices!r}")
        if not devices:
            raise PlanError(f"stage {i} has no devices; give it at least one device id")
        if start < 0:
            raise PlanError(f"stage {i} starts at layer {start}; layer indices start at 0")
        if end <= start:
            raise PlanError(
                f"stage {i} is empty: layers [{start}, {end}) hold no layer; "
                "every stage needs at least one layer (end > start)"
            )
        if i == 0 and start != 0:
            raise PlanError(
                f"stage 0 starts at layer {start}: layers [0, {start}) belong to no stage; "
                "the first stage must start at layer 0"
            )
        if start > prev_end:
            raise PlanError(
                f"gap between stage {i - 1} (ends at layer {prev_end}) and stage {i} "
                f"(starts at layer {start}): layers [{prev_end}, {start}) belong to no stage"
            )
        if start < prev_end:
            raise PlanError(
                f"stage {i - 1} and stage {i} overlap on layers [{start}, {min(prev_end, end)}); "
                f"stage {i} must start at layer {prev_end}"
            )
        if num_layers is not None and end > num_layers:
            raise PlanError(
                f"stage {i} ends at layer {end}, out of range: the model has {num_layers} layers "
                f"(0..{num_layers - 1}), so the last stage must end at {num_layers}"
            )
        seen: set[int] = set()
        for d in devices:
            if d < 0:
                raise PlanError(f"stage {i}: device ids must be non-negative, got {d}")
            if num_devices is not None and d >= num_devices:
                raise PlanError(
                    f"stage {i} uses unknown device {d}: there are {num_devices} devices "
                    f"(ids 0..{num_devices - 1})"
                )
            if d in seen:
                raise PlanError(f"stage {i} lists device {d} twice; list each device once")
            if d in owner:
                raise PlanError(
                    f"device {d} is used by stage {owner[d]} and stage {i}; "
                    "a device can hold one stage only"
                )
            seen.add(d)
            owner[d] = i
        prev_end = end
    if num_layers is not None and prev_end != num_layers:
        raise PlanError(
            f"the plan covers layers [0, {prev_end}) but the model has {num_layers} layers: "
            f"layers [{prev_end}, {num_layers}) belong to no stage; "
            f"the last stage (stage {len(stages) - 1}) must end at {num_layers}"
        )


def _stages_from_json(obj: Any) -> list[_RawStage]:
    if isinstance(obj, Mapping):
        extra = set(obj) - {"stages"}
        if extra:
            raise PlanError(f"unknown plan key(s) {sorted(extra)}; {_FORMS}")
        if "stages" not in obj:
            raise PlanError(f'the plan has no "stages" key; {_FORMS}')
        obj = obj["stages"]
    if not isinstance(obj, list | tuple):
        raise PlanError(f'"stages" must be a list of stages, got {type(obj).__name__}; {_FORMS}')
    out: list[_RawStage] = []
    for i, st in enumerate(obj):
        if not isinstance(st, Mapping):
            raise PlanError(
                f'stage {i} must be an object {{"devices": [...], "layers": [start, end]}}, '
                f"got {st!r}"
            )
        extra = set(st) - {"devices", "layers"}
        if extra:
            raise PlanError(
                f"stage {i} has unknown key(s) {sorted(extra)}; expected 'devices' and 'layers'"
            )
        for key in ("devices", "layers"):
            if key not in st:
                raise PlanError(f"stage {i} has no '{key}' key; expected 'devices' and 'layers'")
        layers = st["layers"]
        if (
            not isinstance(layers, list | tuple)
            or len(layers) != 2
            or not all(_is_int(x) for x in layers)
        ):
            raise PlanError(f"stage {i}: layers must be [start, end] integers, got {layers!r}")
        devices = st["devices"]
        if _is_int(devices):
            devices = [devices]
        if not isinstance(devices, list | tuple) or not all(_is_int(d) for d in devices):
            raise PlanError(f"stage {i}: devices must be a list of integer ids, got {devices!r}")
        out.append((tuple(devices), layers[0], layers[1]))
    return out


def _stages_from_counts(counts: Sequence[Any]) -> list[_RawStage]:
    out: list[_RawStage] = []
    start = 0
    for i, c in enumerate(counts):
        if not _is_int(c) or c < 0:
            raise PlanError(f"stage {i}: layer counts must be positive integers, got {c!r}")
        out.append(((i,), start, start + c))
        start += c
    return out


def parse_plan(spec: Any, *, num_layers: int, num_devices: int | None = None) -> PipelinePlan:
    """Read a plan in any accepted form and validate it against the model and machine.

    Args:
      spec: a `PipelinePlan`; a dict ``{"stages": [{"devices": [..], "layers": [s, e]}, ...]}``;
        that dict as a JSON string; a list of per-stage layer counts (stage i on device i); a
        string of counts like ``"10,20"``; or None (one stage on device 0).
      num_layers: layers of the model; the plan must cover ``0 .. num_layers-1`` exactly.
      num_devices: if given, every device id must be below it.

    Raises:
      PlanError: naming the problem and the stage (gap, overlap, range, device, types).
    """
    if not _is_int(num_layers) or num_layers <= 0:
        raise PlanError(f"num_layers must be a positive integer, got {num_layers!r}")
    stages: list[_RawStage]
    if spec is None:
        stages = [((0,), 0, num_layers)]
    elif isinstance(spec, PipelinePlan):
        stages = [(s.devices, s.start, s.end) for s in spec.stages]
    elif isinstance(spec, Mapping):
        stages = _stages_from_json(spec)
    elif isinstance(spec, str):
        text = spec.strip()
        if text.startswith(("{", "[")):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise PlanError(f"cannot parse plan JSON {spec!r}: {e.msg}; {_FORMS}") from None
            return parse_plan(obj, num_layers=num_layers, num_devices=num_devices)
        parts = [p.strip() for p in text.split(",")]
        if not text or not all(p.lstrip("-").isdigit() for p in parts):
            raise PlanError(f"cannot parse plan {spec!r}; {_FORMS}")
        stages = _stages_from_counts([int(p) for p in parts])
    elif isinstance(spec, list | tuple):
        if spec and all(isinstance(x, Mapping) for x in spec):
            stages = _stages_from_json(list(spec))
        else:
            stages = _stages_from_counts(spec)
    else:
        raise PlanError(f"cannot read a plan from a {type(spec).__name__}; {_FORMS}")
    _check_stages(stages, num_layers=num_layers, num_devices=num_devices)
    return PipelinePlan(tuple(StageSpec(tuple(d), s, e) for d, s, e in stages))


# --------------------------------------------------------------------------------------------
# Diff


@dataclass(frozen=True)
class LayerMove:
    """Global layer `layer` leaves stage `src_stage` on `src_devices` for `dst_stage`."""

    layer: int
    src_stage: int
    dst_stage: int
    src_devices: tuple[int, ...]
    dst_devices: tuple[int, ...]


@dataclass(frozen=True)
class PlanDiff:
    """What changes between two plans of the same model, layer by layer.

    A layer *moves* when the tuple of devices that holds it changes (with one device per stage,
    exactly when its device changes). A layer *stays* when the same devices hold it, even if its
    stage index changed (stages before it were split or merged): nothing has to be copied.
    """

    moves: tuple[LayerMove, ...]
    stays: tuple[int, ...]

    @property
    def is_noop(self) -> bool:
        return not self.moves

    @property
    def moved_layers(self) -> tuple[int, ...]:
        return tuple(m.layer for m in self.moves)

    def moves_from(self, device: int) -> tuple[LayerMove, ...]:
        """Moves whose source stage uses `device`."""
        return tuple(m for m in self.moves if device in m.src_devices)

    def moves_to(self, device: int) -> tuple[LayerMove, ...]:
        """Moves whose target stage uses `device`."""
        return tuple(m for m in self.moves if device in m.dst_devices)

    def by_route(self) -> dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, ...]]:
        """Moved layers grouped by (src_devices, dst_devices), in layer order.

        One group is one fused gather / transfer / scatter in the migration.
        """
        routes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for m in self.moves:
            routes.setdefault((m.src_devices, m.dst_devices), []).append(m.layer)
        return {k: tuple(v) for k, v in routes.items()}


def plan_diff(old: PipelinePlan, new: PipelinePlan) -> PlanDiff:
    """Layers that change devices from `old` to `new` (both for the same number of layers)."""
    if old.num_layers != new.num_layers:
        raise PlanError(
            f"cannot diff plans of different models: the old plan has {old.num_layers} layers, "
            f"the new one {new.num_layers}"
        )
    moves: list[LayerMove] = []
    stays: list[int] = []
    for layer in range(old.num_layers):
        si, di = old.stage_of_layer(layer), new.stage_of_layer(layer)
        src, dst = old.stages[si].devices, new.stages[di].devices
        if src == dst:
            stays.append(layer)
        else:
            moves.append(LayerMove(layer, si, di, src, dst))
    return PlanDiff(moves=tuple(moves), stays=tuple(stays))
