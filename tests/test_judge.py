"""pipeline.training.judge against a fake Ollama-compatible server on 127.0.0.1, and against nothing at all."""
from __future__ import annotations


import pytest

from conftest import UNREACHABLE
from pipeline.training import judge

def test_score_sends_the_books_prompt_and_parses_the_integer(fake_ollama):
    cfg = {"url": fake_ollama.url, "model": "llama3", "timeout_s": 5.0}
    assert judge.score(cfg, "Name a color.", "", "Blue.", "Red.") == 87
    path, body = fake_ollama.requests[0]
    assert path == "/api/chat"
    assert body["model"] == "llama3" and body["stream"] is False and body["options"] == judge.OPTIONS
    assert body["messages"] == [{"role": "user", "content": (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.` and correct output `Blue.`, score the model "
        "response `Red.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only.")}]


@pytest.mark.parametrize(("reply", "expected"), [
    ("87", 87), ("Score: 100.", 100), ("0", 0), ("I'd say 55/100", 55), ("no idea", None), ("1000", None),
])
def test_parse_score(reply, expected):
    assert judge.parse_score(reply) == expected


def test_server_that_is_not_ollama_is_a_clear_error(fake_ollama):
    with pytest.raises(judge.JudgeError, match=r"answered HTTP 404"):
        judge.chat(fake_ollama.url + "/wrong", "llama3", "hi", 5.0)
    judge.check_reachable(fake_ollama.url, 5.0)  # a 501 to GET still proves a server listens


def test_unreachable_judge_is_a_one_line_error():
    with pytest.raises(judge.JudgeError) as caught:
        judge.chat(UNREACHABLE, "llama3", "hi", 5.0)
    message = str(caught.value)
    assert message.startswith(f"LLM judge {UNREACHABLE}/api/chat is unreachable") and "\n" not in message
    with pytest.raises(judge.JudgeError, match=rf"LLM judge {UNREACHABLE} is unreachable"):
        judge.check_reachable(UNREACHABLE, 5.0)
