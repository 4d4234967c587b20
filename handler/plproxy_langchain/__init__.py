"""plproxy_langchain: a LangChain callback handler that records calls through plproxy's pipeline.

    from plproxy_langchain import PromptLayerCallbackHandler

    handler = PromptLayerCallbackHandler(pl_tags=["langchain"], pl_id_callback=print)
    llm.invoke("Once upon a time, ", config={"callbacks": [handler]})

Importing it starts nothing: the background thread, the store and the exporter start with the first
record. `shutdown()` flushes and stops them (it also runs at interpreter exit).
"""

from __future__ import annotations

from plproxy_langchain.handler import PromptLayerCallbackHandler
from plproxy_langchain.runtime import DEFAULT_EXIT_TIMEOUT, REGISTRY

__all__ = ["PromptLayerCallbackHandler", "shutdown"]


def shutdown(timeout: float = DEFAULT_EXIT_TIMEOUT) -> bool:
    """Flush every handler's records (within `timeout` seconds), then stop the background thread.

    Runs by itself at interpreter exit; call it before `os.fork()`, or to free the store file. A record
    made afterwards starts everything again. True when nothing was left unsent.
    """
    return REGISTRY.shutdown(timeout)
