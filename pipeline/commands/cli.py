"""`llm-pipeline`: one command for the project; each verb's arguments are parsed in a module of this package."""
from __future__ import annotations

import importlib
import sys
from argparse import ArgumentParser, RawDescriptionHelpFormatter

# name -> ("module:function" taking argv, one-line help). Targets are imported only when used,
# so `llm-pipeline --help` does not wait for torch or MLflow to load.
COMMANDS = {
    "run": ("pipeline.commands.repro:run", "run the DVC pipeline (dvc repro) as one MLflow run group"),
    "register": ("pipeline.commands.repro:register", "register the trained models of data/models in MLflow (no retraining)"),
    "flow": ("pipeline.commands.flow:main", "run Prefect flows, or serve the scheduled deployment"),
    "preset": ("pipeline.commands.preset:main", "list the params presets, or write one into params.yaml"),
    "generate": ("pipeline.commands.generate:main", "continue prompts with the pretrained GPT"),
    "chat": ("pipeline.commands.chat:main", "ask the instruction-finetuned model"),
    "classify": ("pipeline.commands.classify:main", "classify texts, with the probability of every class"),
    "sweep": ("pipeline.commands.sweep:main", "run a grid of params as DVC experiments on its queue; print one table"),
    "review": ("pipeline.commands.review:main", "print the registered models: versions, aliases, key metrics, lineage"),
    "dvc-yaml": ("pipeline.commands.dvc_yaml:main", "rewrite dvc.yaml's generated parts (cmd, params, metrics, code deps) from the stage catalog"),
    "serve": ("pipeline.commands.serve:main", "serve a registered model over HTTP on 127.0.0.1 (mlflow models serve)"),
    "services": ("pipeline.commands.services:main", "start or stop PostgreSQL, MLflow and Prefect servers and a worker on 127.0.0.1"),
}


def main(argv: list[str] | None = None) -> None:
    """`llm-pipeline COMMAND ...`: dispatch to the verb's module."""
    argv = sys.argv[1:] if argv is None else argv
    listing = "\n".join(f"  {name:<10}{text}" for name, (_, text) in COMMANDS.items())
    parser = ArgumentParser(prog="llm-pipeline", formatter_class=RawDescriptionHelpFormatter,
                            description="Train, review and use the project's GPT models.",
                            epilog=f"commands:\n{listing}\n\n`llm-pipeline COMMAND --help` describes one.")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints the help or a usage error and exits
    module, function = COMMANDS[argv[0]][0].split(":")
    getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    main()
