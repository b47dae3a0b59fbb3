"""`llm-pipeline preset list|apply NAME`: the named params overrides of pipeline/core/presets.yaml."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.errors import reporting_errors
from pipeline.core.params import read_yaml
from pipeline.core.presets import PRESETS_FILE, apply_preset


def main(argv: list[str] | None = None) -> None:
    """`llm-pipeline preset list|apply NAME`."""
    parser = argparse.ArgumentParser(prog="llm-pipeline preset", description=__doc__)
    parser.add_argument("action", choices=["apply", "list"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    if args.action == "apply" and not args.name:
        parser.error("apply needs a preset name")
    with reporting_errors("preset"):
        if args.action == "list":
            print("\n".join(read_yaml(PRESETS_FILE)))
            return
        changed = apply_preset(args.name, args.params)
    print(f"{args.params}: preset {args.name} changed {len(changed)} key(s): {', '.join(changed) or '-'}")
    print("run `dvc repro` to train with it; `git checkout params.yaml` returns to the defaults")


if __name__ == "__main__":
    main()
