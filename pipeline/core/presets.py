"""Named params overrides (presets.yaml beside this file), laid over params.yaml: `llm-pipeline preset apply book`."""
from __future__ import annotations

from pathlib import Path

from gpt.files import atomic_write_text
from pipeline.core.params import ParamsError, document_text, read_document, read_yaml

PRESETS_FILE = Path(__file__).with_name("presets.yaml")


def overlay(base: dict, changes: dict, prefix: str = "") -> list[str]:
    """Merge `changes` into `base` in place; return the dotted keys whose value changed."""
    changed = []
    for key, value in changes.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if not isinstance(base.get(key), dict):
                raise ParamsError(f"unknown param section {dotted}: params.yaml has no such section")
            changed += overlay(base[key], value, f"{dotted}.")
        else:
            if key not in base:
                raise ParamsError(f"unknown param {dotted}: params.yaml has no such key")
            if base[key] != value:
                changed.append(dotted)
            if isinstance(base[key], list) and isinstance(value, list):
                base[key][:] = value  # in place: a list read by read_document keeps its layout and comment
            else:
                base[key] = value
    return changed


def load_preset(name: str) -> dict:
    """The params changes of preset `name`, as nested sections."""
    presets = read_yaml(PRESETS_FILE)
    if name not in presets:
        raise ParamsError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]


def preset_params(name: str, params_path: Path) -> tuple[dict, list[str]]:
    """The params file with preset `name` laid over it, as `apply` would write it, and the keys it changed."""
    params = read_document(params_path)
    return params, overlay(params, load_preset(name))


def apply_preset(name: str, params_path: Path) -> list[str]:
    """Write preset `name` into the params file, its comments and layout kept; return the keys it changed."""
    params, changed = preset_params(name, params_path)
    atomic_write_text(params_path, document_text(params))
    return changed
