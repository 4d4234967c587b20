"""Typed keys for the state an application shares between its handlers (never module globals)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from plproxy.exporter import Exporter
from plproxy.forwarder import Forwarder
from plproxy.metrics import Metrics
from plproxy.settings import Settings
from plproxy.store import Store


@dataclass(slots=True)
class ServerState:
    """What the process knows about itself: draining after SIGTERM, calls in flight."""

    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def call_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def call_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ServerState)
SESSION = web.AppKey("session", aiohttp.ClientSession)
STORE = web.AppKey("store", Store)
EXPORTER = web.AppKey("exporter", Exporter)
FORWARDER = web.AppKey("forwarder", Forwarder)
