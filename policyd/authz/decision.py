"""The decision for one forward_auth call: path, key, body, key policy, admission.

`decide_authz` turns forward_auth's headers into a `Verdict`; `fastpath` serves it without
a web framework (it is the hot path). The rules themselves live in `screening` (path,
body, key policy, the grant), `keystore` (the key) and `limits` (admission).

Order is by cost: the path and the key need only headers, so they come first; the body
(up to megabytes of base64 JSON) is decoded and parsed only for a verified key, so an
unauthenticated flood with junk bodies costs a header check, not a parse.
"""

from __future__ import annotations

import logging
import uuid
from typing import Final

import attrs

from policyd.authz import metrics
from policyd.authz.listing import (
    LISTING_PATHS,
    ListingUnavailable,
    filtered_listing,
    merged_listing,
)
from policyd.authz.records import KeyRecord
from policyd.authz.refusals import Reason, Refusal, render
from policyd.authz.screening import (
    Screened,
    admit,
    allowed_models,
    check_key_policy,
    normalised_body,
    reservation,
    screen_body,
    screen_target,
)
from policyd.authz.services import Services
from policyd.authz.upstreams import RouteKind
from policyd.shared.contract import H_LISTING, H_REFUSED, H_ROUTE, Refused, Surface
from policyd.shared.errors import StoreUnavailable
from policyd.shared.keys import parse_key

__all__ = ["Verdict", "decide_authz", "decide_key"]

_log = logging.getLogger("policyd.authz")

_UNAVAILABLE: Final = Refusal(
    reason=Reason.UNAVAILABLE,
    message="the gateway cannot verify this request right now; try again shortly",
    headers=(("retry-after", "1"),),
)


@attrs.frozen
class Verdict:
    """policyd's answer to one forward_auth call, before any HTTP framework sees it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    #: The refusal code (None: admitted) and the caller's surface, for the metrics.
    code: str | None = None
    surface: Surface | None = None
    #: The key failed verification; `repeated`: a failure the key store saw before. The
    #: server may hold such an answer back (`tarpit.py`).
    auth_failed: bool = False
    repeated: bool = False


def _refused(
    refusal: Refusal, surface: Surface, request_id: str, who: Refused | None = None
) -> Verdict:
    status, body, headers = render(refusal, surface, request_id=request_id)
    if who is not None:
        # For the audit only: Caddy logs it and removes it from the client's answer.
        headers.append((H_REFUSED, who.encode()))
    return Verdict(status, headers, body, code=refusal.reason.value, surface=surface)


def _verified(record: KeyRecord, model: str | None) -> Refused:
    return Refused(
        key_id=record.key_id, key_prefix=record.prefix, tenant_id=record.tenant_id, model=model
    )


def _claimed(authorization: str | None) -> Refused | None:
    """The prefix a key that failed verification claims, if it is well-formed."""
    scheme, _, token = (authorization or "").partition(" ")
    parsed = parse_key(token.strip()) if scheme.lower() == "bearer" else None
    return Refused(claimed_prefix=parsed.prefix) if parsed is not None else None


def _model_of(screened: Screened) -> str | None:
    """The model to name in a refusal: the one requested, else the one refused by name."""
    model = _requested_model(screened)
    return model if model is not None else screened.refused_model


async def _verified_key(
    services: Services, screened: Screened, authorization: str | None, request_id: str
) -> KeyRecord | Verdict:
    """The key's record once path and key pass (headers only, no body), else the refusal."""
    if screened.refusal is not None:
        _log.info("refused %s: %s", request_id, screened.refusal.reason)
        return _refused(screened.refusal, screened.surface, request_id)
    try:
        result = await services.keys.authenticate(authorization)
    except StoreUnavailable as exc:
        metrics.store_error(exc)
        _log.warning("failing closed for %s: %s", request_id, exc)
        return _refused(_UNAVAILABLE, screened.surface, request_id)
    if result.record is None:
        assert result.refusal is not None
        _log.info("refused %s: %s", request_id, result.refusal)
        retry = (
            () if result.retry_after_s is None else (("retry-after", str(result.retry_after_s)),)
        )
        refusal = Refusal(
            reason=result.refusal, message=_AUTH_MESSAGES[result.refusal], headers=retry
        )
        verdict = _refused(refusal, screened.surface, request_id, _claimed(authorization))
        return attrs.evolve(verdict, auth_failed=True, repeated=result.repeated)
    return result.record


async def decide_key(
    services: Services,
    *,
    method: str,
    target: str,
    authorization: str | None,
    request_id: str,
) -> Verdict:
    """Path and key only, asked before Caddy reads a body: 204, or the client's refusal.

    Admits nothing: the request still needs `decide_authz` (which finds the key in the
    process cache) before it may go upstream.
    """
    screened = screen_target(method, target)
    verified = await _verified_key(services, screened, authorization, request_id)
    return verified if isinstance(verified, Verdict) else Verdict(204, [], surface=screened.surface)


async def decide_authz(
    services: Services,
    *,
    method: str,
    target: str,
    body: str | None,
    authorization: str | None,
    request_id: str,
) -> Verdict:
    """Decide one request for Caddy: 2xx with X-Nz-* headers, or the client's refusal.

    The arguments are forward_auth's headers: X-Forwarded-Method, X-Forwarded-Uri,
    X-Nz-Body, Authorization and X-Request-Id.
    """
    settings = services.settings
    screened = screen_target(method, target)
    verified = await _verified_key(services, screened, authorization, request_id)
    if isinstance(verified, Verdict):
        return verified
    record = verified
    services.last_used.touch(record.key_id)
    services.stats.bodies_screened += 1
    screened = screen_body(
        screened,
        body,
        max_body_bytes=settings.max_body_bytes,
        image_tokens=settings.image_tokens,
    )
    # Every refusal from here on names the verified key (and the model, once read).
    who = _verified(record, _model_of(screened))
    if screened.refusal is not None:
        _log.info("refused %s for key %s: %s", request_id, record.prefix, screened.refusal.reason)
        return _refused(screened.refusal, screened.surface, request_id, who)
    policy_refusal = check_key_policy(screened, record)
    if policy_refusal is not None:
        _log.info("refused %s for key %s: %s", request_id, record.prefix, policy_refusal.reason)
        return _refused(policy_refusal, screened.surface, request_id, who)
    route: str | None = None
    if services.upstreams.multi and (model := _requested_model(screened)) is not None:
        found = await services.upstreams.route_or_recheck(model)
        if found.kind is RouteKind.MISSING:
            # Every host answered and none has it: Ollama would say the same, in a 404.
            _log.info("refused %s: model %r on no host", request_id, model)
            refusal = Refusal(reason=Reason.MODEL_NOT_FOUND, message=f"model {model!r} not found")
            return _refused(refusal, screened.surface, request_id, who)
        route = found.header
    normalised = normalised_body(screened, record, default_output=settings.default_output_tokens)
    if isinstance(normalised, Refusal):
        _log.info("refused %s for key %s: %s", request_id, record.prefix, normalised.reason)
        return _refused(normalised, screened.surface, request_id, who)
    listing: str | None = None
    if screened.endpoint is not None and screened.endpoint.path in LISTING_PATHS:
        allowed = allowed_models(record)
        # Before admission: a failed fetch must not leave a lease no log line releases.
        try:
            if services.upstreams.multi:
                # Several hosts: every host's models in one listing (filtered if scoped).
                listing = await merged_listing(services.upstreams, screened.endpoint.path, allowed)
            elif allowed is not None:
                listing = await filtered_listing(
                    services.http, settings.ollama_url, screened.endpoint.path, allowed
                )
        except ListingUnavailable as exc:
            _log.warning("failing closed for %s: %s", request_id, exc)
            return _refused(_UNAVAILABLE, screened.surface, request_id, who)
    reserved = reservation(screened, normalised)
    try:
        admission = await services.limiter.admit(
            record, request_id=request_id or uuid.uuid4().hex, reserve=reserved
        )
    except StoreUnavailable as exc:
        metrics.store_error(exc)
        _log.warning("failing closed for %s: %s", request_id, exc)
        return _refused(_UNAVAILABLE, screened.surface, request_id, who)
    if admission.refusal is not None:
        _log.info("refused %s for key %s: %s", request_id, record.prefix, admission.refusal.reason)
        limited = attrs.evolve(
            admission.refusal, headers=admission.refusal.headers + admission.headers
        )
        return _refused(limited, screened.surface, request_id, who)
    upstream = admit(
        screened,
        record,
        reserved=reserved,
        upstream_body=normalised.body if normalised is not None else None,
    )
    if listing is not None:
        upstream.append((H_LISTING, listing))
    upstream.extend(admission.headers)
    if route is not None:
        upstream.append((H_ROUTE, route))
    return Verdict(200, upstream, surface=screened.surface)


def _requested_model(screened: Screened) -> str | None:
    if screened.facts is not None and screened.facts.model is not None:
        return screened.facts.model
    return screened.endpoint.path_model if screened.endpoint is not None else None


_AUTH_MESSAGES: Final = {
    Reason.MISSING_KEY: "missing API key: send 'Authorization: Bearer nz_...'",
    Reason.MALFORMED_KEY: "malformed API key",
    Reason.INVALID_KEY: "invalid API key",
    Reason.REVOKED_KEY: "this API key has been revoked",
    Reason.EXPIRED_KEY: "this API key has expired",
    Reason.KEY_THROTTLED: (
        "too many failed verifications for this API key prefix; retry after the delay given"
    ),
}
