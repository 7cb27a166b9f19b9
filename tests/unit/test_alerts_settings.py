"""`tokenmeter serve --alert-webhook URL --alert-webhook-secret-file PATH --alert-queue N`."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.alerts.config import alert_sink, webhook_config
from extproc.alerts.http import Endpoint
from extproc.cli import _serve, build_parser
from extproc.service.telemetry import Telemetry
from extproc.settings import Settings
from tests.unit.policy_files import small_policy


def test_the_flags_parse_with_their_defaults() -> None:
    args = build_parser().parse_args(["serve", "--policy", "p.yaml"])
    assert (args.alert_webhook, args.alert_webhook_secret_file, args.alert_queue) == (None, None, 1000)
    args = build_parser().parse_args(["serve", "--policy", "p.yaml", "--alert-webhook", "https://h/x",
                                      "--alert-webhook-secret-file", "s", "--alert-queue", "7"])
    assert (args.alert_webhook, args.alert_webhook_secret_file, args.alert_queue) == ("https://h/x", "s", 7)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--policy", "p.yaml", "--alert-queue", "0"])


def test_without_a_webhook_the_sink_only_logs_and_counts() -> None:
    assert webhook_config(Settings("p.yaml")) is None
    assert alert_sink(Settings("p.yaml"), Telemetry()).webhook is None


def test_the_webhook_takes_the_url_secret_and_queue_size(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"  0123456789abcdefXYZ\n")
    settings = Settings("p.yaml", alert_webhook="https://alerts.example.com:8443/in?t=1",
                        alert_webhook_secret_file=str(secret), alert_queue=5)
    config = webhook_config(settings)
    assert config is not None
    assert (config.secret, config.queue_size) == (b"0123456789abcdefXYZ", 5)
    assert "0123456789abcdef" not in repr(config)
    sink = alert_sink(settings, Telemetry())
    assert sink.webhook is not None and sink.webhook.config == config


@pytest.mark.parametrize(("settings", "message"), [
    (Settings("p", alert_webhook="ftp://h/x"), "not an http"),
    (Settings("p", alert_webhook="http:///nohost"), "host"),
    (Settings("p", alert_webhook="http://h/x y"), "printable ASCII"),
    (Settings("p", alert_webhook_secret_file="s"), "needs --alert-webhook"),
])
def test_unusable_settings_are_refused(settings: Settings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        webhook_config(settings)


def test_a_short_or_missing_secret_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tooshort\n")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        webhook_config(Settings("p", alert_webhook="http://h/", alert_webhook_secret_file=str(short)))
    with pytest.raises(OSError):
        webhook_config(Settings("p", alert_webhook="http://h/", alert_webhook_secret_file=str(tmp_path / "none")))


def test_serve_refuses_to_start_with_an_unusable_webhook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(small_policy("v1"))
    args = build_parser().parse_args(["serve", "--policy", str(policy), "--alert-webhook", "ftp://h/x"])
    assert _serve(args) == 2
    assert "alert webhook" in capsys.readouterr().err


@pytest.mark.parametrize(("url", "https", "host", "port", "target", "host_header", "shown"), [
    ("http://h.example/x", False, "h.example", 80, "/x", "h.example", "http://h.example"),
    ("https://h.example", True, "h.example", 443, "/", "h.example", "https://h.example"),
    ("https://h.example:8443/a/b?tok=secret", True, "h.example", 8443, "/a/b?tok=secret", "h.example:8443",
     "https://h.example:8443"),
    ("http://[::1]:9000/x", False, "::1", 9000, "/x", "[::1]:9000", "http://[::1]:9000"),
])
def test_endpoint_parsing(url: str, https: bool, host: str, port: int, target: str, host_header: str,
                          shown: str) -> None:
    e = Endpoint.parse(url)
    assert (e.https, e.host, e.port, e.target, e.host_header) == (https, host, port, target, host_header)
    assert str(e) == shown  # what logs show: never the path or query, which may hold a token


def test_credentials_in_the_url_become_basic_authorization() -> None:
    e = Endpoint.parse("https://user:p%40ss@h.example/x")
    assert e.authorization == "Basic dXNlcjpwQHNz"  # base64("user:p@ss")
    assert b"Authorization: Basic dXNlcjpwQHNz\r\n" in e.request(b"{}", {})
    assert "p%40ss" not in str(e) and "user" not in str(e)
