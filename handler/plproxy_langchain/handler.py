"""The LangChain callback handler: a drop-in for the community `PromptLayerCallbackHandler`.

Its callbacks run on the caller's thread or event loop, so they only keep what a run started with and,
when it ends, hand the run to the background (`plproxy_langchain.runtime`); conversion, storage and
every network call happen there. Each run's state is dropped when it ends or fails.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson
from langchain_core.callbacks import BaseCallbackHandler

from plproxy.settings import default_data_dir
from plproxy_langchain.convert import RunInfo, build_payload, log_id_for, plain_json, to_record
from plproxy_langchain.runtime import REGISTRY, Runtime, Sink, warn_once
from plproxy_langchain.sidecar_sink import SidecarSink
from plproxy_langchain.sinks import Outgoing, SidecarSpec, StoreSpec, workspace_dir
from plproxy_langchain.store_sink import StoreSink

__all__ = ["PromptLayerCallbackHandler"]

DEFAULT_BASE_URL = "https://api.promptlayer.com"
MAX_OPEN_RUNS = 10_000  # runs started and never ended (a host that drops them) are forgotten beyond this


def _http_url(value: str, what: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL with a host, not {value!r}")
    return value.strip().rstrip("/")


def _sidecar(url: str) -> SidecarSpec:
    """`http://[token@]host:port[/v1]`: a token in the user-info part is sent as X-PL-Proxy-Auth."""
    parts = urlsplit(_http_url(url, "proxy_url"))
    token = unquote(parts.password or parts.username or "") or None
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    path = parts.path.rstrip("/").removesuffix("/v1")  # OPENAI_BASE_URL's value works too
    return SidecarSpec(urlunsplit((parts.scheme, netloc, path, "", "")), token)


def resolve_destination(
    api_key: str | None, base_url: str | None, proxy_url: str | None, env: Mapping[str, str]
) -> StoreSpec | SidecarSpec:
    """Where this handler's records go. Explicit arguments win over the environment; a bad explicit
    value raises ValueError, a bad environment value is reported once and ignored."""
    if proxy_url is not None:
        return _sidecar(proxy_url)
    if env.get("PLPROXY_URL", "").strip():
        try:
            return _sidecar(env["PLPROXY_URL"])
        except ValueError as exc:
            warn_once("bad_plproxy_url", "PLPROXY_URL is not a usable URL; it is ignored", error=str(exc))

    env_key = env.get("PROMPTLAYER_API_KEY", "").strip() or None
    env_base = DEFAULT_BASE_URL
    if env.get("PROMPTLAYER_BASE_URL", "").strip():
        try:
            env_base = _http_url(env["PROMPTLAYER_BASE_URL"], "PROMPTLAYER_BASE_URL")
        except ValueError as exc:
            warn_once("bad_base_url", "PROMPTLAYER_BASE_URL is not a usable URL; the default is used",
                      error=str(exc))
    key = (api_key.strip() or None) if api_key is not None else env_key
    base = _http_url(base_url, "base_url") if base_url is not None else env_base
    data_dir = env.get("PLPROXY_DATA_DIR", "").strip() or default_data_dir(env)
    data_dir = os.path.expanduser(data_dir)
    if (key, base) != (env_key, env_base):
        data_dir = workspace_dir(data_dir, key, base)
    return StoreSpec(data_dir, key, base)


def _open_sink(runtime: Runtime, spec: StoreSpec | SidecarSpec) -> Sink:
    """The registry's factory: a sink for a destination, opened later on the background loop."""
    return SidecarSink(runtime, spec) if isinstance(spec, SidecarSpec) else StoreSink(runtime, spec)


def _class_name(serialized: Any, kwargs: Mapping[str, Any]) -> str:
    ident = serialized.get("id") if isinstance(serialized, Mapping) else None
    if isinstance(ident, list | tuple) and ident and isinstance(ident[-1], str):
        return ident[-1]
    name = serialized.get("name") if isinstance(serialized, Mapping) else None
    if isinstance(name, str) and name:
        return name
    name = kwargs.get("name")
    return name if isinstance(name, str) and name else "unknown"


def _payload(run: RunInfo, run_id: uuid.UUID, index: int, end_time: float, result: Any,
             error: BaseException | None, tags: Sequence[str], metadata: Mapping[str, Any]) -> dict[str, Any]:
    record = to_record(run, run_id=run_id, index=index, end_time=end_time, result=result, error=error,
                       tags=tags, metadata=metadata)
    return build_payload(record)


class _OneShot:
    """Builds the body once, then lets go of the run and its result: whoever still holds the callable
    afterwards (a store's writer keeps its last batch until the next one) holds a few bytes, not a run."""

    __slots__ = ("_build",)

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self._build: Callable[[], dict[str, Any]] | None = build

    def __call__(self) -> dict[str, Any]:
        build, self._build = self._build, None
        if build is None:
            raise RuntimeError("this record's body was already built")
        return build()


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PromptLayerCallbackHandler(BaseCallbackHandler):
    """Records every LLM and chat-model call of LangChain in PromptLayer through plproxy's pipeline.

    `pl_tags`: tags of every record. `pl_id_callback(request_id)`: called once per record, from a
    background thread, when PromptLayer has accepted it. `api_key` / `base_url` (else
    `PROMPTLAYER_API_KEY` / `PROMPTLAYER_BASE_URL`): the PromptLayer workspace, for the in-process store
    and exporter (in `PLPROXY_DATA_DIR`). `proxy_url` (else `PLPROXY_URL`): send records to a running
    plproxy instead. `metadata`: string pairs added to every record.

    The handler never raises into the host's call and never does network I/O on the caller's thread.
    """

    raise_error = False  # LangChain's switch: a failing handler never fails the call
    run_inline = True  # its callbacks cost microseconds: no executor hop under ainvoke/astream

    def __init__(
        self,
        pl_tags: Sequence[str] | None = None,
        pl_id_callback: Callable[[int], object] | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        proxy_url: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # The community handler's positional order is (pl_id_callback, pl_tags): accept it too.
        if callable(pl_tags) and not callable(pl_id_callback):
            pl_tags, pl_id_callback = pl_id_callback, pl_tags
        if pl_tags is not None and (isinstance(pl_tags, str) or not all(isinstance(t, str) for t in pl_tags)):
            raise TypeError("pl_tags must be a list of strings")
        if pl_id_callback is not None and not callable(pl_id_callback):
            raise TypeError("pl_id_callback must be a callable that takes the PromptLayer request id")
        self.pl_tags: list[str] = list(pl_tags or [])
        self.pl_id_callback = pl_id_callback
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._destination = resolve_destination(api_key, base_url, proxy_url, os.environ)
        self._runs: dict[uuid.UUID, RunInfo] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> PromptLayerCallbackHandler:
        return self  # one handler, one destination: a copied config keeps recording through it

    def __repr__(self) -> str:
        return f"PromptLayerCallbackHandler(pl_tags={self.pl_tags!r}, destination={self._destination!r})"

    # LangChain asks these before every event: only model events concern this handler.
    @property
    def ignore_chain(self) -> bool:
        return True

    @property
    def ignore_agent(self) -> bool:
        return True

    @property
    def ignore_retriever(self) -> bool:
        return True

    @property
    def ignore_custom_event(self) -> bool:
        return True

    @property
    def ignore_retry(self) -> bool:
        return True

    # ---- LangChain's callbacks (caller's thread: cheap, never raise) ---------------------------------

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *,
                            run_id: uuid.UUID, parent_run_id: uuid.UUID | None = None,
                            tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                            **kwargs: Any) -> None:
        try:
            self._start(True, serialized, [list(m) for m in messages], run_id, parent_run_id, tags,
                        metadata, kwargs)
        except Exception:
            self._own_failure("on_chat_model_start")

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: uuid.UUID,
                     parent_run_id: uuid.UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            self._start(False, serialized, list(prompts), run_id, parent_run_id, tags, metadata, kwargs)
        except Exception:
            self._own_failure("on_llm_start")

    def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: uuid.UUID, **kwargs: Any) -> None:
        try:
            run = self._runs.get(run_id)
            if run is None:
                return
            text = token if isinstance(token, str) else getattr(chunk, "text", None)
            if isinstance(text, str) and text:
                if run.tokens is None:
                    run.tokens = []
                run.tokens.append(text)
        except Exception:
            self._own_failure("on_llm_new_token")

    def on_llm_end(self, response: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        try:
            run = self._runs.pop(run_id, None)
            if run is not None:
                self._finish(run, run_id, response, None)
        except Exception:
            self._own_failure("on_llm_end")

    def on_llm_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        try:
            run = self._runs.pop(run_id, None)
            if run is not None:
                self._finish(run, run_id, kwargs.get("response"), error)
        except Exception:
            self._own_failure("on_llm_error")

    def _start(self, chat: bool, serialized: Any, inputs: list[Any], run_id: uuid.UUID,
               parent_run_id: uuid.UUID | None, tags: list[str] | None, metadata: dict[str, Any] | None,
               kwargs: Mapping[str, Any]) -> None:
        if len(self._runs) >= MAX_OPEN_RUNS:
            with self._lock:
                while len(self._runs) >= MAX_OPEN_RUNS:
                    self._runs.pop(next(iter(self._runs)))
            warn_once("too_many_open_runs", "more than 10,000 LangChain runs started and never ended; the "
                      "oldest are forgotten (not recorded)")
        params = kwargs.get("invocation_params")
        self._runs[run_id] = RunInfo(
            chat=chat,
            start_time=time.time(),
            class_name=_class_name(serialized, kwargs),
            inputs=inputs,
            invocation_params=dict(params) if isinstance(params, Mapping) else {},
            run_metadata=dict(metadata) if metadata else {},
            tags=list(tags) if tags else [],
            parent_run_id=parent_run_id,
        )

    def _finish(self, run: RunInfo, run_id: uuid.UUID, result: Any, error: BaseException | None) -> None:
        end_time = time.time()
        sink = REGISTRY.sink(self._destination, _open_sink)
        if sink is None:  # the interpreter is exiting
            return
        for index in range(max(1, len(run.inputs))):
            build = _OneShot(partial(_payload, run, run_id, index, end_time, result, error,
                                     tuple(self.pl_tags), dict(self.metadata)))
            sink.submit(Outgoing(log_id_for(run_id, index), build, self.pl_id_callback))

    def _own_failure(self, where: str) -> None:
        warn_once(f"handler_{where}_failed", "plproxy_langchain failed in a callback; the call itself is "
                  "unaffected (later failures are logged at debug level)", callback=where,
                  error_type=_current_error_type())

    # ---- flushing --------------------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Ship what this handler's destination holds, and run the pl_id callbacks that follow.

        Blocks the calling thread for at most `timeout` seconds; True when nothing is left to send.
        From async code, use `await handler.aflush()`.
        """
        try:
            return REGISTRY.flush(self._destination, timeout)
        except Exception:
            self._own_failure("flush")
            return False

    async def aflush(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109 - mirrors flush(timeout)
        """`flush` for async code: waits without blocking the event loop."""
        return await asyncio.to_thread(self.flush, timeout)

    # ---- follow-ups: promptlayer.track.* without the SDK --------------------------------------------

    def track_score(self, request_id: int | str | uuid.UUID, score: int, name: str | None = None) -> bool:
        """Score a record 0..100 (`name` for a named score). `request_id`: the PromptLayer request id
        `pl_id_callback` received, or the record's log id (the LangChain run id, or an AIMessage id)."""
        if not _int(score) or not 0 <= score <= 100:
            raise ValueError("score must be a whole number from 0 to 100")
        if name is not None and not isinstance(name, str):
            raise TypeError("name must be a string")
        return self._track(request_id, "score", {"score": score, **({"name": name} if name else {})})

    def track_metadata(self, request_id: int | str | uuid.UUID, metadata: Mapping[str, Any]) -> bool:
        """Add string pairs to a record's metadata (values that are not strings are JSON-encoded)."""
        if not isinstance(metadata, Mapping) or not metadata:
            raise ValueError("metadata must be a non-empty mapping")
        cleaned = plain_json({str(k): v for k, v in metadata.items()})  # minus credential-named keys
        body = {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in cleaned.items()}
        return self._track(request_id, "metadata", {"metadata": body})

    def track_prompt(self, request_id: int | str | uuid.UUID, prompt_name: str,
                     prompt_input_variables: Mapping[str, Any] | None = None,
                     version: int | None = None, label: str | None = None) -> bool:
        """Link a record to a prompt template of the registry, by `version` or by release `label`."""
        if not isinstance(prompt_name, str) or not prompt_name:
            raise ValueError("prompt_name must be a non-empty string")
        if version is not None and label is not None:
            raise ValueError("give version or label, not both")
        if version is not None and (not _int(version) or version < 1):
            raise ValueError("version must be a whole number from 1")
        if label is not None and (not isinstance(label, str) or not label):
            raise ValueError("label must be a non-empty string")
        if prompt_input_variables is not None and not isinstance(prompt_input_variables, Mapping):
            raise TypeError("prompt_input_variables must be a mapping")
        body: dict[str, Any] = {"prompt_name": prompt_name}
        if prompt_input_variables is not None:
            body["prompt_input_variables"] = plain_json(prompt_input_variables)
        if version is not None:
            body["version"] = version
        if label is not None:
            body["label"] = label
        return self._track(request_id, "prompt", body)

    def track_group(self, request_id: int | str | uuid.UUID, group_id: int) -> bool:
        """Put a record in a PromptLayer group."""
        if not _int(group_id) or group_id < 1:
            raise ValueError("group_id must be a whole number from 1")
        return self._track(request_id, "group", {"group_id": group_id})

    def _track(self, ref: int | str | uuid.UUID, kind: str, body: dict[str, Any]) -> bool:
        """Queue a follow-up; False (and one warning) when `ref` names no record this process knows."""
        sink = REGISTRY.sink(self._destination, _open_sink)
        if sink is None:
            return False
        log_id = _log_id(ref, sink.log_id_of_request)
        if log_id is None:
            warn_once("track_unknown_id", "track_* was given an id this process has not recorded; use the "
                      "id pl_id_callback received, or a log id / LangChain run id", kind=kind)
            return False
        sink.followup(log_id, kind, body)
        return True


def _log_id(ref: object, by_pl_id: Callable[[int], str | None]) -> str | None:
    if isinstance(ref, uuid.UUID):
        return str(ref)
    if _int(ref):
        return by_pl_id(ref)  # type: ignore[arg-type]
    if not isinstance(ref, str):
        return None
    text = ref.strip()
    if text.isdigit():
        return by_pl_id(int(text))
    text = text.removeprefix("lc_run--").removeprefix("run-")  # an AIMessage id names its run
    try:
        return str(uuid.UUID(text[:36]))
    except ValueError:
        return None


def _current_error_type() -> str:
    exc = sys.exc_info()[1]
    return type(exc).__name__ if exc is not None else "unknown"
