"""Errors of the server, as the OpenAI API writes them: ``{"error": {"message", "type", "param", "code"}}``.

One class, :class:`ServeError`, carries the HTTP status with the OpenAI fields; the constructors
below name the cases (vLLM's OpenAI server uses the same statuses):

==========================  ======  ========================  =========================
case                        status  ``type``                  ``code``
==========================  ======  ========================  =========================
malformed JSON, bad field   400     invalid_request_error     ``invalid_value`` …
missing/wrong API key       401     invalid_request_error     ``invalid_api_key``
unknown model or expert     404     invalid_request_error     ``model_not_found``
queue full                  429     rate_limit_error          ``queue_full``
corrupt expert (sha256)     500     server_error              ``expert_corrupt``
engine gone, replica down   503     server_error              ``unavailable``
request timeout             504     server_error              ``timeout``
==========================  ======  ========================  =========================

An error crosses from a replica to the ingress as a plain dict (:meth:`ServeError.to_dict`,
:meth:`ServeError.from_dict`), never as a pickled exception.
"""
from __future__ import annotations

from typing import Any

from t2dist.errors import UserError


class ServeError(UserError, RuntimeError):
    """An error answer of the server: HTTP ``status`` plus the OpenAI error fields."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_dict(self) -> dict[str, Any]:
        return {**self.body()["error"], "status": self.status}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeError":
        return cls(d["message"], status=int(d.get("status", 500)), type=d.get("type", "server_error"),
                   param=d.get("param"), code=d.get("code"))


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ServeError:
    return ServeError(message, status=400, param=param, code=code)


def unauthorized(message: str = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                 ) -> ServeError:
    return ServeError(message, status=401, code="invalid_api_key")


def not_found(message: str, param: str | None = "model") -> ServeError:
    return ServeError(message, status=404, param=param, code="model_not_found")


def queue_full(limit: int) -> ServeError:
    return ServeError(f"the server is busy: {limit} requests are waiting (serve.max_queue); retry later",
                      status=429, type="rate_limit_error", code="queue_full")


def expert_corrupt(message: str) -> ServeError:
    return ServeError(message, status=500, type="server_error", code="expert_corrupt")


def unavailable(message: str) -> ServeError:
    return ServeError(message, status=503, type="server_error", code="unavailable")


def timeout(seconds: float) -> ServeError:
    return ServeError(f"the request took longer than serve.request_timeout_s={seconds:g}", status=504,
                      type="server_error", code="timeout")


def internal(message: str) -> ServeError:
    return ServeError(message, status=500, type="server_error", code="internal_error")
