"""Ask the instruction model: `llm-pipeline chat [--model PATH_OR_MODELS_URI] [--input TEXT] [INSTRUCTION]`."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.commands.models import add_model_options, is_model_uri, load_local_model, load_mlflow_model, parse_model_args
from pipeline.core.errors import reporting_errors
from pipeline.core.layout import INSTRUCT_MODEL_DIR


Responder = Callable[[str, str], str]


def local_responder(path: str, max_new_tokens: int, fast_decode: bool = False) -> Responder:
    """Answers from a checkpoint folder, with the project's BPE files."""
    from gpt.instruct import respond

    model, tokenizer = load_local_model(path, fast_decode)
    return lambda instruction, input_text: respond(model, tokenizer, instruction, input_text, max_new_tokens)


def mlflow_responder(uri: str, max_new_tokens: int) -> Responder:
    """Answers from a logged or registered model, in the tracking store the stages use."""
    import pandas as pd

    model = load_mlflow_model(uri)

    def answer(instruction: str, input_text: str) -> str:
        frame = pd.DataFrame({"instruction": [instruction], "input": [input_text]})
        return str(model.predict(frame, params={"max_new_tokens": max_new_tokens})["text"].iloc[0])
    return answer


def main(argv: list[str] | None = None) -> None:
    """One answer when an instruction is given; otherwise one per line of stdin until EOF or an empty line."""
    parser = argparse.ArgumentParser(prog="llm-pipeline chat", description=__doc__)
    parser.add_argument("instruction", nargs="?", help="the instruction; omit it to read instructions from stdin")
    add_model_options(parser, str(INSTRUCT_MODEL_DIR), "instruct")
    parser.add_argument("--input", default="", help="the optional input that goes with each instruction")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parse_model_args(parser, argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    with reporting_errors("chat"):
        if is_model_uri(args.model):
            answer = mlflow_responder(args.model, args.max_new_tokens)
        else:
            answer = local_responder(args.model, args.max_new_tokens, args.fast_decode)
        if args.instruction is not None:
            print(answer(args.instruction, args.input))
            return
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                print("instruction> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                break
            print(answer(line.strip(), args.input), flush=True)


if __name__ == "__main__":
    main()
