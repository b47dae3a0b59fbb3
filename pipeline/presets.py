"""Apply a named preset (pipeline/presets.yaml) to params.yaml: `python -m pipeline.presets apply book`."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from gpt.files import atomic_write_text
from pipeline.errors import reporting_errors
from pipeline.params import ParamsError, read_yaml

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
    params = read_yaml(params_path)
    return params, overlay(params, load_preset(name))


def apply_preset(name: str, params_path: Path) -> list[str]:
    """Write preset `name` into the params file; return the keys it changed."""
    params, changed = preset_params(name, params_path)
    # safe_dump drops comments, so presets are applied to a copy the user can diff with git.
    atomic_write_text(params_path, yaml.safe_dump(params, sort_keys=False, width=100))
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.presets", description=__doc__)
    parser.add_argument("action", choices=["apply", "list"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    if args.action == "apply" and not args.name:
        parser.error("apply needs a preset name")
    with reporting_errors("presets"):
        if args.action == "list":
            print("\n".join(read_yaml(PRESETS_FILE)))
            return
        changed = apply_preset(args.name, args.params)
    print(f"{args.params}: preset {args.name} changed {len(changed)} key(s): {', '.join(changed) or '-'}")
    print("run `dvc repro` to train with it; `git checkout params.yaml` returns to the defaults")


if __name__ == "__main__":
    main()
