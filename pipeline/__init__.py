"""The pipeline around the `gpt` package: DVC stages, the `llm-pipeline` command, and what they share.

  stages/         one module per dvc.yaml stage, declared once in stages/__init__.py (STAGES);
                  `dvc repro` and the Prefect flows both run them as `python -m pipeline.stages.<module>`
  commands/       the `llm-pipeline` verbs (cli.py lists them): run, register, generate, chat, classify, review,
                  serve
  mlflow_models/  the MLflow pyfunc models the training stages register and `serve` serves
  flows.py        Prefect flows and the nightly deployment over dvc.yaml (prefect.yaml deploys it to a worker)
  services.py     `llm-pipeline services up|down`: PostgreSQL, MLflow and Prefect servers and a worker, locally
  dvcyaml.py      writes dvc.yaml's cmd, params, metrics, report outs, code deps and local data sources
  datasets.py     params `datasets`: each dataset's sources (download names, local files/folders/globs)
  params.py       params.yaml checking; presets.py (+ presets.yaml) named overrides of it
  tracking.py     MLflow runs and model logging; registry.py: each stage output registered once (by content
                  hash), and the aliases promote keeps
  policy.py       how promote decides (val metric, standard errors, margins); model_card.py the card it writes
  layout.py       the data/ folders; fetch.py downloads (pinned or tracked); corpus.py streams and
                  tokenizes a corpus; schemas.py reads labelled tables and instructions; encoding.py
  finetuning.py   what the two finetuning stages share; judge.py the optional LLM judge; plots.py curves
  errors.py       expected errors, reported in one line; repro.py the environment of `dvc repro` and who
                  holds the repository's lock
"""
