"""Continue text with the pretrained GPT: `llm-pipeline generate [--model PATH_OR_MODELS_URI] PROMPT...`."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.commands.models import add_model_options, is_model_uri, load_local_model, load_mlflow_model, parse_model_args
from pipeline.core.errors import reporting_errors
from pipeline.core.layout import BASE_MODEL_DIR as MODEL_DIR

Generator = Callable[[list[str]], list[str]]  # prompts to their continuations


def local_generator(path: str, settings: dict, seed: int, fast_decode: bool = False) -> Generator:
    """Continuations from a checkpoint folder, with the project's BPE files; sampling follows `seed`."""
    import torch

    from gpt.generate import generate_texts

    model, tokenizer = load_local_model(path, fast_decode)
    rng = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return lambda prompts: generate_texts(model, tokenizer, prompts, generator=rng, **settings)


def mlflow_generator(uri: str, settings: dict, seed: int) -> Generator:
    """Continuations from a logged or registered model (e.g. models:/gpt-base@champion)."""
    import pandas as pd
    import torch

    model = load_mlflow_model(uri)
    torch.manual_seed(seed)  # the pyfunc model samples from torch's global generator
    params = {name: value for name, value in settings.items() if value is not None}
    return lambda prompts: [str(text) for text in model.predict(pd.DataFrame({"prompt": prompts}), params=params)["text"]]


def main(argv: list[str] | None = None) -> None:
    """Print each prompt followed by its continuation; an expected error is one line and exit status 1."""
    parser = argparse.ArgumentParser(prog="llm-pipeline generate", description=__doc__)
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (default: one per line of stdin)")
    add_model_options(parser, str(MODEL_DIR), "base")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="0 disables top-k (default: 50)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    parser.add_argument("--seed", type=int, default=123)
    args = parse_model_args(parser, argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.temperature < 0 or args.top_k < 0 or not (args.top_p is None or 0 < args.top_p <= 1):
        parser.error("--temperature and --top-k must be >= 0 and --top-p in (0, 1]")
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_k": args.top_k or None, "top_p": args.top_p}
    prompts = args.prompts or [line for line in sys.stdin.read().splitlines() if line.strip()]
    with reporting_errors("generate"):
        if is_model_uri(args.model):
            continue_text = mlflow_generator(args.model, settings, args.seed)
        else:
            continue_text = local_generator(args.model, settings, args.seed, args.fast_decode)
        for prompt, text in zip(prompts, continue_text(prompts)):
            print(prompt + text, flush=True)


if __name__ == "__main__":
    main()
