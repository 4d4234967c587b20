"""What a LangChain run becomes: a plproxy `LogRecord` in the OpenAI shape, and its `/log-request` body.

Pure functions, no I/O. The handler keeps a `RunInfo` from `on_*_start` to `on_llm_end`/`on_llm_error`;
`build_payload` turns it into the body on a background thread (the store's writer or the sidecar
sender), never on the caller's. Chat models are recorded as OpenAI chat completions (messages in
OpenAI's chat format, so `plproxy.mapping` makes the PromptLayer blueprints exactly as it does for the
proxy), LLMs as legacy completions. One record per prompt: a run of a chat model or an LLM has one
prompt in practice, and its `n > 1` generations become the record's choices.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import orjson

from plproxy.mapping import is_credential_key, to_log_request
from plproxy.record import Annotations, Api, LogRecord, Outcome

__all__ = [
    "RunInfo",
    "build_payload",
    "clean_parameters",
    "log_id_for",
    "model_name",
    "plain_json",
    "provider_for",
    "to_record",
]

# PromptLayer's provider names for the model classes and LangChain `ls_provider` values it knows;
# anything else keeps LangChain's own `ls_provider` ("llamacpp", "gpt4all", "ollama", …).
_PROVIDER_BY_CLASS = {
    "ChatOpenAI": "openai", "OpenAI": "openai",
    "AzureChatOpenAI": "openai.azure", "AzureOpenAI": "openai.azure",
    "ChatAnthropic": "anthropic", "AnthropicLLM": "anthropic", "Anthropic": "anthropic",
    "ChatGoogleGenerativeAI": "google", "GoogleGenerativeAI": "google",
    "ChatVertexAI": "vertexai", "VertexAI": "vertexai",
    "ChatMistralAI": "mistral", "ChatCohere": "cohere", "Cohere": "cohere",
    "ChatBedrock": "amazon.bedrock", "ChatBedrockConverse": "amazon.bedrock", "BedrockLLM": "amazon.bedrock",
    "ChatHuggingFace": "huggingface", "HuggingFaceEndpoint": "huggingface",
    "HuggingFacePipeline": "huggingface",
    "LlamaCpp": "llamacpp", "ChatLlamaCpp": "llamacpp", "GPT4All": "gpt4all",
    "ChatOllama": "ollama", "OllamaLLM": "ollama", "Ollama": "ollama",
}
_PROVIDER_BY_LS = {
    "azure": "openai.azure", "google_genai": "google", "google_vertexai": "vertexai",
    "mistralai": "mistral", "bedrock": "amazon.bedrock", "amazon_bedrock": "amazon.bedrock",
}
_OPENAI_FAMILY = frozenset({"openai", "openai.azure"})
_MODEL_FILE_SUFFIXES = (".gguf", ".ggml", ".bin", ".safetensors")
_MODEL_KEYS = ("model_name", "model", "model_id", "deployment_name", "repo_id", "model_path", "model_file")
_ROLE_BY_TYPE = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool",
                 "function": "function", "developer": "developer"}
# Credential names `is_credential_key` does not cover by itself: `huggingfacehub_api_token`, `*_auth_token`.
_EXTRA_CREDENTIAL_SUFFIXES = ("apitoken", "authtoken", "secretkey")
_KEY_NORMALISE = str.maketrans("", "", "-_ ")
_SECRET_IN_TEXT = re.compile(r"(?:sk|pl)[-_][A-Za-z0-9_-]{16,}|[Bb]earer\s+[A-Za-z0-9._~+/=-]+")
_MAX_DEPTH = 20


@dataclass(slots=True)
class RunInfo:
    """What `on_chat_model_start` / `on_llm_start` saw, kept until the run ends (then dropped)."""

    chat: bool
    start_time: float
    class_name: str
    inputs: Sequence[Any]  # per prompt: a list of BaseMessage (chat) or a string (LLM)
    invocation_params: Mapping[str, Any]
    run_metadata: Mapping[str, Any]
    tags: Sequence[str]
    parent_run_id: uuid.UUID | None
    tokens: list[str] | None = field(default=None)  # streamed text, when the model streamed


def log_id_for(run_id: uuid.UUID, index: int) -> str:
    """The record's log id: the LangChain run id itself for the (only) first prompt of a run."""
    return str(run_id) if index == 0 else str(uuid.uuid5(run_id, str(index)))


def provider_for(class_name: str, run_metadata: Mapping[str, Any]) -> str:
    if class_name in _PROVIDER_BY_CLASS:
        return _PROVIDER_BY_CLASS[class_name]
    ls_provider = run_metadata.get("ls_provider")
    if isinstance(ls_provider, str) and ls_provider:
        return _PROVIDER_BY_LS.get(ls_provider, ls_provider)
    return "langchain"


def model_name(invocation_params: Mapping[str, Any], run_metadata: Mapping[str, Any]) -> str:
    """The model as the record names it: LangChain's `ls_model_name`, else the usual parameters."""
    candidates = [run_metadata.get("ls_model_name"), *(invocation_params.get(k) for k in _MODEL_KEYS)]
    for value in candidates:
        if isinstance(value, str) and value.strip():
            value = value.strip()
            # a local model file (LlamaCpp, GPT4All) is named by its file, not by where it lies
            return PurePath(value).stem if value.lower().endswith(_MODEL_FILE_SUFFIXES) else value
    llm_type = invocation_params.get("_type")
    return llm_type if isinstance(llm_type, str) and llm_type else "unknown"


@functools.lru_cache(maxsize=4096)  # parameter and metadata names repeat from record to record
def _is_credential(key: str) -> bool:
    norm = key.lower().translate(_KEY_NORMALISE)
    return is_credential_key(key) or norm.endswith(_EXTRA_CREDENTIAL_SUFFIXES)


_SCALARS = frozenset({str, int, float, bool, type(None)})
_SECRET_TYPES = frozenset({"SecretStr", "SecretBytes"})


def plain_json(value: Any, depth: int = 0) -> Any:
    """`value` as plain JSON: credential-named keys and secret objects dropped, unknown objects named."""
    kind = type(value)
    if kind in _SCALARS:  # the common cases first, by exact type: this runs for every value of a record
        return value
    if kind is dict and depth <= _MAX_DEPTH:
        return _plain_mapping(value, depth)
    if (kind is list or kind is tuple) and depth <= _MAX_DEPTH:
        return [plain_json(v, depth + 1) for v in value if type(v) in _SCALARS or not _is_secret(v)]
    if isinstance(value, bool | int | float | str):
        return value
    if depth > _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, enum.Enum):
        return plain_json(value.value, depth + 1)
    if isinstance(value, Mapping):
        return _plain_mapping(value, depth)
    if isinstance(value, list | tuple | set | frozenset):
        return [plain_json(v, depth + 1) for v in value if not _is_secret(v)]
    model_dump = getattr(value, "model_dump", None)  # pydantic models (tool schemas, response formats)
    if callable(model_dump) and not isinstance(value, type):
        with contextlib.suppress(Exception):
            return plain_json(model_dump(), depth + 1)
    # Never str() an arbitrary object: its repr may hold a client and its key.
    return f"<{type(value).__name__}>"


def _plain_mapping(value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out = {}
    for k, v in value.items():
        key = k if type(k) is str else str(k)
        if not _is_credential(key) and (type(v) in _SCALARS or not _is_secret(v)):
            out[key] = plain_json(v, depth + 1)
    return out


def _is_secret(value: Any) -> bool:
    return type(value).__name__ in _SECRET_TYPES


def clean_parameters(invocation_params: Mapping[str, Any]) -> dict[str, Any]:
    """The model's invocation parameters as JSON, minus credentials and LangChain's own `_type`."""
    cleaned = plain_json({k: v for k, v in invocation_params.items() if k != "_type"})
    return cleaned if isinstance(cleaned, dict) else {}


def redact_text(text: str) -> str:
    return _SECRET_IN_TEXT.sub("[REDACTED]", text)


# --- messages ------------------------------------------------------------------------------------

def _fallback_message(message: Any) -> dict[str, Any]:
    kind = getattr(message, "type", "")
    role = getattr(message, "role", None) if kind == "chat" else _ROLE_BY_TYPE.get(kind, "user")
    content = getattr(message, "content", "")
    out: dict[str, Any] = {"role": role if isinstance(role, str) else "user",
                           "content": content if isinstance(content, str | list) else str(content)}
    for attr in ("tool_call_id", "name"):
        value = getattr(message, attr, None)
        if isinstance(value, str):
            out[attr] = value
    return out


def openai_message(message: Any) -> dict[str, Any]:
    """One LangChain message in OpenAI's chat format (tool calls, tool results, images included)."""
    try:
        from langchain_core.messages import convert_to_openai_messages

        converted = convert_to_openai_messages(message)
        out = dict(converted) if isinstance(converted, dict) else _fallback_message(message)
    except Exception:
        out = _fallback_message(message)
    out = dict(plain_json(out))
    content = out.get("content")
    if isinstance(content, list):  # reasoning blocks become the thinking block plproxy.mapping makes
        thinking = [p.get("reasoning") or p.get("thinking") for p in content
                    if isinstance(p, dict) and p.get("type") in ("reasoning", "thinking")]
        if thinking:
            out["content"] = [p for p in content
                              if not (isinstance(p, dict) and p.get("type") in ("reasoning", "thinking"))]
            out["reasoning_content"] = "\n".join(t for t in thinking if isinstance(t, str))
    extra = getattr(message, "additional_kwargs", None)
    if isinstance(extra, dict) and isinstance(extra.get("reasoning_content"), str):
        out.setdefault("reasoning_content", extra["reasoning_content"])
    if out.get("tool_calls") and out.get("content") in ("", None, []):
        out["content"] = None  # PromptLayer's shape for an assistant message that only calls tools
    return out


# --- results -------------------------------------------------------------------------------------

def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _message(generation: Any) -> Any:
    """A chat generation's message, None for an LLM's plain `Generation`: without asking the latter,
    whose missing attribute takes pydantic's slow path (an exception raised and caught inside)."""
    return None if _lacks(generation.__class__, "message") else getattr(generation, "message", None)


@functools.lru_cache(maxsize=256)
def _lacks(cls: type, name: str) -> bool:
    """A pydantic model class that has no attribute `name`, and no extra fields that could hold one."""
    fields = getattr(cls, "model_fields", None)
    config = getattr(cls, "model_config", None)
    if not isinstance(fields, dict) or not isinstance(config, dict) or name in fields:
        return False
    return config.get("extra") != "allow" and not hasattr(cls, name)


def _usage_from(mapping: Any) -> dict[str, int] | None:
    if not isinstance(mapping, Mapping):
        return None
    pairs = (("prompt_tokens", ("prompt_tokens", "input_tokens", "prompt_eval_count")),
             ("completion_tokens", ("completion_tokens", "output_tokens", "eval_count")))
    usage = {}
    for field_name, keys in pairs:
        for key in keys:
            if (value := _int(mapping.get(key))) is not None:
                usage[field_name] = value
                break
    return usage or None


def usage_of(result: Any) -> dict[str, int] | None:
    """Token counts the model reported: `llm_output`, else the first message's `usage_metadata`."""
    llm_output = getattr(result, "llm_output", None)
    if isinstance(llm_output, Mapping):
        for key in ("token_usage", "usage"):
            if (usage := _usage_from(llm_output.get(key))) is not None:
                return usage
    for generations in getattr(result, "generations", None) or []:
        for generation in generations:
            message = _message(generation)
            if (usage := _usage_from(getattr(message, "usage_metadata", None))) is not None:
                return usage
            if (usage := _usage_from(getattr(generation, "generation_info", None))) is not None:
                return usage
    return None


def _response_model(result: Any) -> str | None:
    llm_output = getattr(result, "llm_output", None)
    if isinstance(llm_output, Mapping):
        for key in ("model_name", "model"):
            if isinstance(llm_output.get(key), str) and llm_output[key]:
                return str(llm_output[key])
    for generations in getattr(result, "generations", None) or []:
        for generation in generations:
            meta = getattr(_message(generation), "response_metadata", None)
            if isinstance(meta, Mapping):
                for key in ("model_name", "model"):
                    if isinstance(meta.get(key), str) and meta[key]:
                        return str(meta[key])
    return None


def _finish_reason(generation: Any) -> str | None:
    for source in (getattr(generation, "generation_info", None),
                   getattr(_message(generation), "response_metadata", None)):
        if isinstance(source, Mapping) and isinstance(source.get("finish_reason"), str):
            return str(source["finish_reason"])
    return None


def _choices(run: RunInfo, generations: Sequence[Any]) -> list[dict[str, Any]]:
    streamed = "".join(run.tokens) if run.tokens else ""
    choices = []
    for index, generation in enumerate(generations):
        text = getattr(generation, "text", "") or ""
        choice: dict[str, Any] = {"index": index}
        if (reason := _finish_reason(generation)) is not None:
            choice["finish_reason"] = reason
        if run.chat:
            message = _message(generation)
            out = openai_message(message) if message is not None else {"content": text}
            out["role"] = "assistant"
            if index == 0 and streamed and not text and not out.get("content"):
                out["content"] = streamed  # the tokens arrived but the final result lost them
            choice["message"] = out
        else:
            choice["text"] = streamed if index == 0 and streamed and not text else text
        choices.append(choice)
    if not choices and streamed:  # no final result at all: what was streamed is the answer
        if run.chat:
            choices.append({"index": 0, "message": {"role": "assistant", "content": streamed}})
        else:
            choices.append({"index": 0, "text": streamed})
    return choices


def _outcome(error: BaseException) -> tuple[Outcome, int | None]:
    name = type(error).__name__
    if isinstance(error, GeneratorExit | KeyboardInterrupt) or name == "CancelledError":
        return Outcome.PARTIAL, None  # the caller stopped reading: like a client that left the proxy
    status = getattr(error, "status_code", None)
    if not isinstance(status, int):
        status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 600:
        return Outcome.UPSTREAM_ERROR, status
    if isinstance(error, TimeoutError) or "Timeout" in name:
        return Outcome.TIMEOUT, None
    return Outcome.UPSTREAM_ERROR, None


def to_record(
    run: RunInfo,
    *,
    run_id: uuid.UUID,
    index: int,
    end_time: float,
    result: Any = None,
    error: BaseException | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> LogRecord:
    """Prompt `index` of a finished (or failed) run as a plproxy record."""
    params = clean_parameters(run.invocation_params)
    model = model_name(run.invocation_params, run.run_metadata)
    request: dict[str, Any] = {**params, "model": model}
    prompt = run.inputs[index] if index < len(run.inputs) else ([] if run.chat else "")
    if run.chat:
        request["messages"] = [openai_message(m) for m in prompt]
    else:
        request["prompt"] = prompt if isinstance(prompt, str) else str(prompt)

    all_generations = getattr(result, "generations", None) or []
    generations = all_generations[index] if index < len(all_generations) else []
    choices = _choices(run, generations)
    response: dict[str, Any] | None = None
    if choices or error is None:
        response = {"object": "chat.completion" if run.chat else "text_completion", "choices": choices}
        if (answered := _response_model(result)) is not None:
            response["model"] = answered
        if (usage := usage_of(result)) is not None and (index == 0 or len(run.inputs) == 1):
            response["usage"] = usage

    notes: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        notes[str(key)] = value if isinstance(value, str) else orjson.dumps(plain_json(value)).decode()
    for key, value in run.run_metadata.items():  # the call's own metadata (config={"metadata": …})
        if not key.startswith(("ls_", "lc_")):
            notes[str(key)] = value if isinstance(value, str) else orjson.dumps(plain_json(value)).decode()
    # the community handler's keys, so dashboards and filters keep working after the switch
    notes["_langchain_run_id"] = str(run_id)
    notes["_langchain_parent_run_id"] = str(run.parent_run_id)
    notes["_langchain_tags"] = orjson.dumps(list(run.tags)).decode()
    llm_type = run.invocation_params.get("_type")
    if isinstance(llm_type, str):
        notes["_langchain_llm_type"] = llm_type

    outcome, status_code, message = Outcome.SUCCESS, None, None
    if error is not None:
        outcome, status_code = _outcome(error)
        detail = str(error)
        message = redact_text(f"{type(error).__name__}: {detail}" if detail else type(error).__name__)
    return LogRecord(
        log_id=log_id_for(run_id, index),
        api=Api.CHAT if run.chat else Api.COMPLETION,
        provider=provider_for(run.class_name, run.run_metadata),
        request=request,
        response=response,
        start_time=run.start_time,
        end_time=max(end_time, run.start_time),
        outcome=outcome,
        status_code=status_code,
        error_message=message,
        stream=bool(run.tokens),
        function_name=f"langchain.{run.class_name}",
        annotations=Annotations(tags=tuple(tags), metadata=notes),
    )


def build_payload(record: LogRecord) -> dict[str, Any]:
    """The `/log-request` body: `plproxy.mapping`'s, with `api_type` only for OpenAI-family providers."""
    body = to_log_request(record)
    if record.provider not in _OPENAI_FAMILY:
        body.pop("api_type", None)
    return body
