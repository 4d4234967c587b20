"""The Compose example's application: calls chat completions through plproxy, standard library only.

It reads OPENAI_BASE_URL (http://plproxy:8788/v1 in compose.yaml) like any OpenAI client, tags each call
with X-PL-Tags and prints the answer's status and X-PL-Log-Id, the id of plproxy's record of the call.
Without OPENAI_API_KEY the provider answers 401: plproxy still forwards and records it (as an error).

Environment: OPENAI_BASE_URL, OPENAI_API_KEY, EXAMPLE_MODEL (gpt-4o-mini), EXAMPLE_INTERVAL (seconds
between calls, 30), EXAMPLE_CALLS (how many, 0 = forever).
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request


def call(base_url: str, api_key: str, model: str) -> tuple[int, str | None]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hi in three words."}]})
    # OPENAI_BASE_URL is the operator's configuration: an http(s) URL (checked in main).
    request = urllib.request.Request(  # noqa: S310
        base_url.rstrip("/") + "/chat/completions",
        data=body.encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {api_key}",
            "X-PL-Tags": "compose-example",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            return response.status, response.headers.get("X-PL-Log-Id")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("X-PL-Log-Id")


def main() -> int:
    base_url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8788/v1")
    if not base_url.startswith(("http://", "https://")):
        print(f"OPENAI_BASE_URL must be an http(s) URL, not {base_url!r}", file=sys.stderr)
        return 2
    api_key = os.environ.get("OPENAI_API_KEY") or "missing-key"
    model = os.environ.get("EXAMPLE_MODEL", "gpt-4o-mini")
    interval = float(os.environ.get("EXAMPLE_INTERVAL", "30"))
    calls = int(os.environ.get("EXAMPLE_CALLS", "0"))
    done = 0
    while True:
        try:
            status, log_id = call(base_url, api_key, model)
            print(f"status={status} x-pl-log-id={log_id}", flush=True)
        except OSError as error:
            print(f"plproxy unreachable: {error}", file=sys.stderr, flush=True)
            status = 0
        done += 1
        if calls and done >= calls:
            return 0 if status else 1
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
