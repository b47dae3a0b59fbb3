"""An LLM judge over an Ollama-compatible chat endpoint that scores responses 0-100, as the book does."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any, Mapping

from gpt.instruct import format_input
from pipeline.core.params import Bool, Float, Section, Str

JUDGE_SECTION = Section(enabled=Bool(), url=Str(pattern=r"https?://\S+"), model=Str(), timeout_s=Float(0, bounds="(]"))
# The book's options: deterministic answers, room for the prompt.
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
_SCORE = re.compile(r"\b(100|[1-9]?[0-9])\b")


class JudgeError(OSError):
    """The judge cannot be reached or answers nonsense (an OSError, so stages report it in one line)."""


def check_reachable(url: str, timeout_s: float) -> None:
    """Fail fast, before any training, when nothing listens at `url` (any HTTP answer will do)."""
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError as exc:
        exc.close()
    except OSError as exc:
        raise JudgeError(f"LLM judge {url} is unreachable ({getattr(exc, 'reason', exc)})") from None


def judge_prompt(instruction: str, input_text: str, reference: str, response: str) -> str:
    """The book's scoring prompt."""
    return (f"Given the input `{format_input(instruction, input_text)}` "
            f"and correct output `{reference}`, "
            f"score the model response `{response}`"
            " on a scale from 0 to 100, where 100 is the best score. "
            "Respond with the integer number only.")


def chat(url: str, model: str, prompt: str, timeout_s: float, options: Mapping[str, Any] = OPTIONS) -> str:
    """One user message to `POST {url}/api/chat` (stream off); returns the assistant's reply."""
    endpoint = url.rstrip("/") + "/api/chat"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "stream": False, "options": dict(options)}).encode()
    request = urllib.request.Request(endpoint, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            data = json.loads(reply.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise JudgeError(f"LLM judge {endpoint} answered HTTP {exc.code} ({exc.reason})") from None
    except (OSError, ValueError) as exc:
        # URLError wraps the socket error; ValueError covers a body that is not JSON.
        raise JudgeError(f"LLM judge {endpoint} is unreachable or broken ({getattr(exc, 'reason', exc)})") from None
    try:
        return str(data["message"]["content"])
    except (KeyError, TypeError):
        raise JudgeError(f"LLM judge {endpoint}: reply has no message.content") from None


def parse_score(reply: str) -> int | None:
    """The first integer 0-100 in the reply; None when there is none (the book skips those too)."""
    found = _SCORE.search(reply)
    return int(found.group(1)) if found else None


def score(cfg: Mapping[str, Any], instruction: str, input_text: str, reference: str, response: str) -> int | None:
    """Ask the judge configured by a checked JUDGE_SECTION for one response's score."""
    prompt = judge_prompt(instruction, input_text, reference, response)
    return parse_score(chat(cfg["url"], cfg["model"], prompt, cfg["timeout_s"]))
