"""Refusals, rendered in the error format of the API surface the caller used.

Caddy hands a forward_auth denial to the client verbatim (status, body, headers), so
what is built here is exactly what the client sees.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs
import msgspec

from policyd.shared.contract import H_REFUSAL, Surface

__all__ = ["Reason", "Refusal", "render"]


class Reason(enum.StrEnum):
    """Machine-readable refusal codes; also sent as `X-Nz-Refusal` and logged."""

    MISSING_KEY = "missing_api_key"
    MALFORMED_KEY = "malformed_api_key"
    INVALID_KEY = "invalid_api_key"
    REVOKED_KEY = "revoked_api_key"
    EXPIRED_KEY = "expired_api_key"
    KEY_THROTTLED = "api_key_verification_throttled"
    FORBIDDEN_PATH = "forbidden_path"
    UNKNOWN_PATH = "unknown_endpoint"
    METHOD = "method_not_allowed"
    BAD_BODY = "invalid_request_body"
    CLOUD_MODEL = "cloud_model_forbidden"
    TOO_LARGE = "request_too_large"
    UNAVAILABLE = "service_unavailable"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    MODEL_NOT_FOUND = "model_not_found"
    OUTPUT_CAP_EXCEEDED = "max_output_tokens_exceeded"
    RESERVATION_TOO_LARGE = "reservation_exceeds_limit"
    RPM = "requests_per_minute_exceeded"
    TPM = "tokens_per_minute_exceeded"
    CONCURRENCY = "concurrency_limit_exceeded"
    DAILY_BUDGET = "daily_budget_exhausted"
    MONTHLY_BUDGET = "monthly_budget_exhausted"
    TOTAL_BUDGET = "total_budget_exhausted"
    #: Answered by Caddy itself (caddy/gateway.caddy) when the request did not arrive
    #: in full within its read timeout; listed here so one place names every code, and
    #: tests/caddy checks Caddy's bodies against `render`.
    REQUEST_TIMEOUT = "request_timeout"


_STATUS: Final = {
    Reason.MISSING_KEY: 401,
    Reason.MALFORMED_KEY: 401,
    Reason.INVALID_KEY: 401,
    Reason.REVOKED_KEY: 401,
    Reason.EXPIRED_KEY: 401,
    Reason.KEY_THROTTLED: 429,
    Reason.FORBIDDEN_PATH: 403,
    Reason.CLOUD_MODEL: 403,
    Reason.UNKNOWN_PATH: 404,
    Reason.METHOD: 405,
    Reason.BAD_BODY: 400,
    Reason.TOO_LARGE: 413,
    Reason.UNAVAILABLE: 503,
    Reason.MODEL_NOT_ALLOWED: 403,
    Reason.MODEL_NOT_FOUND: 404,
    Reason.OUTPUT_CAP_EXCEEDED: 400,
    Reason.RESERVATION_TOO_LARGE: 400,
    Reason.RPM: 429,
    Reason.TPM: 429,
    Reason.CONCURRENCY: 429,
    Reason.DAILY_BUDGET: 429,
    Reason.MONTHLY_BUDGET: 429,
    Reason.TOTAL_BUDGET: 429,
    Reason.REQUEST_TIMEOUT: 408,
}
#: Budgets are quota, not rate: OpenAI reports those as `insufficient_quota`.
_QUOTA: Final = frozenset({Reason.DAILY_BUDGET, Reason.MONTHLY_BUDGET, Reason.TOTAL_BUDGET})

# OpenAI's error `type` by status; the SDKs pick their exception class by status.
_OPENAI_TYPE: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "api_error",
}


@attrs.frozen(kw_only=True)
class Refusal:
    """A decision not to forward the request."""

    reason: Reason
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def status(self) -> int:
        return _STATUS[self.reason]


def render(
    refusal: Refusal, surface: Surface, *, request_id: str = ""
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, JSON body and headers for `refusal` in the caller's API format."""
    status = refusal.status
    body: object
    if surface is Surface.OPENAI:
        body = {
            "error": {
                "message": refusal.message,
                "type": "insufficient_quota"
                if refusal.reason in _QUOTA
                else _OPENAI_TYPE.get(status, "api_error"),
                "param": None,
                "code": refusal.reason.value,
            }
        }
    else:
        body = {"error": refusal.message}
    headers = [("content-type", "application/json; charset=utf-8"), (H_REFUSAL, refusal.reason)]
    if request_id:
        headers.append(("x-request-id", request_id))
    if status == 401:
        headers.append(("www-authenticate", 'Bearer realm="neuronetz-gateway"'))
    headers.extend(refusal.headers)
    return status, msgspec.json.encode(body), headers
