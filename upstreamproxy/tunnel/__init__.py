"""The tunnel protocol core, shared by the relay and the egress (see :mod:`.core`)."""

from __future__ import annotations

from .actions import (
    LOCAL,
    WS,
    Action,
    CheckPeers,
    CloseLocal,
    CloseWs,
    Finished,
    HandOff,
    Open,
    SendChunk,
    SendConnect,
    SendData,
    SendPing,
    Side,
    WriteLocal,
)
from .core import CoreMisuse, Role, State, Timeouts, TunnelCore

__all__ = [
    "LOCAL",
    "WS",
    "Action",
    "CheckPeers",
    "CloseLocal",
    "CloseWs",
    "CoreMisuse",
    "Finished",
    "HandOff",
    "Open",
    "Role",
    "SendChunk",
    "SendConnect",
    "SendData",
    "SendPing",
    "Side",
    "State",
    "Timeouts",
    "TunnelCore",
    "WriteLocal",
]
