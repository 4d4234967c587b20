"""The reliability suite's evidence: canary secrets, what its proxies left behind, and its figures.

A plugin, registered in the root conftest. One canary provider key and one canary PromptLayer key are
made per session; the fault, hostile-input and soak tests hand them to every `plproxy serve` they start
(`PROMPTLAYER_API_KEY`) and to every call they make (`Authorization: Bearer …`). Those proxies keep their
log file, data dir and metric scrapes under one session directory (`Evidence.root`), and the tests save
the PromptLayer bodies they saw there too, so that `tests/test_secrets_canary.py` — moved to the end of
the run by this plugin — can look for the canaries in all of it.

Figures (load held, faults survived, bad inputs tried, records lost, secrets found) are added by the tests
through `Evidence.figure(...)`; at the end of the session they are written, with each reliability test's
outcome, to `tests/.reliability-figures.json` (`tests/.reliability-figures-soak-full.json` for a run with
`PLPROXY_SOAK_FULL=1`; or `$PLPROXY_RELIABILITY_FIGURES`), from which `python -m tests.reliability_report`
renders the tables in docs/reliability.md.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FIGURES_PATH = REPO / "tests" / ".reliability-figures.json"
# the full soak (PLPROXY_SOAK_FULL=1) keeps its own file: the report shows it beside the default run
SOAK_FULL_FIGURES_PATH = REPO / "tests" / ".reliability-figures-soak-full.json"
# The modules whose outcomes and figures make up docs/reliability.md.
RELIABILITY_MODULES = (
    "tests/test_faults_promptlayer.py",
    "tests/test_faults_upstream.py",
    "tests/test_faults_process.py",
    "tests/test_hostile_input.py",
    "tests/test_properties.py",
    "tests/test_soak.py",
    "tests/test_secrets_canary.py",
)
SCAN_MODULE = "tests/test_secrets_canary.py"
# A leak of part of a key is still a leak: any run of this many characters of a canary's random part counts.
FRAGMENT = 12


@dataclass(frozen=True)
class Canary:
    provider_key: str
    promptlayer_key: str

    @property
    def authorization(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.provider_key}"}

    def needles(self) -> list[bytes]:
        """Every byte string whose presence anywhere means a canary leaked: each key whole, in base64, and
        every `FRAGMENT`-character run of its random part (which exists nowhere else)."""
        found: list[bytes] = []
        for key, prefix in ((self.provider_key, "sk-canary-"), (self.promptlayer_key, "pl_canary_")):
            found += [key.encode(), base64.b64encode(key.encode())]
            core = key.removeprefix(prefix)
            found += [core[i : i + FRAGMENT].encode() for i in range(len(core) - FRAGMENT + 1)]
        return found


def make_canary() -> Canary:
    return Canary("sk-canary-" + secrets.token_hex(20), "pl_canary_" + secrets.token_hex(20))


def scan(paths: Iterable[Path], needles: list[bytes]) -> tuple[int, int, list[str]]:
    """(files, bytes, hits) over every file under `paths`; a hit names the file and the needle's offset."""
    pattern = re.compile(b"|".join(re.escape(needle) for needle in needles))
    files = size = 0
    hits: list[str] = []
    for root in paths:
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in candidates:
            data = path.read_bytes()
            files += 1
            size += len(data)
            found = pattern.search(data)
            if found is not None:
                hits.append(f"{path}: canary bytes at offset {found.start()}")
    return files, size, hits


@dataclass
class Evidence:
    """Where the reliability tests leave what the secrets scan reads, and the figures they produced."""

    root: Path
    figures: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    _serial: int = 0

    def new_dir(self, label: str) -> Path:
        self._serial += 1
        path = self.root / f"{self._serial:04d}-{_safe(label)}"
        path.mkdir(parents=True)
        return path

    def keep(self, label: str, blobs: Iterable[bytes]) -> None:
        """Save bytes the scan must read (PromptLayer bodies, answers) under `label`."""
        path = self.root / "kept" / f"{_safe(label)}.bin"
        path.parent.mkdir(exist_ok=True)
        with path.open("ab") as sink:
            for blob in blobs:
                sink.write(blob)
                sink.write(b"\n")

    def figure(self, section: str, name: str, value: Any) -> None:
        """Record one figure: `section` is a table of docs/reliability.md, `name` a row of it."""
        self.figures.setdefault(section, {})[name] = value

    def add(self, section: str, name: str, amount: int | float) -> None:
        """Add to a figure (counts summed over the tests that produce them)."""
        table = self.figures.setdefault(section, {})
        table[name] = table.get(name, 0) + amount


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:80]


_CANARY = make_canary()
_EVIDENCE_KEY = pytest.StashKey[Evidence]()


@pytest.fixture(scope="session")
def canary() -> Canary:
    """The session's canary keys: hand them to every proxy and call of the reliability tests."""
    return _CANARY


@pytest.fixture(scope="session")
def evidence(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Evidence:
    stash = request.config.stash
    if _EVIDENCE_KEY not in stash:
        stash[_EVIDENCE_KEY] = Evidence(tmp_path_factory.mktemp("reliability-evidence"))
    return stash[_EVIDENCE_KEY]


@pytest.fixture
async def run_plproxy(
    request: pytest.FixtureRequest, evidence: Evidence, canary: Canary
) -> AsyncIterator[Any]:
    """`await run_plproxy(upstream, promptlayer, **env)`: a `plproxy serve` process (tests/fault_helpers.py)
    with the canary PromptLayer key, its log and data dir kept as evidence; stopped at the end."""
    from tests.fault_helpers import PlproxyFactory  # it imports this module

    factory = PlproxyFactory(evidence, canary, request.node.name)
    try:
        yield factory
    finally:
        await factory.close()


def _module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[Any]) -> None:
    # the scan reads what every other test left behind: it runs last
    scan_items = [item for item in items if _module_of(item.nodeid) == SCAN_MODULE]
    if scan_items:
        items[:] = [item for item in items if _module_of(item.nodeid) != SCAN_MODULE] + scan_items


_OUTCOMES: dict[str, str] = {}  # nodeid -> passed / failed / error / skipped, for this session


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _module_of(report.nodeid) not in RELIABILITY_MODULES:
        return
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return
    if _OUTCOMES.get(report.nodeid) not in ("failed", "error"):  # the worst phase wins
        _OUTCOMES[report.nodeid] = outcome


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _OUTCOMES:
        return
    evidence = session.config.stash.get(_EVIDENCE_KEY, None)
    soak_full = os.environ.get("PLPROXY_SOAK_FULL") == "1"
    default = SOAK_FULL_FIGURES_PATH if soak_full else FIGURES_PATH
    target = Path(os.environ.get("PLPROXY_RELIABILITY_FIGURES") or default)
    report = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _git_commit(),
        "soak_full": soak_full,
        "modules": sorted({_module_of(nodeid) for nodeid in _OUTCOMES}),
        "outcomes": dict(sorted(_OUTCOMES.items())),
        "figures": evidence.figures if evidence is not None else {},
    }
    target.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
