"""MLflow pyfunc model (logged as code): prompts in column `prompt` to generated text in `text`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from gpt.checkpoint import load_model
from gpt.generate import generate_texts
from gpt.runtime import pick_device
from gpt.tokenizer import load_tokenizer
from pipeline.registry.pyfuncs.inputs import check_texts

# top_k 0 and top_p 1.0 disable those filters; temperature 0.0 is greedy.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]),
    outputs=Schema([ColSpec("string", "text")]),
    params=ParamSchema([
        ParamSpec("max_new_tokens", "long", 50),
        ParamSpec("temperature", "double", 0.0),
        ParamSpec("top_k", "long", 0),
        ParamSpec("top_p", "double", 1.0),
    ]),
)
DEFAULTS = {spec.name: spec.default for spec in SIGNATURE.params.params}
# Logged with the model (serving_input_example.json) and predicted once before registering it.
INPUT_EXAMPLE = (pd.DataFrame({"prompt": ["Hello"]}), {"max_new_tokens": 1})
ARTIFACT = "checkpoint"  # the artifact holding the checkpoint folder


def folder_signature(folder: Path) -> ModelSignature:
    """The signature of a model logged from checkpoint `folder`: SIGNATURE, whatever the folder."""
    return SIGNATURE


class GPTGenerator(PythonModel):
    """Our GPT checkpoint (artifact `checkpoint`) and GPT-2 BPE files (artifact `bpe`)."""

    def load_context(self, context: PythonModelContext) -> None:
        device = pick_device("auto")
        self.model = load_model(context.artifacts[ARTIFACT], device=device).eval()
        self.tokenizer = load_tokenizer(context.artifacts["bpe"])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        model_input = check_texts(model_input, ["prompt"])
        settings = {**DEFAULTS, **(params or {})}
        # One request's prompts are decoded together, in batches (gpt.generate.generate_batch).
        texts = generate_texts(self.model, self.tokenizer, [str(prompt) for prompt in model_input["prompt"]],
                               max_new_tokens=int(settings["max_new_tokens"]),
                               temperature=float(settings["temperature"]),
                               top_k=int(settings["top_k"]), top_p=float(settings["top_p"]))
        return pd.DataFrame({"text": texts})


set_model(GPTGenerator())
