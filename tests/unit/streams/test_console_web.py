"""The console's HTTP layer (aiohttp test server, a recording feed; no broker)."""

from __future__ import annotations

import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer

from autoglm.streams.console.guard import COOKIE_NAME, CSRF_HEADER
from autoglm.streams.console.web import Console, PathOnlyAccessLogger
from autoglm.streams.events import ControlEvent

TOKEN = "unit-test-console-token-0123456789"


class RecordingFeed:
    """Stands in for ConsoleFeed: records what would be published."""

    def __init__(self, on_status, on_dead_letter):
        self.on_status, self.on_dead_letter = on_status, on_dead_letter
        self.sent: list[tuple[str, dict, dict]] = []

    async def start(self):
        pass

    async def stop(self):
        pass

    async def send(self, command, target, params):
        self.sent.append((command, dict(target), dict(params)))
        return ControlEvent(id=f"ev{len(self.sent)}", command=command, target=dict(target), params=dict(params),
                            issued_ms=1)


@pytest.fixture
async def client():
    console = Console(RecordingFeed, token=TOKEN, tick_s=3600)
    async with TestClient(TestServer(console.app())) as c:
        c.console = console
        yield c


def browser_headers(c) -> dict:
    return {"Origin": str(c.make_url("")).rstrip("/"), CSRF_HEADER: "1", "Cookie": f"{COOKIE_NAME}={TOKEN}"}


async def test_login_sets_a_strict_httponly_cookie_and_redirects(client):
    r = await client.get(f"/login?token={TOKEN}", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    assert f"{COOKIE_NAME}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    bad = await client.get("/login?token=wrong", allow_redirects=False)
    assert bad.status == 401 and TOKEN not in await bad.text()


async def test_the_page_without_a_token_redirects_to_login_and_never_holds_the_token(client):
    r = await client.get("/", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/login"
    page = await client.get("/", headers={"Cookie": f"{COOKIE_NAME}={TOKEN}"})
    assert page.status == 200 and TOKEN not in await page.text()
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]


async def test_a_valid_browser_post_publishes_once(client):
    r = await client.post("/api/control", json={"command": "pause", "model": "digits"},
                          headers=browser_headers(client))
    assert r.status == 200, await r.text()
    assert client.console.feed.sent == [("pause", {"model": "digits"}, {})]
    assert (await r.json())["event_id"] == "ev1"


@pytest.mark.parametrize("drop, status", [("Cookie", 401), (CSRF_HEADER, 403), ("Origin", 403)])
async def test_a_post_missing_a_credential_publishes_nothing(client, drop, status):
    headers = {k: v for k, v in browser_headers(client).items() if k != drop}
    r = await client.post("/api/control", json={"command": "pause"}, headers=headers)
    assert r.status == status
    assert client.console.feed.sent == []


async def test_a_post_from_another_origin_publishes_nothing(client):
    headers = dict(browser_headers(client), Origin="http://evil.example")
    r = await client.post("/api/control", json={"command": "drain"}, headers=headers)
    assert r.status == 403 and client.console.feed.sent == []


async def test_a_bad_configure_value_is_a_400_with_ctls_message_and_publishes_nothing(client):
    r = await client.post("/api/control", json={"command": "configure", "params": {"max_batch_size": "0"}},
                          headers=browser_headers(client))
    assert r.status == 400
    assert (await r.json())["error"] == "max_batch_size must be between 1 and 65536, got 0"
    assert client.console.feed.sent == []


async def test_state_reflects_status_events_and_commands(client):
    client.console.feed.on_status({"schema": "autoglm.status/v1", "kind": "heartbeat", "worker": "w0",
                                   "time_ms": 10**13, "interval_s": 5.0, "state": {"ready": True},
                                   "models": {"digits": {"throughput_per_s": 3.0}}})
    r = await client.get("/api/state", headers={"Authorization": f"Bearer {TOKEN}"})
    doc = await r.json()
    assert [w["worker"] for w in doc["workers"]] == ["w0"]
    assert doc["history"][0]["points"][0]["throughput_per_s"] == 3.0


async def test_a_pipeline_pause_publishes_its_target_and_a_bad_one_nothing(client):
    r = await client.post("/api/control", json={"command": "pause", "model": "", "worker": "",
                                                "pipeline": "digits-routing", "step": ""},
                          headers=browser_headers(client))
    assert r.status == 200, await r.text()
    assert (await r.json())["target"] == {"pipeline": "digits-routing"}
    r = await client.post("/api/control", json={"command": "pause", "step": "first"}, headers=browser_headers(client))
    assert r.status == 400 and "within its pipeline" in (await r.json())["error"]
    assert client.console.feed.sent == [("pause", {"pipeline": "digits-routing"}, {})]


async def test_state_groups_pipeline_steps(client):
    client.console.feed.on_status({
        "schema": "autoglm.status/v1", "kind": "heartbeat", "worker": "w0", "time_ms": 10**13, "interval_s": 5.0,
        "state": {"ready": True, "models": {"p/a": {"paused": True, "pipeline": "p", "step": "a", "runs": "digits"}}},
        "models": {"p/a": {"throughput_per_s": 1.0}}})
    doc = await (await client.get("/api/state", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert doc["models"] == {}
    assert doc["pipelines"]["p"]["steps"][0]["runs"] == "digits"
    assert doc["workers"][0]["pipelines"] == {"p": {"steps": {"a": "paused"}, "state": "paused"}}


def test_the_access_log_drops_query_strings(caplog):
    class Req:
        method, path = "GET", "/login"
        query_string = f"token={TOKEN}"

    class Resp:
        status = 302

    logger = logging.getLogger("test.access")
    with caplog.at_level(logging.INFO, logger="test.access"):
        PathOnlyAccessLogger(logger, "").log(Req(), Resp(), 0.001)
    assert "GET /login 302" in caplog.text and TOKEN not in caplog.text
