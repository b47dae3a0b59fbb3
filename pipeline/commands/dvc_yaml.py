"""`llm-pipeline dvc-yaml [--check]`: rewrite dvc.yaml's generated parts from the stage catalog, or check them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.errors import reporting_errors
from pipeline.orchestration import dvcyaml


def main(argv: list[str] | None = None) -> None:
    """`llm-pipeline dvc-yaml [--check]`: rewrite dvc.yaml's generated parts, or check they are current."""
    parser = argparse.ArgumentParser(prog="llm-pipeline dvc-yaml", description=dvcyaml.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if dvc.yaml is stale")
    parser.add_argument("--file", type=Path, default=Path(dvcyaml.DVC_YAML),
                        help="the dvc.yaml to rewrite, with its params.yaml beside it (default: the current folder's)")
    args = parser.parse_args(argv)
    with reporting_errors("dvc-yaml"):
        if not args.check:
            if dvcyaml.refresh(args.file):
                print(f"dvc-yaml: rewrote {args.file}")
            return
        if dvcyaml.refresh(args.file, write=False):
            print(f"dvc-yaml: error: {args.file} is stale; run `llm-pipeline dvc-yaml`", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
