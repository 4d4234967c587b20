"""plproxy_langchain: a LangChain callback handler that records calls through plproxy's pipeline."""
