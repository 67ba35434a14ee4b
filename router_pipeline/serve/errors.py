"""Why the gateway does not serve a request, without HTTP: the server maps each kind to
a status (serve/server.py), the CLI prints the message. The message is what a caller
may read (no internals); ``code`` and ``param`` follow OpenAI's error object."""

from __future__ import annotations


class Refused(Exception):
    """A request the gateway will not serve as asked."""

    def __init__(self, message: str, code: str, *, param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.message, self.code, self.param, self.retry_after_s = message, code, param, retry_after_s


class InvalidRequest(Refused):
    """The caller's request is wrong (a field, the conversation, the feedback)."""


class NotFound(Refused):
    """The request names something that does not exist (a model, a request id)."""


class Forbidden(Refused):
    """The caller's profile may not use what the request asks for (a model by name)."""


class Conflict(Refused):
    """The request contradicts what was recorded before."""


class Unavailable(Refused):
    """No model can answer now; ``retry_after_s`` says when one may."""


class UpstreamFailed(Refused):
    """The upstream model call failed in a way a retry may not fix."""
