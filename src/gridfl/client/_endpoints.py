"""Where a node lives: the WebSocket and HTTP addresses behind the user's URL, and the
"no plain text to a remote node unless allowed" rule."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from gridfl._exceptions import ConfigError

__all__ = ["Endpoints", "is_loopback"]

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoints:
    """Where a node lives: the transport picked by the URL scheme and both base URLs.

    ``ws_url`` is the WebSocket endpoint (the node's root path, or the URL's path when the
    node sits under a prefix); ``http_url`` is the base of ``/model-centric/...``.
    Secure URLs are used exactly as given (syft.js turned ``wss://`` into ``wsss://``).
    """

    transport: str  # "ws" or "http": used for authenticate, cycle-request and report
    ws_url: str
    http_url: str
    secure: bool

    @classmethod
    def parse(cls, url: str, *, allow_insecure: bool) -> Endpoints:
        if not isinstance(url, str) or not url:
            raise ConfigError(f"the grid URL must be a non-empty string, got {url!r}")
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("ws", "wss", "http", "https"):
            raise ConfigError(
                f"unsupported URL scheme in {url!r}: use ws://, wss://, http:// or https://"
            )
        if not parts.hostname:
            raise ConfigError(f"the grid URL {url!r} has no host")
        secure = scheme in ("wss", "https")
        if not secure and not allow_insecure and not is_loopback(parts.hostname):
            raise ConfigError(
                f"refusing an unencrypted connection to {parts.hostname!r} ({url}): use "
                f"{'wss' if scheme == 'ws' else 'https'}:// or pass allow_insecure=True "
                "(or verbose=True, as syft.js does)"
            )
        if parts.query or parts.fragment:
            raise ConfigError(f"the grid URL {url!r} must not carry a query or fragment")
        path = parts.path.rstrip("/")
        ws_scheme = "wss" if secure else "ws"
        http_scheme = "https" if secure else "http"
        ws_url = urlunsplit((ws_scheme, parts.netloc, path + "/", "", ""))
        http_url = urlunsplit((http_scheme, parts.netloc, path, "", ""))
        return cls(
            transport="ws" if scheme.startswith("ws") else "http",
            ws_url=ws_url,
            http_url=http_url,
            secure=secure,
        )
