"""Pure logic of the worker SDK: URLs, reply parsing, timeouts, error classes."""

from __future__ import annotations

import pytest

from gridfl import (
    AuthenticationError,
    ConfigError,
    GridError,
    InvalidRequestError,
    NotFoundError,
)
from gridfl.client._endpoints import Endpoints, is_loopback
from gridfl.client._replies import error_class, parse_timeout, unwrap_reply


class TestEndpoints:
    @pytest.mark.parametrize(
        ("url", "transport", "ws", "http"),
        [
            ("ws://127.0.0.1:5000", "ws", "ws://127.0.0.1:5000/", "http://127.0.0.1:5000"),
            ("wss://grid.example.org", "ws", "wss://grid.example.org/", "https://grid.example.org"),
            ("https://grid.example.org/fl/", "http", "wss://grid.example.org/fl/",
             "https://grid.example.org/fl"),
            ("http://localhost:8000", "http", "ws://localhost:8000/", "http://localhost:8000"),
            ("WS://[::1]:9", "ws", "ws://[::1]:9/", "http://[::1]:9"),
        ],
    )
    def test_scheme_picks_transport_and_urls(self, url, transport, ws, http):
        """The scheme picks the transport; both base URLs derive from the one given."""
        e = Endpoints.parse(url, allow_insecure=False)
        assert (e.transport, e.ws_url, e.http_url) == (transport, ws, http)

    def test_secure_url_is_never_rewritten(self):
        """syft.js turned wss:// into wsss://; gridfl keeps secure URLs as given."""
        e = Endpoints.parse("wss://grid.example.org:443", allow_insecure=False)
        assert e.ws_url == "wss://grid.example.org:443/" and e.secure
        assert "wsss" not in e.ws_url and "httpss" not in e.http_url

    @pytest.mark.parametrize("url", ["ws://grid.example.org", "http://10.0.0.5:5000"])
    def test_plain_text_to_remote_host_needs_permission(self, url):
        """Plain ws/http to a non-loopback host is refused unless explicitly allowed."""
        with pytest.raises(ConfigError, match="allow_insecure=True"):
            Endpoints.parse(url, allow_insecure=False)
        assert Endpoints.parse(url, allow_insecure=True).secure is False

    @pytest.mark.parametrize("url", ["ftp://x", "grid.example.org", "", "ws://", "ws://h/?a=1"])
    def test_bad_urls(self, url):
        """Unsupported schemes, missing hosts and queries are configuration errors."""
        with pytest.raises(ConfigError):
            Endpoints.parse(url, allow_insecure=True)

    def test_loopback(self):
        assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
        assert not is_loopback("10.0.0.1") and not is_loopback("example.org")


class TestParseTimeout:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (100500, 100500),
            (2.1, 3),
            ("42", 42),
            ("7:59:41.123456", 7 * 3600 + 59 * 60 + 42),
            ("1 day, 2:00:00", 26 * 3600),
            ("2 days, 0:00:01", 2 * 86400 + 1),
            ("-1 day, 23:59:50.000001", 0),
            (-5, 0),
            (None, None),
            ("", None),
            ("soon", None),
            (True, None),
            (float("nan"), None),
        ],
    )
    def test_values(self, value, expected):
        """Integer seconds (gridfl) and str(timedelta) (PyGrid) both read as whole seconds."""
        assert parse_timeout(value) == expected


class TestReplies:
    def test_bare_and_envelope(self):
        """HTTP sends the bare object, WebSocket the {type, data, request_id} envelope."""
        assert unwrap_reply({"status": "success"}, call="x") == {"status": "success"}
        env = {"type": "x", "data": {"status": "success"}, "request_id": "r"}
        assert unwrap_reply(env, call="x") == {"status": "success"}

    @pytest.mark.parametrize(
        "body",
        [{"error": "Model ID not found!"}, {"type": "x", "data": {"error": "Model ID not found!"}}],
    )
    def test_errors_keep_the_node_message(self, body):
        with pytest.raises(GridError, match="Model ID not found!"):
            unwrap_reply(body, call="x")

    def test_ws_error_with_status_code(self):
        with pytest.raises(NotFoundError):
            unwrap_reply({"type": "x", "data": {"error": "gone", "status_code": 404}}, call="x")

    def test_not_an_object(self):
        with pytest.raises(GridError, match="malformed"):
            unwrap_reply([1, 2], call="x")

    def test_error_classes(self):
        """Status codes map to the hierarchy; auth texts are auth errors on any transport."""
        assert error_class(404, "Plan ID not found!") is NotFoundError
        assert error_class(400, "bad") is InvalidRequestError
        assert error_class(400, "The 'auth_token' you sent is invalid.") is AuthenticationError
        assert error_class(None, "Authentication is required, please pass an 'auth_token'.") \
            is AuthenticationError
        assert error_class(None, "whatever") is GridError


class TestClientOptions:
    def test_verbose_allows_insecure_and_logs_debug(self):
        import logging

        from gridfl.client import Syft

        Syft("ws://grid.example.org", verbose=True)
        assert logging.getLogger("gridfl.client").isEnabledFor(logging.DEBUG)
        with pytest.raises(ConfigError):
            Syft("ws://grid.example.org", verbose=True, allow_insecure=False)
        Syft("http://grid.example.org", allow_insecure=True)

    @pytest.mark.parametrize("kw", [{"timeout": 0}, {"retries": -1}, {"retries": 1.5}])
    def test_bad_options(self, kw):
        from gridfl.client import AsyncSyft

        with pytest.raises(ConfigError):
            AsyncSyft("ws://127.0.0.1:1", **kw)
