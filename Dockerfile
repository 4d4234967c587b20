# syntax=docker/dockerfile:1
#
# plproxy image: `docker build -t plproxy:0.1.0 .` then
#   docker run --rm -p 127.0.0.1:8788:8788 -e PROMPTLAYER_API_KEY plproxy:0.1.0
# The defaults below (listen on 0.0.0.0:8788, store in /var/lib/plproxy) are described in docs/deploy.md.
# tests/test_image_like_run.py reproduces what this file does without Docker: same build, same ENV, same
# uid, same entrypoint, same HEALTHCHECK command.

# Stage 1: build the wheel. The build context is only pyproject.toml, README.md, proxy/ and handler/
# (.dockerignore is an allow-list).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
COPY handler ./handler
# requirements.txt names the wheel by path with the `fast` extra, so stage 2 installs exactly this build.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && printf 'plproxy[fast] @ file://%s\n' /wheels/plproxy-*.whl > /wheels/requirements.txt

# Stage 2: the runtime. The wheel with the `fast` extra (uvloop) and its dependencies, nothing else:
# no compilers, no build tools, no source tree.
FROM python:3.11-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="plproxy" \
      org.opencontainers.image.description="OpenAI-compatible logging reverse proxy that records every LLM call in PromptLayer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

# A fixed, unprivileged uid/gid so that Kubernetes `runAsUser: 10001` / `fsGroup: 10001` and a
# volume's ownership agree with the image. No home directory: plproxy writes only to its data dir
# (and SQLite to /tmp), so the root filesystem can be mounted read-only.
RUN groupadd --system --gid 10001 plproxy \
 && useradd --system --uid 10001 --gid plproxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin plproxy \
 && mkdir -p /var/lib/plproxy \
 && chown 10001:10001 /var/lib/plproxy \
 && chmod 0750 /var/lib/plproxy

# The wheel is bind-mounted from the build stage, so it never becomes a layer of this image.
# Byte code is compiled at install time, because a read-only root filesystem cannot cache it later.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --requirement /wheels/requirements.txt

ENV PLPROXY_HOST=0.0.0.0 \
    PLPROXY_DATA_DIR=/var/lib/plproxy \
    PYTHONUNBUFFERED=1
VOLUME /var/lib/plproxy
EXPOSE 8788
USER 10001:10001
WORKDIR /var/lib/plproxy

# No curl in slim images: the standard library checks /healthz (urlopen raises on a non-2xx answer).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PLPROXY_PORT', '8788') + '/healthz', timeout=2)"]

# plproxy handles SIGTERM itself: /readyz turns 503, in-flight calls drain (PLPROXY_DRAIN_TIMEOUT),
# pending records are flushed (PLPROXY_FLUSH_TIMEOUT), exit 0. Exec form, so plproxy is PID 1 and
# receives the signal directly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["plproxy"]
CMD ["serve"]
