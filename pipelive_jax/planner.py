"""Propose a layer split for a pipeline: which contiguous layers each device should hold.

The cost model counts time in *layer units*: one decoder layer on a device of speed 1.0. Stage i
on a device of relative speed `s_i` holding `n_i` layers takes

    t_i = (n_i + embed_cost * [i is first] + head_cost * [i is last]) / s_i

and a pipeline runs at the pace of its slowest stage, so the planner minimises `max_i t_i` over
all contiguous splits, subject to memory: each device must hold its layers' weights (and the
embedding / LM head where the stage has them) and still fit at least `min_kv_pages` KV pages per
layer by the admission rule (`memory.max_pages`). Among the splits with the best bottleneck it
takes the one with the most KV capacity (the smallest pool over stages, the binding one). Both
are exact: a dynamic program over (devices used, layers covered), O(S * L^2).

What `head_cost` should be depends on the traffic (`head_cost_for`): in decode every token goes
through the LM head, a `hidden x vocab` matmul that costs about `vocab*hidden / params_per_layer`
layers (8 for SmolLM2-135M); in prefill only the last token of each prompt does, so the cost per
token is that divided by the prompt length (near 0). That is why the prefill-optimal and the
decode-optimal splits differ even on identical devices; with devices of different speeds (a fast
and a slow GPU, or a compute-strong and a bandwidth-strong one) they differ more.

Not modelled: attention's cost growing with context length, communication between stages, and
micro-batch bubbles; speeds are whatever the user says they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelive_jax.config import parse_bytes
from pipelive_jax.errors import PlanError
from pipelive_jax.memory import (
    RESERVED_PAGES,
    DeviceBudget,
    ModelShape,
    max_pages,
    round_capacity,
    stage_extra_bytes,
)
from pipelive_jax.plan import PipelinePlan

__all__ = [
    "MODEL_SHAPES",
    "DeviceSpec",
    "PlanProposal",
    "head_cost_for",
    "model_shape_for",
    "parse_devices",
    "propose_split",
]

MODEL_SHAPES: dict[str, ModelShape] = {
    # SmolLM2-135M as served (weights dequantised to float32): NOTES.md.
    "smollm2-135m": ModelShape(
        num_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_embeddings=True,
        dtype_bytes=4,
    ),
    # models.registry.TINY_RANDOM
    "tiny-random": ModelShape(
        num_layers=6,
        hidden_size=64,
        intermediate_size=128,
        num_heads=6,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=512,
        tie_embeddings=False,
        dtype_bytes=4,
    ),
}
"""Shapes of the registry models, so that planning needs neither weights nor JAX."""


def model_shape_for(name: str, dtype: str = "float32", kv_dtype: str = "auto") -> ModelShape:
    """The `ModelShape` of a registry name (no loading), or of any model `load_model` reads.

    `kv_dtype` is the engine's `kv_cache_dtype`; "auto" counts the model's dtype, the rule on
    accelerators (an engine on CPU keeps float32 pages: plan for it with "float32").
    """
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    nbytes = sizes.get(dtype, 4)
    kv_bytes = nbytes if kv_dtype == "auto" else sizes.get(kv_dtype, 4)
    if name in MODEL_SHAPES:
        s = MODEL_SHAPES[name]
        return ModelShape(**{**s.__dict__, "dtype_bytes": nbytes, "kv_dtype_bytes": kv_bytes})
    from pipelive_jax.models.registry import load_model

    cfg = load_model(name, dtype=dtype).config
    return ModelShape(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        tie_embeddings=cfg.tie_embeddings,
        dtype_bytes=nbytes,
        kv_dtype_bytes=kv_bytes,
    )


def head_cost_for(model: ModelShape, workload: str, prompt_len: int = 128) -> float:
    """The LM head's cost per token in layer units for `workload` in {prefill, decode, mixed}.

    decode: every token: vocab*hidden multiply-adds over a layer's parameter count. prefill: one
    token per prompt of `prompt_len`. mixed: the mean of the two (traffic with both).
    """
    per_token = (
        model.vocab_size * model.hidden_size * model.dtype_bytes / model.weight_bytes_per_layer()
    )
    if workload == "decode":
        return per_token
    if workload == "prefill":
        return per_token / max(prompt_len, 1)
    if workload == "mixed":
        return (per_token + per_token / max(prompt_len, 1)) / 2
    raise PlanError(f"workload must be prefill, decode or mixed, got {workload!r}")


@dataclass(frozen=True)
class DeviceSpec:
    """A device a stage can go on: its id, memory budget (bytes) and relative speed."""

    device: int
    memory_bytes: int
    speed: float = 1.0


def parse_devices(spec: str) -> list[DeviceSpec]:
    """`0:8GiB:1.0,1:4.8GiB:0.6` (id:memory[:speed], speed 1.0 if left out) -> DeviceSpecs."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        fields = part.split(":")
        if len(fields) not in (2, 3):
            raise PlanError(
                f"device {part!r}: expected id:memory[:speed] like 0:8GiB:1.0 or 1:4.8GiB"
            )
        try:
            dev = int(fields[0])
            mem = parse_bytes(fields[1])
            speed = float(fields[2]) if len(fields) == 3 else 1.0
        except ValueError as e:
            raise PlanError(f"device {part!r}: {e}") from None
        if dev < 0 or not speed > 0 or not math.isfinite(speed):
            raise PlanError(f"device {part!r}: the id must be >= 0 and the speed > 0")
        out.append(DeviceSpec(dev, mem, speed))
    if not out:
        raise PlanError("no devices given; expected id:memory[:speed],... like 0:8GiB,1:4.8GiB:0.6")
    if len({d.device for d in out}) != len(out):
        raise PlanError(f"a device id is listed twice in {spec!r}")
    return out


@dataclass(frozen=True)
class PlanProposal:
    """The split the planner chose, with its numbers.

    stage_times: per stage, in layer units (see the module docstring); bottleneck: their max;
    kv_pages: per stage, the pool capacity its device can hold (page 0 included, rounded down to
    the granule).
    """

    plan: PipelinePlan
    counts: tuple[int, ...]
    stage_times: tuple[float, ...]
    bottleneck: float
    kv_pages: tuple[int, ...]
    head_cost: float
    embed_cost: float

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_json(),
            "counts": list(self.counts),
            "stage_times": [round(t, 4) for t in self.stage_times],
            "bottleneck": round(self.bottleneck, 4),
            "kv_pages": list(self.kv_pages),
            "head_cost": round(self.head_cost, 4),
            "embed_cost": round(self.embed_cost, 4),
        }


def propose_split(
    model: ModelShape,
    devices: Sequence[DeviceSpec],
    *,
    head_cost: float = 0.0,
    embed_cost: float = 0.0,
    page_size: int = 16,
    utilization: float = 0.9,
    min_kv_pages: int = 1,
    granule: int = 1,
) -> PlanProposal:
    """The best contiguous split of `model`'s layers over `devices`, in the order given (stage i
    on devices[i]; every device gets at least one layer).

    Raises PlanError when no split fits the memory budgets, saying which device is short and by
    how much at its smallest feasible share.
    """
    n_layers, n_dev = model.num_layers, len(devices)
    if n_dev == 0:
        raise PlanError("no devices to plan for")
    if n_dev > n_layers:
        raise PlanError(
            f"{n_dev} devices for {n_layers} layers: every stage needs at least one layer"
        )
    if min_kv_pages < 0:
        raise PlanError(f"min_kv_pages must be >= 0, got {min_kv_pages}")
    need = min_kv_pages + RESERVED_PAGES

    def capacity(k: int, layers: int) -> int:
        budget = DeviceBudget(devices[k].device, devices[k].memory_bytes, utilization)
        counts = [1] * n_dev  # stage_extra_bytes looks only at first / last
        shape_plan = PipelinePlan.from_counts(counts, list(range(n_dev)))
        extra = stage_extra_bytes(model, shape_plan, k)
        return round_capacity(max_pages(budget, model, layers, page_size, extra), granule)

    def cost(k: int, layers: int) -> float:
        fixed = (embed_cost if k == 0 else 0.0) + (head_cost if k == n_dev - 1 else 0.0)
        return (layers + fixed) / devices[k].speed

    cap = [[capacity(k, n) if n > 0 else 0 for n in range(n_layers + 1)] for k in range(n_dev)]
    fits = [[n > 0 and cap[k][n] >= need for n in range(n_layers + 1)] for k in range(n_dev)]
    for k in range(n_dev):
        if not fits[k][1]:
            d = devices[k]
            budget = DeviceBudget(d.device, d.memory_bytes, utilization)
            raise PlanError(
                f"no split fits: device {d.device} ({d.memory_bytes / 2**30:.2f} GiB at "
                f"utilization {utilization}) cannot hold even one layer with {min_kv_pages} KV "
                f"pages as stage {k} (pool capacity {cap[k][1]} pages, "
                f"{budget.usable_bytes / 2**20:.0f} MiB usable); give it more memory, ask for "
                "fewer KV pages, or use fewer devices"
            )
    inf = math.inf
    # best[k][l]: the smallest bottleneck with devices 0..k-1 holding layers 0..l-1
    best = [[inf] * (n_layers + 1) for _ in range(n_dev + 1)]
    best[0][0] = 0.0
    for k in range(1, n_dev + 1):
        for l_end in range(k, n_layers - (n_dev - k) + 1):
            for l_start in range(k - 1, l_end):
                n = l_end - l_start
                if best[k - 1][l_start] == inf or not fits[k - 1][n]:
                    continue
                v = max(best[k - 1][l_start], cost(k - 1, n))
                if v < best[k][l_end]:
                    best[k][l_end] = v
    target = best[n_dev][n_layers]
    if target == inf:
        most = sum(
            max((n for n in range(n_layers + 1) if fits[k][n]), default=0) for k in range(n_dev)
        )
        raise PlanError(
            f"no split fits: with {min_kv_pages} KV pages per layer the devices can hold at most "
            f"{most} of the model's {n_layers} layers together; give them more memory, ask for "
            "fewer KV pages, or add a device"
        )
    tol = 1e-9 * max(1.0, target)
    # second pass: among splits with bottleneck <= target, maximise the smallest capacity
    kv = [[-1] * (n_layers + 1) for _ in range(n_dev + 1)]
    choice: list[list[int]] = [[-1] * (n_layers + 1) for _ in range(n_dev + 1)]
    kv[0][0] = 1 << 62
    for k in range(1, n_dev + 1):
        for l_end in range(k, n_layers - (n_dev - k) + 1):
            for l_start in range(k - 1, l_end):
                n = l_end - l_start
                if kv[k - 1][l_start] < 0 or not fits[k - 1][n]:
                    continue
                if cost(k - 1, n) > target + tol:
                    continue
                v = min(kv[k - 1][l_start], cap[k - 1][n])
                if v > kv[k][l_end]:
                    kv[k][l_end] = v
                    choice[k][l_end] = l_start
    counts = []
    l_end = n_layers
    for k in range(n_dev, 0, -1):
        l_start = choice[k][l_end]
        counts.append(l_end - l_start)
        l_end = l_start
    counts.reverse()
    plan = PipelinePlan.from_counts(counts, [d.device for d in devices])
    times = tuple(cost(k, n) for k, n in enumerate(counts))
    return PlanProposal(
        plan=plan,
        counts=tuple(counts),
        stage_times=times,
        bottleneck=max(times),
        kv_pages=tuple(cap[k][n] for k, n in enumerate(counts)),
        head_cost=head_cost,
        embed_cost=embed_cost,
    )
