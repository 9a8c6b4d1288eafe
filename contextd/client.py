"""Talking to the contextd daemon over its control socket."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

from contextd.paths import socket_path
from cowfs.errors import CowfsError


class ContextdError(CowfsError):
    """The daemon refused a request, or cannot be reached."""


def request(verb: str, socket_timeout: float = 300.0, **fields: Any) -> dict[str, Any]:
    """Send one request; the answer's fields (a ContextdError if it failed)."""
    path = socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(socket_timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise ContextdError(
            f"contextd is not running (no daemon on {path}; start it: contextd serve)"
        ) from None
    except PermissionError:
        raise ContextdError(f"{path}: permission denied (contextd serves root only)") from None
    try:
        # A daemon refusing a non-root peer answers at once; the answer is still queued.
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(json.dumps({"verb": verb, **fields}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if not data:
        raise ContextdError("contextd closed the connection without an answer")
    answer = json.loads(data)
    if not answer.pop("ok", False):
        raise ContextdError(str(answer.get("error", "request failed")))
    return answer
