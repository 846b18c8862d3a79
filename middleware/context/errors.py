"""NGSI-LD errors (ETSI GS CIM 009 v1.8 clause 5.5.2) raised by the broker and rendered as ProblemDetails."""
from __future__ import annotations

ERROR_BASE = "https://uri.etsi.org/ngsi-ld/errors/"


class NgsiLdError(Exception):
    """Base of every NGSI-LD error; carries the ProblemDetails type, HTTP status and detail."""

    type_name = "InternalError"
    status = 500

    def __init__(self, detail: str, title: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.title = title or self.type_name

    @property
    def type_uri(self) -> str:
        """The error type URI of the ProblemDetails body."""
        return ERROR_BASE + self.type_name

    def problem(self) -> dict:
        """The ProblemDetails body (RFC 7807) of this error."""
        return {"type": self.type_uri, "title": self.title, "status": self.status, "detail": self.detail}


class InvalidRequest(NgsiLdError):
    """The request is not well-formed (syntax, JSON, headers)."""

    type_name = "InvalidRequest"
    status = 400


class BadRequestData(NgsiLdError):
    """The request is well-formed but its content is invalid."""

    type_name = "BadRequestData"
    status = 400


class AlreadyExists(NgsiLdError):
    """The resource to create exists already."""

    type_name = "AlreadyExists"
    status = 409


class OperationNotSupported(NgsiLdError):
    """The operation is not supported."""

    type_name = "OperationNotSupported"
    status = 422


class ResourceNotFound(NgsiLdError):
    """The referred resource does not exist."""

    type_name = "ResourceNotFound"
    status = 404


class TooComplexQuery(NgsiLdError):
    """The query is too complex to be answered."""

    type_name = "TooComplexQuery"
    status = 403


class TooManyResults(NgsiLdError):
    """The query would return more results than allowed."""

    type_name = "TooManyResults"
    status = 403


class LdContextNotAvailable(NgsiLdError):
    """A remote JSON-LD @context could not be retrieved."""

    type_name = "LdContextNotAvailable"
    status = 503


class NonexistentTenant(NgsiLdError):
    """The tenant named in NGSILD-Tenant does not exist."""

    type_name = "NonexistentTenant"
    status = 404


class InternalError(NgsiLdError):
    """An unexpected error inside the broker."""

    type_name = "InternalError"
    status = 500


class PayloadTooLarge(NgsiLdError):
    """The request body exceeds the configured limit (HTTP 413)."""

    type_name = "BadRequestData"
    status = 413
