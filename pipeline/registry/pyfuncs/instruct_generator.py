"""MLflow pyfunc model (logged as code): columns `instruction` and optional `input` to the response in `text`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModelContext
from mlflow.types.schema import ColSpec, Schema

from gpt.instruct import format_prompt
from pipeline.registry.pyfuncs.gpt_generator import ARTIFACT as GPT_ARTIFACT
from pipeline.registry.pyfuncs.gpt_generator import SIGNATURE as GPT_SIGNATURE
from pipeline.registry.pyfuncs.gpt_generator import GPTGenerator
from pipeline.registry.pyfuncs.inputs import check_texts

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "instruction"), ColSpec("string", "input", required=False)]),
    outputs=GPT_SIGNATURE.outputs,
    params=GPT_SIGNATURE.params,
)
# Logged with the model (serving_input_example.json) and predicted once before registering it.
INPUT_EXAMPLE = (pd.DataFrame({"instruction": ["Name a primary color."], "input": [""]}), {"max_new_tokens": 1})
ARTIFACT = GPT_ARTIFACT  # a checkpoint folder, as GPTGenerator loads it


def folder_signature(folder: Path) -> ModelSignature:
    """The signature of a model logged from checkpoint `folder`: SIGNATURE, whatever the folder."""
    return SIGNATURE


class InstructGenerator(GPTGenerator):
    """The instruction-finetuned GPT: builds the Alpaca-style prompt, then generates as GPTGenerator does."""

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        model_input = check_texts(model_input, ["instruction"], optional=["input"])
        inputs = model_input["input"] if "input" in model_input else [""] * len(model_input)
        prompts = [format_prompt(str(instruction), "" if pd.isna(text) else str(text))
                   for instruction, text in zip(model_input["instruction"], inputs)]
        out = super().predict(context, pd.DataFrame({"prompt": prompts}), params)
        return out.assign(text=out["text"].str.strip())


set_model(InstructGenerator())
