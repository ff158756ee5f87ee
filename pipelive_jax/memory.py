"""Device memory accounting and the admission rule for live reconfiguration (DESIGN.md §4).

Vocabulary:

- `W`: bytes of one decoder layer's weights (`ModelShape.weight_bytes_per_layer`).
- `P`: bytes of one KV page of one layer, K and V together (`ModelShape.page_bytes_per_layer`).
- `L`: layers resident on a device. During a transition a device holds the union of its old and
  new layers (incoming weights and KV are staged before outgoing ones are dropped).
- A *pool capacity* (`num_pages`) counts every page of a pool, including the reserved padding
  page 0 (`RESERVED_PAGES`). *Pages in use* never count page 0. So a stage with `n` pages in use
  needs a capacity of at least `n + RESERVED_PAGES`.

    max_pages(i, L) = floor((M_i * u - L * W - workspace_i - extra_i) / (L * P))
    B_shrink        = min_i max_pages(i, L_i)      L_i = |old layers on i  union  new layers on i|

A plan is admitted when every stage can keep the pages in use within `B_shrink`; after the switch
each stage may grow to `max_pages(i, L_target)`. Every stage of a pipeline holds the same tokens
(each request passes through all stages), so the pages a stage needs are the same everywhere and
the binding device is the one with the smallest `max_pages`.

This module imports JAX only inside `live_bytes_per_device`, so that plans can be admitted (RPC
`validate_plan`, config checks) before any backend is initialised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelive_jax.errors import AdmissionError
from pipelive_jax.plan import PipelinePlan

__all__ = [
    "RESERVED_PAGES",
    "Admission",
    "DeviceAdmission",
    "DeviceBudget",
    "ModelShape",
    "admit",
    "check_admission",
    "live_bytes_per_device",
    "max_pages",
    "round_capacity",
    "stage_extra_bytes",
]

RESERVED_PAGES = 1
"""Page 0 of every pool is the padding page: block tables point at it past a sequence's end."""


def round_capacity(n: int, granule: int = 64, *, mode: Literal["down", "up"] = "down") -> int:
    """Round a pool capacity (pages) to a multiple of `granule`.

    Pool capacity is part of the compiled step functions' shapes, so capacities come in buckets
    to bound recompiles. Round *down* what a budget allows (`max_pages` -> capacity that fits),
    round *up* what a workload needs. A budget smaller than one granule rounds down to 0: the
    caller must treat that as "does not fit" (or use a smaller granule).
    """
    if granule <= 0:
        raise ValueError(f"granule must be positive, got {granule}")
    if n < 0:
        raise ValueError(f"a page count cannot be negative, got {n}")
    if mode == "down":
        return n // granule * granule
    if mode == "up":
        return -(-n // granule) * granule
    raise ValueError(f"mode must be 'down' or 'up', got {mode!r}")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that memory accounting needs.

    `dtype_bytes` is the weights' element size; `kv_dtype_bytes` the KV cache's (defaults to the
    weights'). Layers have no biases (Llama, SmolLM2).
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    dtype_bytes: int = 4
    kv_dtype_bytes: int | None = None

    def weight_bytes_per_layer(self) -> int:
        """W: q, k, v, o projections + SwiGLU gate, up, down + the two RMSNorm scales."""
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h
        return (attn + mlp + norms) * self.dtype_bytes

    def embed_bytes(self) -> int:
        """The token embedding table, resident on the first stage."""
        return self.vocab_size * self.hidden_size * self.dtype_bytes

    def head_bytes(self) -> int:
        """Final RMSNorm + LM head, resident on the last stage; the LM head only if untied.

        With tied embeddings the last stage still needs the embedding matrix for its logits:
        `stage_extra_bytes` adds that copy when the last stage is not also the first.
        """
        lm_head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return (self.hidden_size + lm_head) * self.dtype_bytes

    def page_bytes_per_layer(self, page_size: int) -> int:
        """P: one page of one layer, K and V: 2 * kv_heads * page_size * head_dim * bytes."""
        kv_bytes = self.kv_dtype_bytes if self.kv_dtype_bytes is not None else self.dtype_bytes
        return 2 * self.num_kv_heads * page_size * self.head_dim * kv_bytes

    def total_weight_bytes(self) -> int:
        """All weights of the model on one device (one stage)."""
        return (
            self.num_layers * self.weight_bytes_per_layer() + self.embed_bytes() + self.head_bytes()
        )


@dataclass
class DeviceBudget:
    """Memory one device may use: `floor(memory_bytes * utilization)`, less `workspace_bytes`
    kept free for activations and compiler scratch."""

    device: int
    memory_bytes: int
    utilization: float = 0.9
    workspace_bytes: int = 0

    @property
    def usable_bytes(self) -> int:
        return math.floor(self.memory_bytes * self.utilization) - self.workspace_bytes


def max_pages(
    budget: DeviceBudget,
    model: ModelShape,
    resident_layers: int,
    page_size: int,
    extra_bytes: int = 0,
) -> int:
    """Pool capacity (pages per layer, page 0 included) a device can hold with `L` layers.

    `floor((M*u - L*W - workspace - extra) / (L*P))`, or 0 when the weights alone do not fit.
    `extra_bytes` is what the device holds besides its layers (embedding on the first stage, head
    on the last: `stage_extra_bytes`).

    Raises ValueError for `resident_layers <= 0`: a device without layers has no pools, and a
    sentinel "unlimited" capacity would be one allocation away from a disaster. Callers skip
    such devices (as `admit` does).
    """
    if resident_layers <= 0:
        raise ValueError(
            f"device {budget.device}: max_pages needs at least one resident layer, got "
            f"{resident_layers}; a device without layers holds no KV pools"
        )
    free = budget.usable_bytes - resident_layers * model.weight_bytes_per_layer() - extra_bytes
    return max(0, free // (resident_layers * model.page_bytes_per_layer(page_size)))


def stage_extra_bytes(model: ModelShape, plan: PipelinePlan, stage: int) -> int:
    """Bytes stage `stage` of `plan` holds besides its layers' weights and KV.

    The first stage holds the embedding, the last the final norm and LM head; with tied
    embeddings a last stage on other devices than the first holds its own copy of the embedding.
    """
    first = stage == 0
    last = stage == plan.num_stages - 1
    extra = 0
    if first:
        extra += model.embed_bytes()
    if last:
        extra += model.head_bytes()
        if model.tie_embeddings and not first:
            extra += model.embed_bytes()
    return extra


def _device_extra_bytes(model: ModelShape, plans: tuple[PipelinePlan, ...], device: int) -> int:
    """Extra bytes on `device` when it holds what any of `plans` puts there (the union)."""
    embed = head = tied_copy = False
    for p in plans:
        i = p.stage_of_device(device)
        if i is None:
            continue
        first, last = i == 0, i == p.num_stages - 1
        embed |= first
        head |= last
        tied_copy |= last and not first and model.tie_embeddings
    extra = 0
    if embed or tied_copy:
        # One embedding matrix serves both roles when the device is first and last at once.
        extra += model.embed_bytes()
    if head:
        extra += model.head_bytes()
    return extra


@dataclass(frozen=True)
class DeviceAdmission:
    """The admission numbers of one device. `max_pages_*` are pool capacities (page 0
    included), rounded down to the granule; `max_pages_target` is None when the device leaves
    the pipeline."""

    device: int
    resident_layers_transition: int
    resident_layers_target: int
    extra_bytes_transition: int
    max_pages_transition: int
    max_pages_target: int | None
    pages_in_use: int
    # Whether the transition's weights (and embedding/head) fit at all, and the capacity before
    # rounding to the granule: a capacity of 0 can mean either "no room for the weights" or "room
    # for fewer pages than one granule", and the refusal must say which.
    weights_fit_transition: bool = True
    raw_pages_transition: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Admission:
    """The outcome of `admit`.

    `b_shrink` is the smallest transition capacity over all devices of either plan, `device` the
    device that sets it, and `pages_needed` the pages every stage must keep (the most pages in
    use on any stage). `ok` iff `pages_needed + RESERVED_PAGES <= b_shrink`.
    """

    b_shrink: int
    device: int
    pages_needed: int
    devices: Mapping[int, DeviceAdmission] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.pages_needed + RESERVED_PAGES <= self.b_shrink

    @property
    def pages_that_fit(self) -> int:
        """Pages in use the transition can keep (capacity less the reserved page)."""
        return max(0, self.b_shrink - RESERVED_PAGES)

    @property
    def reason(self) -> str | None:
        """Why the plan is refused, or None when it is admitted."""
        if self.ok:
            return None
        d = self.devices[self.device]
        if not d.weights_fit_transition:
            cause = (
                f"device {d.device} cannot even hold the weights of the "
                f"{d.resident_layers_transition} layers it holds during the transition "
                "(old and new plan together)"
            )
        else:
            rounding = (
                f", {d.raw_pages_transition} before rounding down to the pool size granule"
                if d.raw_pages_transition != d.max_pages_transition
                else ""
            )
            cause = (
                f"device {d.device} holds {d.resident_layers_transition} layers during the "
                f"transition (old and new plan together) and can fit only {self.pages_that_fit} "
                f"pages in use per layer there (a pool of {d.max_pages_transition} pages"
                f"{rounding}, {RESERVED_PAGES} reserved)"
            )
        return (
            f"plan refused: {cause}, but {self.pages_needed} pages are in use; "
            f"free at least {self.pages_needed - self.pages_that_fit} pages (let requests "
            f"finish), move fewer layers onto device {d.device} at once, or raise its budget"
        )

    def numbers(self) -> dict[str, Any]:
        """The numbers `AdmissionError` carries (and RPC returns in `error.data`)."""
        d = self.devices[self.device]
        return {
            "device": self.device,
            "pages_in_use": self.pages_needed,
            "pages_that_fit": self.pages_that_fit,
            "b_shrink": self.b_shrink,
            "resident_layers": d.resident_layers_transition,
            "devices": {k: v.to_json() for k, v in self.devices.items()},
        }


def admit(
    plan_old: PipelinePlan | None,
    plan_new: PipelinePlan,
    budgets: Mapping[int, DeviceBudget],
    model: ModelShape,
    page_size: int,
    pages_in_use: Mapping[int, int],
    *,
    granule: int = 1,
) -> Admission:
    """Compute the admission numbers of switching from `plan_old` to `plan_new`.

    Args:
      plan_old: the serving plan, or None for a first deployment (then transition == target).
      plan_new: the requested plan (same number of layers).
      budgets: device id -> budget, for every device of either plan.
      model: layer and page sizes.
      page_size: tokens per page.
      pages_in_use: device id -> pages in use (page 0 not counted) by the stage on that device;
        devices missing count as 0.
      granule: capacities are rounded down to a multiple of it (the pool capacity buckets);
        1 keeps the raw numbers.

    Raises:
      AdmissionError: a device of either plan has no budget.
    """
    plans = (plan_new,) if plan_old is None else (plan_old, plan_new)
    devices = sorted({d for p in plans for d in p.devices})
    missing = [d for d in devices if d not in budgets]
    if missing:
        raise AdmissionError(
            f"no memory budget for device(s) {missing}; give a budget for every device the old "
            "or new plan uses",
            devices=missing,
        )
    per_device: dict[int, DeviceAdmission] = {}
    for dev in devices:
        old_layers = set(plan_old.layers_on(dev)) if plan_old is not None else set()
        new_layers = set(plan_new.layers_on(dev))
        l_trans = len(old_layers | new_layers)
        extra_trans = _device_extra_bytes(model, plans, dev)
        raw_trans = max_pages(budgets[dev], model, l_trans, page_size, extra_trans)
        cap_trans = round_capacity(raw_trans, granule)
        weights_fit = (
            budgets[dev].usable_bytes - l_trans * model.weight_bytes_per_layer() - extra_trans >= 0
        )
        cap_target: int | None = None
        if new_layers:
            extra_target = _device_extra_bytes(model, (plan_new,), dev)
            cap_target = round_capacity(
                max_pages(budgets[dev], model, len(new_layers), page_size, extra_target), granule
            )
        per_device[dev] = DeviceAdmission(
            device=dev,
            resident_layers_transition=l_trans,
            resident_layers_target=len(new_layers),
            extra_bytes_transition=extra_trans,
            max_pages_transition=cap_trans,
            max_pages_target=cap_target,
            pages_in_use=int(pages_in_use.get(dev, 0)),
            weights_fit_transition=weights_fit,
            raw_pages_transition=raw_trans,
        )
    binding = min(devices, key=lambda d: (per_device[d].max_pages_transition, d))
    needed = max((int(n) for n in pages_in_use.values()), default=0)
    return Admission(
        b_shrink=per_device[binding].max_pages_transition,
        device=binding,
        pages_needed=needed,
        devices=per_device,
    )


def check_admission(
    plan_old: PipelinePlan | None,
    plan_new: PipelinePlan,
    budgets: Mapping[int, DeviceBudget],
    model: ModelShape,
    page_size: int,
    pages_in_use: Mapping[int, int],
    *,
    granule: int = 1,
) -> Admission:
    """`admit`, raising `AdmissionError` (message and numbers) when the plan does not fit."""
    adm = admit(plan_old, plan_new, budgets, model, page_size, pages_in_use, granule=granule)
    if not adm.ok:
        raise AdmissionError(adm.reason or "plan refused", **adm.numbers())
    return adm


def live_bytes_per_device() -> dict[int, int]:
    """Bytes of every live (not deleted) `jax.Array`, per device id, from `jax.live_arrays()`.

    A sharded array counts the bytes of each shard on the device that holds it (a replicated
    array counts fully on every device). Compiler scratch and in-flight temporaries are not
    arrays and are not seen.
    """
    import jax

    out: dict[int, int] = {}
    for arr in jax.live_arrays():
        if arr.is_deleted():
            continue
        try:
            shard_bytes = math.prod(arr.sharding.shard_shape(arr.shape)) * arr.dtype.itemsize
            for dev in arr.sharding.addressable_devices:
                out[dev.id] = out.get(dev.id, 0) + int(shard_bytes)
        except (ValueError, TypeError, AttributeError, NotImplementedError):
            # Uneven shards or unusual shardings: ask each shard.
            for shard in arr.addressable_shards:
                out[shard.device.id] = out.get(shard.device.id, 0) + int(shard.data.nbytes)
    return out
