"""The stage catalog: every DVC stage and every registered model, declared once (STAGES, TRAINERS).

Everything that needs to know the stages reads them here: the stages themselves (pipeline.stages, whose
package docstring gives a stage module's contract), the registry, the flows and `llm-pipeline dvc-yaml`, which
writes dvc.yaml's `cmd`, `params`, `metrics`, report out and code deps from it (its data deps, other outs and
plots are written by hand).
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

from gpt.files import atomic_write_json
from pipeline.core.errors import reporting_errors
from pipeline.core.layout import BASE_MODEL_DIR, CLASSIFIER_MODEL_DIR, INSTRUCT_MODEL_DIR, METRICS, REPORTS, SAMPLES


@dataclass(frozen=True)
class SampleFile:
    """A generator's sample outputs, a JSON list of records, which its model card quotes."""

    path: Path
    prompt_fields: tuple[str, ...]  # joined with " / " as the prompt
    output_field: str


# The promote stage owns these aliases: champion serves, challenger is the newest version put up.
CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class ModelSpec:
    """A model a training stage registers in MLflow, and the version tags `promote` decides on.

    A model is known by its role; its registered name is a param (mlflow.models.<role>), so that projects
    sharing one server keep their models apart. Each metric tag `t` has its standard error in tag `t_se`,
    which the promotion policy reads as the metric's noise (pipeline.registry.policy).
    """

    role: str                  # what the model is for, and the key of everything said about it
    default_name: str          # its registered name where no params file names it (params.yaml's default too)
    summary: str               # the registered model's description in MLflow
    higher_is_better: bool
    val_tag: str               # the key metric on the validation split: what promote decides on
    test_tag: str              # on the test split: reported (the same as val_tag where there is no test split)
    others: tuple[str, ...]    # version tags `review` and the model card show beside it
    folder: Path               # the stage's output model folder: what a version holds
    flavour: str               # the pyfunc module (models from code) that serves it; it names its folder
                               # artifact ARTIFACT and its signature folder_signature(folder)
    samples: SampleFile | None = None  # what the model card quotes (generators only)


@dataclass(frozen=True)
class Stage:
    """One dvc.yaml stage: `python -m <module>`."""

    name: str
    module: str
    metrics: Path | None = None  # the handful of numbers people compare (dvc metrics show, dvc exp show)
    report: Path | None = None   # an output, not a metric: statistics, input hashes; a training stage's
                                 # (and evaluate's) also holds its model's output_digest, as model_sha256
    compared: tuple[str, ...] = ()  # the metrics file's keys
    model: ModelSpec | None = None
    # The training stage whose model this stage measures: its report's metrics are tagged on that model's
    # version (pipeline.registry.versions.evaluation_tags).
    evaluates: str | None = None
    # An environment variable that may replace `python` in the command (pretrain: torchrun).
    launcher_env: str | None = None

    @property
    def command(self) -> str:
        python = f"\\${{{self.launcher_env}:-python}}" if self.launcher_env else "python"
        return f"{python} -m {self.module}"

    def write_results(self, report: Mapping[str, Any], numbers: Mapping[str, Any] | None = None) -> None:
        """Write the report, then the metrics file: the `compared` keys of `numbers` (default: the report)
        that have a value."""
        atomic_write_json(self.report, report)
        source = report if numbers is None else numbers
        atomic_write_json(self.metrics, {key: source[key] for key in self.compared if source.get(key) is not None})

    def load(self) -> ModuleType:
        """The stage's module, checked to define PARAMS and main."""
        module = importlib.import_module(self.module)
        if not isinstance(getattr(module, "PARAMS", None), dict) or not callable(getattr(module, "main", None)):
            raise TypeError(f"{self.module}: a stage module must define PARAMS and main (see pipeline.core.catalog)")
        return module


# The environment a stage reads besides its params: the command that launches pretrain (torchrun for DDP), and
# the MLflow parent run that every stage of one `dvc repro` or flow run logs under.
PRETRAIN_LAUNCH_ENV = "LLM_PIPELINE_PRETRAIN_LAUNCH"
RUN_GROUP_ENV = "LLM_PIPELINE_RUN_GROUP"
# In dvc.yaml's order, which is also the order in which they run.
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("download", "pipeline.stages.download", report=REPORTS / "download.json"),
    Stage("validate", "pipeline.stages.validate", report=REPORTS / "validate.json"),
    Stage("tokenize", "pipeline.stages.tokenize_data", report=REPORTS / "tokenize.json"),
    # pretrain's own val_loss covers eval_batches only: evaluate's, over the whole split, is the one compared.
    Stage("pretrain", "pipeline.stages.pretrain", METRICS / "pretrain.json", REPORTS / "pretrain.json",
          compared=("train_loss",), launcher_env=PRETRAIN_LAUNCH_ENV, model=ModelSpec(
              # evaluate tags the version with the loss over the whole val split; the corpus has no test split.
              "base", "gpt-base", "The pretrained GPT: a text generator, and the base the finetuning stages start from.",
              higher_is_better=False, val_tag="eval.val_loss", test_tag="eval.val_loss",
              others=("eval.val_perplexity", "metric.train_loss", "metric.steps", "metric.tokens_per_s"),
              folder=BASE_MODEL_DIR, flavour="pipeline.registry.pyfuncs.gpt_generator",
              samples=SampleFile(SAMPLES / "evaluate.json", ("prompt",), "greedy"))),
    Stage("evaluate", "pipeline.stages.evaluate", METRICS / "evaluate.json", REPORTS / "evaluate.json",
          compared=("val_loss",), evaluates="pretrain"),
    Stage("finetune_classifier", "pipeline.stages.finetune_classifier", METRICS / "finetune_classifier.json",
          REPORTS / "finetune_classifier.json", ("val_accuracy", "test_accuracy", "test_macro_f1"),
          model=ModelSpec(
              "classifier", "gpt-spam-classifier", "The GPT base finetuned to classify texts (by default SMS messages as ham or "
              "spam); returns each text's label and class probabilities.",
              higher_is_better=True, val_tag="metric.val_accuracy", test_tag="metric.test_accuracy",
              others=("metric.test_macro_f1", "metric.train_accuracy"),
              folder=CLASSIFIER_MODEL_DIR, flavour="pipeline.registry.pyfuncs.spam_classifier")),
    Stage("finetune_instruct", "pipeline.stages.finetune_instruct", METRICS / "finetune_instruct.json",
          REPORTS / "finetune_instruct.json", ("val_rouge_l_f1", "rouge_l_f1", "test_loss", "judge_score"),
          model=ModelSpec(
              # The instruction score: mean ROUGE-L F1 of greedy responses against the references.
              "instruct", "gpt-instruct", "The GPT base finetuned to follow instructions (Alpaca-style prompt); returns "
              "a greedy or sampled response.",
              higher_is_better=True, val_tag="metric.val_rouge_l_f1", test_tag="metric.rouge_l_f1",
              others=("metric.token_f1", "metric.test_loss", "metric.judge_score"),
              folder=INSTRUCT_MODEL_DIR, flavour="pipeline.registry.pyfuncs.instruct_generator",
              samples=SampleFile(SAMPLES / "instruct_responses.json", ("instruction", "input"), "response"))),
    # Last, so `models:/<name>@champion` is settled once `dvc repro` ends.
    Stage("promote", "pipeline.stages.promote", report=REPORTS / "promote.json"),
)}
# The registered models' training stages, by role.
TRAINERS: dict[str, Stage] = {stage.model.role: stage for stage in STAGES.values() if stage.model}
# The stages that measure a trained model, by the role of the model they measure.
EVALUATORS: dict[str, Stage] = {STAGES[stage.evaluates].model.role: stage for stage in STAGES.values()
                                if stage.evaluates}


def champion_uri(name: str) -> str:
    """The MLflow URI of the version in use of registered model `name`."""
    return f"models:/{name}@{CHAMPION}"


def registered_by(stage: Stage) -> list[ModelSpec]:
    """The models whose outputs `stage` may register (their pyfunc code is then its code too): a training
    stage its own; promote every one the registry lacks (pipeline.registry.versions.register_outputs)."""
    if stage.model:
        return [stage.model]
    return [trainer.model for trainer in TRAINERS.values()] if stage.name == "promote" else []


def command_line(name: str, main: Callable[[Path], None]) -> None:
    """Stage `name`'s command line: parse `--params`, run main(params_path) and exit; an expected error
    becomes one line `<name>: error: <message>` on stderr and exit status 1, without a traceback."""
    parser = argparse.ArgumentParser(prog=f"python -m {STAGES[name].module}",
                                     description=f"Run the {name} stage in the current folder.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    args = parser.parse_args()
    with reporting_errors(name):
        main(args.params)
