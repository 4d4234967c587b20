"""What the image does, without Docker: build it the Dockerfile's way, run it the Dockerfile's way.

- The build context is the work tree filtered by .dockerignore (the same matcher as test_deploy.py).
- Stage 1's own RUN command builds the wheel (`pip wheel --no-deps`) and its requirements file; stage 2's
  own `pip install` RUN installs it, with the `fast` extra, into a fresh virtual environment made from a
  Python 3.11 that an unprivileged user can run. Only the paths (/wheels) are moved into a temporary
  directory; the commands are read from the Dockerfile, so a change there is tested here.
- `plproxy serve` starts from that environment as uid 10001 (the image's USER, when the tests run as root)
  with the image's ENV and the settings of the plproxy container of sidecar-native.yaml (the data dir moved
  to a temporary directory owned by that uid), HOME=/nonexistent, the ENTRYPOINT and CMD of the Dockerfile,
  no PromptLayer key, and the fake OpenAI upstream on loopback. A second run takes the gateway's ConfigMap.
- Checked: /healthz, /readyz, a proxied chat completion with X-PL-Log-Id whose record is kept in the store
  (written by uid 10001), /metrics, the Dockerfile's HEALTHCHECK command, the classic sidecar's postStart
  hook, the Compose example app, then SIGTERM during a stream: /readyz turns 503 while the stream is
  drained to its end, and the process exits 0.

All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy import (
    CONTAINERS,
    DEPLOY,
    DOCKERFILE,
    K8S,
    PLPROXY_UID,
    SETTING_DEFAULTS,
    docker_context_files,
    dockerfile_stages,
    healthcheck_command,
    instructions,
    strip_run_flags,
)

REPO = Path(__file__).resolve().parent.parent
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
AS_ROOT = os.geteuid() == 0
# Where the Dockerfile keeps the wheel between the stages; moved into the temporary directory here.
WHEELS = "/wheels"

pytestmark = pytest.mark.timeout(240)


@dataclass
class ImageBuild:
    root: Path  # temporary directory, world-traversable so that uid 10001 can run what is inside
    venv: Path
    wheel: Path
    build_log: str

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def runtime_uid() -> int | None:
    """The uid plproxy runs as: the image's, when we are root and can switch; else our own."""
    return PLPROXY_UID if AS_ROOT else None


def as_runtime_user() -> dict[str, Any]:
    uid = runtime_uid()
    return {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}


def base_python() -> str:
    """A Python the runtime user can execute, with venv and ensurepip: 3.11 like the image's if there is
    one, else the first 3.11+ (plproxy's own floor)."""
    candidates = [
        os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        *(shutil.which(f"python3.{minor}") or "" for minor in (11, 12, 13, 14)),
        "/usr/local/bin/python3.11",
        "/usr/bin/python3.11",
        shutil.which("python3") or "",
    ]
    usable: dict[str, tuple[int, int]] = {}
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, venv, ensurepip; print(*sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                cwd="/",
                **as_runtime_user(),
            )
        except OSError as error:  # not executable by that user, for one
            tried.append(f"{candidate}: {error}")
            continue
        if probe.returncode == 0:
            major, minor = map(int, probe.stdout.split())
            if (major, minor) >= (3, 11):
                usable[candidate] = (major, minor)
                continue
        tried.append(
            f"{candidate}: exit {probe.returncode} {probe.stdout.strip()} {probe.stderr.strip()[-200:]}"
        )
    if not usable:
        pytest.fail("no Python 3.11+ with venv and ensurepip runnable by uid 10001:\n" + "\n".join(tried))
    return next((c for c, version in usable.items() if version == (3, 11)), next(iter(usable)))


def build_env(venv_bin: Path) -> dict[str, str]:
    """The environment of the build steps: ours (pip's index and certificates), the new venv's pip first."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    return env


def copy_instruction(args: str, context: Path, workdir: Path) -> None:
    """COPY SRC... DEST from the build context, DEST relative to WORKDIR."""
    *sources, destination = args.split()
    target = workdir / destination
    for source in sources:
        origin = context / source
        into = target / origin.name if destination.endswith("/") or len(sources) > 1 else target
        if origin.is_dir():
            shutil.copytree(origin, into, dirs_exist_ok=True)
        else:
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, into)


def run_step(command: str, cwd: Path, env: dict[str, str], log: list[str]) -> None:
    result = subprocess.run(
        ["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    log.append(f"$ {command}\n{result.stdout}{result.stderr}")
    assert result.returncode == 0, "\n".join(log)[-4000:]


@pytest.fixture(scope="module")
def image() -> Iterator[ImageBuild]:
    root = Path(tempfile.mkdtemp(prefix="plproxy-image-"))
    root.chmod(0o755)
    try:
        yield build_image(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build_image(root: Path) -> ImageBuild:
    log: list[str] = []
    wheels = root / "wheels"
    wheels.mkdir()

    # The build context: the work tree as .dockerignore lets it through.
    context = root / "context"
    for relative in docker_context_files():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, context / relative)

    # The runtime's Python environment (the image has its interpreter's site-packages; we have a venv).
    venv = root / "venv"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    env = build_env(venv / "bin")

    build_stage, runtime_stage = dockerfile_stages(DOCKERFILE)
    workdir = root / "src"
    for instruction in build_stage[1:]:
        if instruction.keyword == "WORKDIR":
            workdir = root / instruction.args.strip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            copy_instruction(instruction.args, context, workdir)
        elif instruction.keyword == "RUN":
            run_step(strip_run_flags(instruction.args).replace(WHEELS, str(wheels)), workdir, env, log)

    # Stage 2: its pip install step (the user and directory set-up needs root and is asserted in test_deploy).
    installs = [strip_run_flags(a) for a in instructions(runtime_stage, "RUN") if "pip install" in a]
    assert len(installs) == 1, installs
    run_step(installs[0].replace(WHEELS, str(wheels)), root, env, log)

    [wheel] = wheels.glob("plproxy-*.whl")
    return ImageBuild(root=root, venv=venv, wheel=wheel, build_log="\n".join(log))


def test_wheel_holds_only_the_two_packages(image: ImageBuild) -> None:
    import zipfile

    names = zipfile.ZipFile(image.wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"plproxy", "plproxy_langchain", f"{image.wheel.name.split('-py3')[0]}.dist-info"}, tops
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    requirements = (image.wheel.parent / "requirements.txt").read_text()
    assert requirements.strip() == f"plproxy[fast] @ file://{image.wheel}"


def test_runtime_has_the_fast_extra_and_nothing_else(image: ImageBuild) -> None:
    probe = subprocess.run(
        [
            str(image.bin / "python"),
            "-c",
            "import importlib.util as u, json, plproxy; "
            "print(json.dumps({m: bool(u.find_spec(m)) for m in "
            "('plproxy', 'plproxy_langchain', 'uvloop', 'aiohttp', 'orjson', 'prometheus_client', "
            "'langchain_core', 'pytest', 'yaml')}))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(probe.stdout)
    assert found == {
        "plproxy": True,
        "plproxy_langchain": True,  # the module ships; its langchain extra is not installed
        "uvloop": True,
        "aiohttp": True,
        "orjson": True,
        "prometheus_client": True,
        "langchain_core": False,
        "pytest": False,
        "yaml": False,
    }
    # Byte code was compiled at install time: a read-only root filesystem cannot cache it later.
    site = next(image.venv.glob("lib/python3.*/site-packages"))
    assert list((site / "plproxy").glob("__pycache__/*.pyc")), "pip did not compile plproxy's byte code"


# ------------------------------------------------------------------------------------------- running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10):
    assert url.startswith("http://127.0.0.1:"), url
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@dataclass
class Upstream:
    process: subprocess.Popen[str]
    base_url: str


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """The fake OpenAI API as a subprocess; streamed events 50 ms apart so that a stream can be in flight."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", "0", "--chunk-delay", "0.05"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+/v1)\n", line)
        assert match, (
            f"fake upstream said {line!r}; stderr: {process.stderr.read() if process.stderr else ''}"
        )
        yield Upstream(process, match.group(1))
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


def image_env(
    image: ImageBuild, data_dir: Path, port: int, upstream: Upstream, manifest: str
) -> dict[str, str]:
    """The container's environment: a bare PATH and HOME, the image's ENV and the literal settings of the
    plproxy container in `manifest` (deploy/kubernetes), with the data dir, port and upstream moved here."""
    [container] = [c for c in CONTAINERS if c.path.name == manifest]
    env = {
        "PATH": f"{image.bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
        **container.env(),  # the Dockerfile's ENV, then the manifest's ConfigMaps and env values
    }
    assert env["PLPROXY_HOST"] == "0.0.0.0"
    assert "PROMPTLAYER_API_KEY" not in env  # a secretKeyRef in the manifest: not set here
    env["PLPROXY_DATA_DIR"] = str(data_dir)  # /var/lib/plproxy in the image
    env["PLPROXY_PORT"] = str(port)
    env["PLPROXY_UPSTREAM"] = upstream.base_url
    return env


def entrypoint_command(env: dict[str, str]) -> list[str]:
    runtime = dockerfile_stages(DOCKERFILE)[-1]
    entrypoint = json.loads(instructions(runtime, "ENTRYPOINT")[0])
    cmd = json.loads(instructions(runtime, "CMD")[0])
    program = shutil.which(entrypoint[0], path=env["PATH"])
    assert program, f"{entrypoint[0]} is not on the image's PATH"
    return [program, *entrypoint[1:], *cmd]


def run_as_runtime_user(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 60):
    program = shutil.which(command[0], path=env["PATH"]) or command[0]
    return subprocess.run(
        [program, *command[1:]],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **as_runtime_user(),
    )


def stream_in_thread(url: str, result: dict[str, Any], first_bytes: threading.Event) -> threading.Thread:
    def read() -> None:
        body = {
            "model": "fake-many-chunks-40",
            "stream": True,
            "messages": [{"role": "user", "content": "count"}],
        }
        request = urllib.request.Request(  # noqa: S310
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-fake"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                result["status"] = response.status
                chunks = [response.readline()]
                first_bytes.set()
                chunks += list(response)
                result["body"] = b"".join(chunks)
        except Exception as error:  # reported by the test
            result["error"] = repr(error)
        finally:
            first_bytes.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@dataclass
class Serving:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    data_dir: Path
    base: str  # http://127.0.0.1:PORT
    stdout: Path
    stderr: Path
    token: str | None  # a proxy token, when the manifest asks callers for one

    def logs(self) -> str:
        return f"\nstdout:\n{self.stdout.read_text()[-3000:]}\nstderr:\n{self.stderr.read_text()[-3000:]}"

    def wait_healthy(self, seconds: float = 30) -> None:
        """/healthz within the startupProbe's 30 s."""
        deadline = time.monotonic() + seconds
        while True:
            assert self.process.poll() is None, f"plproxy exited with {self.process.returncode}{self.logs()}"
            with contextlib.suppress(OSError):
                if http("GET", f"{self.base}/healthz", timeout=1)[0] == 200:
                    return
            assert time.monotonic() < deadline, f"/healthz did not answer in {seconds:g} s{self.logs()}"
            time.sleep(0.1)

    def chat(self, text: str) -> str:
        """One proxied call; returns its X-PL-Log-Id."""
        status, headers, body = http(
            "POST",
            f"{self.base}/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]},
            {
                "Content-Type": "application/json",
                "Authorization": "Bearer sk-fake",
                "X-PL-Tags": "image-test",
                **self.auth_headers(),
            },
        )
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == f"echo: {text}"
        log_id = headers.get("X-PL-Log-Id", "")
        assert UUID.match(log_id), headers
        return log_id

    def auth_headers(self) -> dict[str, str]:
        return {"Proxy-Authorization": f"Bearer {self.token}"} if self.token else {}

    def wait_kept(self, log_id: str, seconds: float = 15) -> None:
        """No key: the record ends `kept` in the store."""
        deadline = time.monotonic() + seconds
        while True:
            status, _, body = http("GET", f"{self.base}/plproxy/logs/{log_id}", headers=self.auth_headers())
            if status == 200 and json.loads(body).get("state") == "kept":
                return
            assert time.monotonic() < deadline, f"record {log_id}: {status} {body!r}{self.logs()}"
            time.sleep(0.2)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        drain = float(self.env["PLPROXY_DRAIN_TIMEOUT"])
        flush = float(self.env["PLPROXY_FLUSH_TIMEOUT"])
        return self.process.wait(timeout=drain + flush + 5)


@contextlib.contextmanager
def serving(image: ImageBuild, upstream: Upstream, manifest: str, name: str) -> Iterator[Serving]:
    """`plproxy serve` started as the image starts it, configured as `manifest` configures it."""
    data_dir = image.root / f"data-{name}"  # the image's VOLUME, owned by its user
    data_dir.mkdir(mode=0o750)
    if AS_ROOT:
        os.chown(data_dir, PLPROXY_UID, PLPROXY_UID)
    port = free_port()
    env = image_env(image, data_dir, port, upstream, manifest)
    env.setdefault("PLPROXY_DRAIN_TIMEOUT", SETTING_DEFAULTS["PLPROXY_DRAIN_TIMEOUT"])
    env.setdefault("PLPROXY_FLUSH_TIMEOUT", SETTING_DEFAULTS["PLPROXY_FLUSH_TIMEOUT"])
    token = None
    if "PLPROXY_AUTH_TOKENS_FILE" in env:
        # The mounted Secret: one token a line, readable by the pod's fsGroup only (defaultMode 0440).
        token = secrets.token_hex(16)
        tokens = image.root / f"{name}-tokens"
        tokens.write_text(f"# generated by the test\n{token}\n")
        tokens.chmod(0o440)
        if AS_ROOT:
            os.chown(tokens, 0, PLPROXY_UID)
        env["PLPROXY_AUTH_TOKENS_FILE"] = str(tokens)
    stdout, stderr = image.root / f"{name}.out", image.root / f"{name}.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            entrypoint_command(env),
            env=env,
            cwd=data_dir,  # the image's WORKDIR is its data dir
            stdout=out,
            stderr=err,
            start_new_session=True,
            **as_runtime_user(),
        )
    try:
        yield Serving(process, env, data_dir, f"http://127.0.0.1:{port}", stdout, stderr, token)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_serve_like_the_image(image: ImageBuild, upstream: Upstream) -> None:
    """The native sidecar's configuration, run the image's way."""
    with serving(image, upstream, "sidecar-native.yaml", "sidecar") as proxy:
        env, data_dir, base = proxy.env, proxy.data_dir, proxy.base
        # The classic sidecar's postStart hook, started as soon as plproxy: it waits for it, then succeeds.
        [classic] = [d for d in yaml.safe_load_all((K8S / "sidecar-classic.yaml").read_text()) if d]
        hook = classic["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"][
            "command"
        ]
        hook_run = run_as_runtime_user(hook, env, data_dir, timeout=40)
        assert hook_run.returncode == 0, f"postStart hook failed: {hook_run.stderr}{proxy.logs()}"
        proxy.wait_healthy()
        assert http("GET", f"{base}/readyz")[0] == 200, proxy.logs()

        # The Dockerfile's HEALTHCHECK command, as the container runtime would run it.
        check = run_as_runtime_user(healthcheck_command(), env, data_dir)
        assert check.returncode == 0, check.stderr

        # One proxied call, recorded in the store, which uid 10001 wrote.
        proxy.wait_kept(proxy.chat("hello image"))
        db_files = [p for p in data_dir.iterdir() if p.is_file()]
        assert db_files, "nothing written in the data dir"
        if AS_ROOT:
            assert {p.stat().st_uid for p in db_files} == {PLPROXY_UID}
        assert not data_dir.stat().st_mode & stat.S_IWOTH

        status, _, body = http("GET", f"{base}/metrics")
        assert status == 200
        assert b'plproxy_requests_total{method="POST"' in body or b"plproxy_requests_total{" in body

        # The Compose example app, once, against this plproxy.
        app_env = {**env, "OPENAI_BASE_URL": f"{base}/v1", "OPENAI_API_KEY": "sk-fake", "EXAMPLE_CALLS": "1"}
        app = run_as_runtime_user(
            ["python", str(DEPLOY / "compose" / "app" / "example_app.py")], app_env, data_dir
        )
        assert app.returncode == 0, app.stdout + app.stderr
        match = re.fullmatch(r"status=200 x-pl-log-id=(\S+)\n", app.stdout)
        assert match, app.stdout
        assert UUID.match(match.group(1))

        # SIGTERM with a stream in flight: /readyz turns 503, the stream runs to its end, exit 0.
        result: dict[str, Any] = {}
        first_bytes = threading.Event()
        reader = stream_in_thread(f"{base}/v1/chat/completions", result, first_bytes)
        assert first_bytes.wait(10), result
        proxy.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while http("GET", f"{base}/readyz", timeout=2)[0] != 503:
            assert time.monotonic() < deadline, "/readyz still 200 after SIGTERM"
            time.sleep(0.05)
        reader.join(timeout=30)
        assert "error" not in result, result
        assert result["status"] == 200
        assert result["body"].rstrip().endswith(b"data: [DONE]"), result["body"][-200:]
        assert proxy.stop() == 0, proxy.logs()

        # Stopped: the HEALTHCHECK now fails.
        check = run_as_runtime_user(healthcheck_command(), env, data_dir)
        assert check.returncode != 0


def test_gateway_configuration_serves(image: ImageBuild, upstream: Upstream) -> None:
    """The gateway's ConfigMap (several workers) run the image's way: calls, records, metrics, clean stop."""
    with serving(image, upstream, "gateway.yaml", "gateway") as proxy:
        assert int(proxy.env["PLPROXY_WORKERS"]) >= 2
        assert proxy.token, "the gateway asks callers for a proxy token"
        proxy.wait_healthy()
        # Probes and Prometheus need no token ...
        assert http("GET", f"{proxy.base}/readyz")[0] == 200, proxy.logs()
        assert http("GET", f"{proxy.base}/metrics")[0] == 200
        # ... callers do.
        status, headers, _ = http(
            "POST",
            f"{proxy.base}/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "no token"}]},
            {"Content-Type": "application/json", "Authorization": "Bearer sk-fake"},
        )
        assert status == 401
        assert "Proxy-Authenticate" in headers
        log_ids = [proxy.chat(f"gateway call {n}") for n in range(8)]
        for log_id in log_ids:
            proxy.wait_kept(log_id)
        status, _, body = http("GET", f"{proxy.base}/metrics")
        assert status == 200
        assert b"plproxy_requests_total{" in body
        assert proxy.stop() == 0, proxy.logs()
