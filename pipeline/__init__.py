"""The pipeline around the `gpt` package: DVC stages, the `llm-pipeline` command, and what they share.

Its parts, lowest first (LAYERS). A module imports from `gpt`, from its own part and from the layers below
its own, never from a layer above or a sibling part of its layer (tests/test_architecture.py):

  core/           the stage catalog (catalog.py: STAGES, TRAINERS, ModelSpec), params.py and presets, the data/
                  paths (layout.py), expected errors, processes (liveness, process groups) and plain-text tables
  data/           dataset sources, downloads (fetch.py), the contracts tables and instructions meet, corpus
                  streaming and tokenization
  registry/       MLflow: runs (tracking.py), versions by content digest and aliases (versions.py), a lock
                  per model for its writers (locks.py), the promotion policy, model cards, and the pyfuncs
                  that serve the models
  training/       what the training stages share: finetuning from the base, the optional LLM judge, plots
  mlflow_models/  import shims only: versions registered before this layout run code that names these paths
  stages/         one module per dvc.yaml stage; `dvc repro` and the Prefect flows run them as
                  `python -m pipeline.stages.<module>`, and nothing imports them
  orchestration/  Prefect flows, the team services, `dvc repro`'s environment and lock, dvc.yaml's generation,
                  sweeps on DVC's queue
  commands/       the `llm-pipeline` verbs: cli.py dispatches, one module per verb parses its arguments
"""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("data", "registry", "training"),
    ("mlflow_models",),
    ("stages",),
    ("orchestration",),
    ("commands",),
)
