"""The inspector serves files of the runs it was given and nothing else.

Every path that comes from a request is decoded once, refused when it is absolute, holds a
``..`` part, a backslash or a NUL byte (403), then resolved (symbolic links followed) and refused
unless the result lies inside the resolved run folder (403); a path that does not exist is 404.
Addresses: only loopback unless the user names another host, and then the server warns.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from diffprobe.errors import DiffprobeError


class Refused(Exception):
    """A request the server answers with ``status`` (403 forbidden, 404 not found)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class AddressError(DiffprobeError):
    """A bind address the inspector will not use."""


def inside(root: Path, requested: str, *, decoded: bool = False) -> Path:
    """The file ``requested`` (a URL path relative to ``root``, percent-encoded unless
    ``decoded``) if it is inside ``root`` after resolving links; else :class:`Refused`."""
    text = requested if decoded else unquote(requested, errors="strict")
    if "\x00" in text or "\\" in text:
        raise Refused(403, "bad character in path")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise Refused(403, "absolute path")
    parts = PurePosixPath(text).parts
    if any(part == ".." for part in parts):
        raise Refused(403, "parent reference")
    base = root.resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise Refused(403, "outside the run")
    if not target.exists():
        raise Refused(404, "no such file")
    return target


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) means this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_bind(host: str, allow_remote: bool) -> str | None:
    """None for a loopback ``host``; the warning to print when another host is allowed;
    :class:`AddressError` when it is not."""
    if is_loopback(host):
        return None
    if not allow_remote:
        raise AddressError(
            f"--host {host}: not a loopback address; the inspector serves your runs to anyone "
            "who can reach it. Pass --host explicitly on the command line to allow it"
        )
    return (
        f"warning: the inspector listens on {host}: anyone who can reach this address can read "
        "the runs it serves and write labels into them"
    )
