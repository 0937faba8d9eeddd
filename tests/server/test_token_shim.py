"""Libraries that refresh on their own get a placeholder pair; amoCRM is never asked."""

from __future__ import annotations

import base64
import io
import json
import time

from tests.conftest import Broker, log_events

GRANT = {
    "client_id": "library-client-id",
    "client_secret": "library-client-secret-4f1e",
    "grant_type": "refresh_token",
    "refresh_token": "library-refresh-token-9c2a",
    "redirect_uri": "https://example.com/cb",
}


def _claims(jwt: str) -> dict[str, object]:
    header, payload, signature = jwt.split(".")
    assert signature == ""
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"typ": "JWT", "alg": "none"}
    doc: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return doc


async def test_a_refresh_grant_gets_a_placeholder_pair_and_amocrm_is_never_asked(
    broker: Broker, log_stream: io.StringIO
) -> None:
    """POST /oauth2/access_token: amoCRM's answer shape, a far exp, no call upstream, no echo."""
    response = await broker.client.post("/oauth2/access_token", json=GRANT)
    assert response.status == 200
    doc = await response.json()
    assert doc["token_type"] == "Bearer"
    assert doc["expires_in"] >= 5 * 365 * 86_400
    claims = _claims(doc["access_token"])
    assert isinstance(claims["exp"], int) and claims["exp"] > time.time() + 5 * 365 * 86_400
    assert "api_domain" not in claims  # it would send the library past the broker
    assert isinstance(doc["refresh_token"], str) and doc["refresh_token"]
    assert (broker.sandbox.token_calls, broker.sandbox.api_calls) == (0, 0)
    assert log_events(log_stream, "token_shim_answered")
    for secret in (GRANT["client_secret"], GRANT["refresh_token"]):
        assert secret not in log_stream.getvalue()
        assert secret not in json.dumps(doc)


async def test_the_shim_under_an_account_prefix_checks_the_account(broker: Broker) -> None:
    """/a/NAME/oauth2/access_token answers for a known account, 404 problem for another."""
    known = await broker.client.post("/a/default/oauth2/access_token", data=b"grant_type=x")
    assert known.status == 200
    unknown = await broker.client.post("/a/nope/oauth2/access_token", json=GRANT)
    assert unknown.status == 404
    assert (await unknown.json())["error"] == "unknown_account"


async def test_calls_after_the_shim_still_carry_the_brokers_token(broker: Broker) -> None:
    """A library that took the placeholder sends it; amoCRM sees the broker's token instead."""
    doc = await (await broker.client.post("/oauth2/access_token", json=GRANT)).json()
    placeholder = doc["access_token"]
    response = await broker.client.get(
        "/api/v4/leads", headers={"Authorization": f"Bearer {placeholder}"}
    )
    assert response.status == 200
    sent = broker.sandbox.requests[-1]
    assert dict(sent.headers)["Authorization"] == f"Bearer {broker.manager.pair.access_token}"
    assert sent.authorized
