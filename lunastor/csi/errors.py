"""CSI errors: one exception carrying a gRPC status code, and the table that turns a REST
problem (HTTP status + stable `code`, docs/csi-mapping.md) into that code."""

from __future__ import annotations

import grpc


class CsiError(Exception):
    """Raise from an RPC handler: the call ends with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


S = grpc.StatusCode

#: problem `code` -> CSI status, for the codes whose meaning the HTTP status does not decide
#: (409 alone is ALREADY_EXISTS, FAILED_PRECONDITION or ABORTED). docs/csi-mapping.md, "Errors".
BY_CODE: dict[str, grpc.StatusCode] = {
    "invalid_field": S.INVALID_ARGUMENT,
    "invalid_json": S.INVALID_ARGUMENT,
    "out_of_range": S.OUT_OF_RANGE,
    "shrink_not_supported": S.OUT_OF_RANGE,
    "volume_not_found": S.NOT_FOUND,
    "snapshot_not_found": S.NOT_FOUND,
    "source_not_found": S.NOT_FOUND,
    "target_not_found": S.NOT_FOUND,
    "chunk_server_not_found": S.NOT_FOUND,
    "operation_not_found": S.NOT_FOUND,
    "already_exists_with_different_parameters": S.ALREADY_EXISTS,
    "volume_in_use": S.FAILED_PRECONDITION,
    "chap_not_enabled": S.FAILED_PRECONDITION,
    "mutual_chap_not_enabled": S.FAILED_PRECONDITION,
    "sealing_key_missing": S.FAILED_PRECONDITION,
    "aborted": S.ABORTED,
    "token_expired": S.ABORTED,
    "luns_exhausted": S.RESOURCE_EXHAUSTED,
    "too_many_exports": S.RESOURCE_EXHAUSTED,
    "unauthenticated": S.UNAUTHENTICATED,
    "forbidden": S.PERMISSION_DENIED,
    "metadata_unavailable": S.UNAVAILABLE,
    "data_path_unavailable": S.UNAVAILABLE,
    "internal_error": S.INTERNAL,
    "corrupt_record": S.INTERNAL,
}

#: HTTP status -> CSI status, for problem codes not in `BY_CODE` (a newer server's).
BY_STATUS: dict[int, grpc.StatusCode] = {
    400: S.INVALID_ARGUMENT,
    401: S.UNAUTHENTICATED,
    403: S.PERMISSION_DENIED,
    404: S.NOT_FOUND,
    409: S.ABORTED,
    410: S.ABORTED,
    413: S.INVALID_ARGUMENT,
    500: S.INTERNAL,
    502: S.UNAVAILABLE,
    503: S.UNAVAILABLE,
    504: S.UNAVAILABLE,
    507: S.RESOURCE_EXHAUSTED,
}


def status_for(http_status: int, code: str, field: str | None = None) -> grpc.StatusCode:
    """The CSI status of a REST problem. A bad `next` token is ABORTED, not INVALID_ARGUMENT:
    the CO restarts the listing (CSI ListVolumes: "Invalid starting_token" is ABORTED)."""
    if code == "invalid_field" and field == "next":
        return S.ABORTED
    if code == "invalid_field" and field == "size_bytes":
        return S.OUT_OF_RANGE
    if code in BY_CODE:
        return BY_CODE[code]
    return BY_STATUS.get(http_status, S.UNKNOWN if http_status < 500 else S.INTERNAL)
