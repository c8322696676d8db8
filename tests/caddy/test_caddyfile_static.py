"""Static checks of caddy/: validate, fmt, and what `caddy adapt` makes of the gateway logic."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from policyd.authz.refusals import Reason, Refusal, render
from policyd.shared import contract
from policyd.shared.contract import Surface
from policyd.shared.keys import generate_key
from tests.caddy.caddy_json import (
    TEST_ENV,
    JsonObject,
    access_log_config,
    adapt,
    gateway_handlers,
    gateway_server,
    is_forward_auth,
    is_key_gate,
    is_ollama_proxy,
    metrics_server,
)
from tests.caddy.runner import (
    DEV_CADDYFILE,
    GATEWAY_SNIPPET,
    PROD_CADDYFILE,
    caddy_binary,
)

CADDYFILES = [DEV_CADDYFILE, PROD_CADDYFILE]
MUTATIONS = ["pull", "push", "create", "copy", "delete", "blobs"]
STRIPPED_UPSTREAM = {
    "Authorization",
    "Cookie",
    contract.H_BODY,
    contract.H_UPSTREAM_BODY,
    contract.H_LISTING,
    "Origin",
    "X-Forwarded-Method",
    "X-Forwarded-Uri",
}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Every variable the Caddyfiles read, with paths under the test's own directory."""
    return {
        **TEST_ENV,
        "NZ_ACCESS_LOG": str(tmp_path / "access.log"),
        "NZ_POLICYD_SOCKET": str(tmp_path / "policyd.sock"),
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }


@pytest.fixture(params=CADDYFILES, ids=lambda path: path.name)
def config(request: pytest.FixtureRequest, env: dict[str, str]) -> JsonObject:
    """The adapted JSON of each Caddyfile."""
    caddyfile: Path = request.param
    return adapt(caddyfile, env=env)


@pytest.mark.parametrize("caddyfile", CADDYFILES, ids=lambda path: path.name)
def test_caddyfile_validates(caddyfile: Path, env: dict[str, str]) -> None:
    """`caddy validate` accepts both Caddyfiles with the environment set."""
    done = subprocess.run(
        [caddy_binary(), "validate", "--config", str(caddyfile), "--adapter", "caddyfile"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Valid configuration" in done.stderr + done.stdout


@pytest.mark.parametrize("path", [*CADDYFILES, GATEWAY_SNIPPET], ids=lambda path: path.name)
def test_caddy_fmt_leaves_file_unchanged(path: Path) -> None:
    """Every file in caddy/ is already formatted the way `caddy fmt` writes it."""
    done = subprocess.run(
        [caddy_binary(), "fmt", str(path)], capture_output=True, text=True, check=True
    )
    assert done.stdout == path.read_text()


@pytest.mark.parametrize("caddyfile", CADDYFILES, ids=lambda path: path.name)
def test_gateway_logic_lives_only_in_the_snippet(caddyfile: Path) -> None:
    """Both Caddyfiles import the (gateway) snippet and hold no proxy logic of their own."""
    lines = [line.strip() for line in caddyfile.read_text().splitlines()]
    directives = {line.split()[0] for line in lines if line and not line.startswith("#")}
    assert "import gateway.caddy" in lines
    assert "import gateway" in lines
    assert not directives & {"forward_auth", "reverse_proxy", "log_append", "route"}


def test_mutation_block_runs_before_anything_else(config: JsonObject) -> None:
    """The 403 for model management precedes request_body, forward_auth and the Ollama proxy."""
    order = [handler for handler, _ in gateway_handlers(config)]
    names = [handler["handler"] for handler in order]
    refusal = next(i for i, h in enumerate(order) if h.get("status_code") == 403 and "body" in h)
    auth = next(i for i, h in enumerate(order) if is_forward_auth(h))
    ollama = next(i for i, h in enumerate(order) if is_ollama_proxy(h))
    assert refusal < names.index("request_body") < auth < ollama
    assert contract.AUTHZ_PATH in order[auth]["rewrite"]["uri"]


def test_mutation_matcher_covers_every_endpoint_and_subpath(config: JsonObject) -> None:
    """The path matcher in front of the 403 names each mutation endpoint with a trailing `*`."""
    ((_, matchers),) = [(h, m) for h, m in gateway_handlers(config) if h.get("status_code") == 403]
    paths = [path for matcher in matchers for path in matcher.get("path", [])]
    assert paths == [f"/api/{name}*" for name in MUTATIONS]


def test_refusal_body_is_ollama_shaped_json(config: JsonObject) -> None:
    """The 403 says why, in Ollama's error format, with a JSON content type."""
    handlers = [h for h, _ in gateway_handlers(config)]
    (refusal,) = [h for h in handlers if h.get("status_code") == 403]
    assert refusal["body"] == (
        '{"error":"forbidden path: model management endpoints are disabled on this gateway"}'
    )
    content_types = [
        h["response"]["set"]["Content-Type"]
        for h in handlers
        if h["handler"] == "headers" and "Content-Type" in h.get("response", {}).get("set", {})
    ]
    # The mutation refusal and the filtered model listing both answer JSON.
    assert content_types == [["application/json; charset=utf-8"]] * 2


def test_client_nz_headers_deleted_before_forward_auth(config: JsonObject) -> None:
    """A wildcard request_header delete of X-Nz-* runs before either call to policyd."""
    order = [handler for handler, _ in gateway_handlers(config)]
    gate = next(i for i, h in enumerate(order) if is_key_gate(h))
    auth = next(i for i, h in enumerate(order) if is_forward_auth(h))
    delete = order.index({"handler": "headers", "request": {"delete": ["X-Nz-*"]}})
    assert delete < gate < auth


def test_bodies_are_read_only_when_cheap_or_after_a_key_check(config: JsonObject) -> None:
    """Unless the token is key-shaped and the declared body under 100 kB, policyd is asked
    about path and key (contract.AUTHZ_KEY_PATH, no body) before the body is read; then the
    body is set again for the upstream (the key check's 2xx hands on a drained copy).

    The Authorization pattern (RE2; Python's re reads it alike) lets through everything
    policyd's key parser could accept.
    """
    walked = gateway_handlers(config)
    bodies = [i for i, (h, _) in enumerate(walked) if h["handler"] == "request_body"]
    ((index, gate, matchers),) = [(i, h, m) for i, (h, m) in enumerate(walked) if is_key_gate(h)]
    auth = next(i for i, (h, _) in enumerate(walked) if is_forward_auth(h))
    ollama = next(i for i, (h, _) in enumerate(walked) if is_ollama_proxy(h))
    (bound,) = [i for i in bodies if "max_size" in walked[i][0]]
    (reset,) = [i for i in bodies if walked[i][0].get("set") == "{http.request.body}"]
    # policyd's normalised body, where there is one, is set after (and so wins).
    (upstream_body,) = [i for i in bodies if "X-Nz-Upstream-Body" in walked[i][0].get("set", "")]
    assert bound < index < auth < reset < upstream_body < ollama
    assert walked[reset][1] == matchers
    assert gate["rewrite"]["uri"] == contract.AUTHZ_KEY_PATH + "?"
    assert contract.H_BODY not in gate["headers"]["request"]["set"]
    assert gate["headers"]["request"]["set"][contract.H_REQUEST_ID] == ["{http.request.uuid}"]
    (negated,) = [m["not"] for m in matchers if "not" in m]
    (both,) = negated
    fields = both["header_regexp"]
    key_pattern = re.compile(fields["Authorization"]["pattern"])
    key = generate_key().full
    for good in (f"Bearer {key}", f"bearer  {key} ", f"BEARER \t{key}\xa0"):
        assert key_pattern.search(good)
    for bad in ("", "Bearer", f"Basic {key}", f"Bearer{key}", "Bearer nz_ABCDEFGH_" + "a" * 43):
        assert not key_pattern.search(bad)
    length_pattern = re.compile(fields["Content-Length"]["pattern"])
    assert all(length_pattern.search(n) for n in ("0", "2", "99999"))
    assert not any(length_pattern.search(n) for n in ("", "100000", "8388608", "-1", "1e3"))


@pytest.mark.parametrize("caddyfile", CADDYFILES, ids=lambda path: path.name)
def test_server_read_timeouts_and_header_size(caddyfile: Path, env: dict[str, str]) -> None:
    """Both Caddyfiles bound header and body reading time, idle time and header size."""
    server = gateway_server(adapt(caddyfile, env=env))
    second = 1_000_000_000
    assert server["read_header_timeout"] == 10 * second
    assert server["read_timeout"] == 30 * second
    assert server["idle_timeout"] == 120 * second
    assert server["max_header_bytes"] == 64 * 1024
    # Not full duplex: a refusal on headers alone waits for 256 KiB of an unread body (or
    # the read deadline) and then closes the connection; see docs/configuration.md.
    assert "enable_full_duplex" not in server
    # Caddy's idle read timeout is off: after a failed read it would clear the deadline,
    # and Go's drain of a small body's rest would wait for the client without one.
    assert server["read_idle_timeout"] < 0
    server = gateway_server(adapt(caddyfile, env={**env, "NZ_READ_BODY_TIMEOUT": "2s"}))
    assert server["read_timeout"] == 2 * second


@pytest.mark.parametrize("caddyfile", CADDYFILES, ids=lambda path: path.name)
def test_clients_speak_http1_unless_told_otherwise(caddyfile: Path, env: dict[str, str]) -> None:
    """Over TLS too: HTTP/2 and /3 request bodies escape the read timeout in Caddy 2.11.7."""
    assert gateway_server(adapt(caddyfile, env=env))["protocols"] == ["h1"]
    wider = adapt(caddyfile, env={**env, "NZ_PROTOCOLS": "h1 h2 h3"})
    assert gateway_server(wider)["protocols"] == ["h1", "h2", "h3"]
    # A typo stops Caddy at start with the value named, never a silent default.
    with pytest.raises(subprocess.CalledProcessError) as caught:
        adapt(caddyfile, env={**env, "NZ_PROTOCOLS": "h9"})
    assert b"unknown protocol 'h9'" in caught.value.stderr


def _timeout_routes(config: JsonObject) -> tuple[int, list[JsonObject]]:
    """Position of the intercept in the gateway route, and its routes for a 499."""
    order = [handler for handler, _ in gateway_handlers(config)]
    (index,) = [i for i, h in enumerate(order) if h["handler"] == "intercept"]
    (on_cut,) = order[index]["handle_response"]
    assert on_cut["match"] == {"status_code": [499]}
    routes: list[JsonObject] = on_cut["routes"]
    return index, routes


def test_a_request_cut_by_the_read_timeout_gets_408_before_policyd_admits(
    config: JsonObject,
) -> None:
    """forward_auth's 499 (the read deadline cancelled the request while it read the body)
    becomes a 408 in the caller's format, with the bodies policyd renders for
    request_timeout, and closes the connection; a 499 after the grant stays."""
    order = [handler for handler, _ in gateway_handlers(config)]
    index, routes = _timeout_routes(config)
    delete = order.index({"handler": "headers", "request": {"delete": ["X-Nz-*"]}})
    gate = next(i for i, h in enumerate(order) if is_key_gate(h))
    # Wraps both calls to policyd (and all after them), never a client-sent X-Nz-Grant.
    assert delete < index < gate
    no_grant = {"header": {contract.H_GRANT: ["*"]}}
    v1 = {"path": ["/v1", "/v1/*"]}
    headers, openai, ollama = routes
    assert headers["match"] == [{"not": [no_grant]}]
    assert headers["handle"] == [
        {
            "handler": "headers",
            "response": {
                "set": {
                    "Connection": ["close"],
                    "Content-Type": ["application/json; charset=utf-8"],
                    contract.H_REFUSAL: [Reason.REQUEST_TIMEOUT.value],
                }
            },
        }
    ]
    assert openai["match"] == [{"not": [no_grant], **v1}]
    assert ollama["match"] == [{"not": [no_grant, v1]}]
    (openai_answer,) = openai["handle"]
    (ollama_answer,) = ollama["handle"]
    message = json.loads(ollama_answer["body"])["error"]
    assert message == "request timeout: the request did not arrive in full within 30s"
    refusal = Refusal(reason=Reason.REQUEST_TIMEOUT, message=message)
    for answer, surface in ((openai_answer, Surface.OPENAI), (ollama_answer, Surface.OLLAMA)):
        status, body, _ = render(refusal, surface)
        assert answer == {
            "handler": "static_response",
            "status_code": status,
            "body": body.decode(),
        }
        assert status == 408


def test_the_timeout_answer_names_the_configured_read_timeout(env: dict[str, str]) -> None:
    """The 408's message follows NZ_READ_BODY_TIMEOUT."""
    config = adapt(DEV_CADDYFILE, env={**env, "NZ_READ_BODY_TIMEOUT": "2s"})
    _, (_, _, ollama) = _timeout_routes(config)
    assert json.loads(ollama["handle"][0]["body"])["error"].endswith("within 2s")


def test_forward_auth_sends_body_and_id_and_copies_contract_headers(config: JsonObject) -> None:
    """forward_auth adds X-Nz-Body and X-Request-Id and copies exactly contract.COPIED_HEADERS."""
    (auth,) = [h for h, _ in gateway_handlers(config) if is_forward_auth(h)]
    sent = auth["headers"]["request"]["set"]
    assert sent[contract.H_BODY] == ["{http.request.body_base64}"]
    assert sent[contract.H_REQUEST_ID] == ["{http.request.uuid}"]
    assert auth["upstreams"] == [{"dial": "unix/" + str(Path(auth["upstreams"][0]["dial"][5:]))}]
    on_success, on_refused = auth["handle_response"]
    assert on_success["match"] == {"status_code": [2]}
    # A refusal's X-Nz-Refused is logged (contract.LOG_REFUSED) and kept from the client.
    assert on_refused["match"] == {"headers": {contract.H_REFUSED: ["*"]}}
    refused = [h for route in on_refused["routes"] for h in route["handle"]]
    assert {
        "handler": "log_append",
        "key": contract.LOG_REFUSED,
        "value": f"{{http.reverse_proxy.header.{contract.H_REFUSED}}}",
    } in refused
    deleted = {"handler": "headers", "response": {"deferred": True, "delete": [contract.H_REFUSED]}}
    assert deleted in refused
    copied = [
        name
        for route in on_success["routes"]
        for handler in route["handle"]
        if handler["handler"] == "headers"
        for name in handler["request"].get("set", {})
    ]
    # The route lands where Caddy's lb_policy cookie reads it (and the client's Cookie goes).
    renamed = {contract.H_ROUTE: "Cookie"}
    assert sorted(copied) == sorted(renamed.get(name, name) for name in contract.COPIED_HEADERS)


def test_ollama_proxy_streams_and_strips_headers(config: JsonObject) -> None:
    """The Ollama proxy flushes every chunk, sets Host and the id, and deletes client secrets."""
    (ollama,) = [h for h, _ in gateway_handlers(config) if is_ollama_proxy(h)]
    assert ollama["flush_interval"] == -1
    request_ops = ollama["headers"]["request"]
    assert set(request_ops["delete"]) == STRIPPED_UPSTREAM
    assert request_ops["set"] == {
        "Host": ["{http.reverse_proxy.upstream.hostport}"],
        "X-Request-Id": ["{http.request.uuid}"],
    }


def test_log_append_fields_match_contract(config: JsonObject) -> None:
    """After forward_auth, log_append adds the grant (contract.LOG_GRANT); bodies when flagged."""
    walked = gateway_handlers(config)
    auth = next(i for i, (h, _) in enumerate(walked) if is_forward_auth(h))
    appended = {
        h["key"]: (h["value"], m, i)
        for i, (h, m) in enumerate(walked)
        if h["handler"] == "log_append"
    }
    expected = {
        contract.LOG_GRANT: f"{{http.request.header.{contract.H_GRANT}}}",
        contract.LOG_UPSTREAM: "{http.reverse_proxy.upstream.hostport}",
    }
    bodies = {"resp_body", "resp_context", "req_body", "user_agent", "ttfb_ms"}
    assert {key: value for key, (value, _, _) in appended.items() if key not in bodies} == expected
    assert all(index > auth for _, _, index in appended.values())
    value, matchers, _ = appended["resp_body"]
    assert value == "{http.response.body}"
    assert [m for m in matchers if "header" in m] == [{"header": {contract.H_GRANT: ["log=c*"]}}]
    value, matchers, _ = appended["req_body"]
    assert value == "{http.request.body}"
    prompt_flags = ["log=cp*", "log=-p*"]
    assert [m for m in matchers if "header" in m] == [{"header": {contract.H_GRANT: prompt_flags}}]


def test_request_body_bounded_by_setting(env: dict[str, str]) -> None:
    """request_body max_size follows NZ_MAX_BODY_BYTES and defaults to 8 MiB."""
    for value, expected in (("1048576", 1048576), (None, 8388608)):
        run_env = {k: v for k, v in env.items() if k != "NZ_MAX_BODY_BYTES"}
        if value is not None:
            run_env["NZ_MAX_BODY_BYTES"] = value
        handlers = [h for h, _ in gateway_handlers(adapt(DEV_CADDYFILE, env=run_env))]
        (body,) = [h for h in handlers if h["handler"] == "request_body" and "max_size" in h]
        assert body["max_size"] == expected


def test_upstream_body_is_set_from_policyd_after_forward_auth(config: JsonObject) -> None:
    """Only after forward_auth, and only when policyd sent one, the body becomes policyd's."""
    walked = gateway_handlers(config)
    auth = next(i for i, (h, _) in enumerate(walked) if is_forward_auth(h))
    ((index, handler, matchers),) = [
        (i, h, m)
        for i, (h, m) in enumerate(walked)
        if h["handler"] == "request_body" and contract.H_UPSTREAM_BODY in h.get("set", "")
    ]
    assert index > auth
    assert handler["set"] == f"{{http.request.header.{contract.H_UPSTREAM_BODY}}}"
    assert {"header": {contract.H_UPSTREAM_BODY: ["*"]}} in matchers


def test_probes_go_to_policyd_without_auth(config: JsonObject, env: dict[str, str]) -> None:
    """/healthz and /readyz are proxied to policyd's socket ahead of forward_auth."""
    walked = gateway_handlers(config)
    auth = next(i for i, (h, _) in enumerate(walked) if is_forward_auth(h))
    ((index, probe),) = [
        (i, h)
        for i, (h, m) in enumerate(walked)
        if h["handler"] == "reverse_proxy" and {"path": ["/healthz", "/readyz"]} in m
    ]
    assert index < auth
    assert probe["upstreams"] == [{"dial": f"unix/{env['NZ_POLICYD_SOCKET']}"}]


def test_access_log_rolls_uncompressed_and_filters_headers(
    config: JsonObject, env: dict[str, str]
) -> None:
    """The access log is Caddy's rolling file writer, 0640, without any client request header."""
    access = access_log_config(config)
    assert access["writer"] == {
        "output": "file",
        "filename": env["NZ_ACCESS_LOG"],
        "mode": "0640",
        "roll_gzip": False,
        "roll_keep": 10,
        "roll_size_mb": 100,
    }
    encoder = access["encoder"]
    assert encoder["format"] == "filter"
    assert encoder["wrap"] == {"format": "json"}
    fields = encoder["fields"]
    assert fields["request>headers"] == {"filter": "delete"}
    assert fields["request>uri"] == {"filter": "regexp", "regexp": "\\?.*$"}
    # One regexp for the counts: multi_regexp cuts its input at 1,000,000 characters.
    assert fields["resp_body"]["filter"] == "regexp"
    assert fields["resp_context"]["filter"] == "multi_regexp"
    assert set(fields) == {"request>headers", "request>uri", "resp_body", "resp_context"}
    default = config["logging"]["logs"]["default"]
    # Caddy's own log never holds request headers (X-Nz-Body is the client's prompt).
    assert default["encoder"] == {
        "format": "filter",
        "wrap": {"format": "json"},
        "fields": {"request>headers": {"filter": "delete"}},
    }
    assert set(access["include"]) <= set(default["exclude"])


def test_dev_listens_on_loopback_by_default(env: dict[str, str]) -> None:
    """By default the dev gateway binds 127.0.0.1:8080 only, plain HTTP, no admin API."""
    config = adapt(DEV_CADDYFILE, env=env)
    server = gateway_server(config)
    assert server["listen"] == ["127.0.0.1:8080"]
    assert server["automatic_https"]["disable"] is True
    assert config["admin"] == {"disabled": True}


def test_dev_listen_address_follows_setting(env: dict[str, str]) -> None:
    """NZ_BIND and NZ_HTTP_PORT choose the listener; there is never a Host matcher."""
    config = adapt(DEV_CADDYFILE, env={**env, "NZ_BIND": "0.0.0.0", "NZ_HTTP_PORT": "8081"})  # noqa: S104
    server = gateway_server(config)
    assert server["listen"] == ["0.0.0.0:8081"]
    assert all("match" not in route for route in server["routes"])


def test_prod_serves_tls_for_domain_with_hsts(env: dict[str, str]) -> None:
    """The production site is NZ_DOMAIN on :443 (automatic HTTPS) and sends HSTS everywhere."""
    config = adapt(PROD_CADDYFILE, env=env)
    server = gateway_server(config)
    assert server["listen"] == [":443"]
    assert server["routes"][0]["match"] == [{"host": [env["NZ_DOMAIN"]]}]
    assert "automatic_https" not in server
    security = next(
        h["response"]
        for h, _ in gateway_handlers(config)
        if "Strict-Transport-Security" in h.get("response", {}).get("set", {})
    )
    assert security["deferred"] is True
    assert security["set"]["Strict-Transport-Security"] == ["max-age=63072000; includeSubDomains"]
    assert security["set"]["X-Content-Type-Options"] == ["nosniff"]
    assert "Server" in security["delete"]
    assert config["admin"] == {"disabled": True}


def test_metrics_only_on_the_internal_listener(config: JsonObject) -> None:
    """Metrics are collected and served by a loopback site of their own, never the public one."""
    assert "metrics" in config["apps"]["http"]
    public, internal = gateway_server(config), metrics_server(config)
    assert internal["listen"] == ["127.0.0.1:9180"]
    assert public["listen"] != internal["listen"]
    names = {handler["handler"] for handler, _ in gateway_handlers(config)}
    assert "metrics" not in names
    # The internal site routes exactly two paths (Caddy's, policyd's) and 404s the rest.
    paths = [m["path"] for route in internal["routes"] for m in route.get("match", [])]
    assert sorted(paths) == [["/metrics"], ["/metrics/policyd"]]
    # Not in the access log meterd reads: scrapes are no requests to settle.
    assert access_log_config(config)["include"]
    logs = json.dumps(internal.get("logs", {}))
    assert "log0" not in logs


def test_metrics_listener_follows_its_settings(env: dict[str, str]) -> None:
    """NZ_METRICS_BIND and NZ_METRICS_PORT choose the internal listener."""
    config = adapt(
        DEV_CADDYFILE, env={**env, "NZ_METRICS_BIND": "10.1.2.3", "NZ_METRICS_PORT": "19180"}
    )
    assert metrics_server(config)["listen"] == ["10.1.2.3:19180"]
