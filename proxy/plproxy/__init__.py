"""plproxy: an OpenAI-compatible logging reverse proxy that records every call in PromptLayer."""

__version__ = "0.1.0"

__all__ = ["__version__"]
