"""What every route of the local workspace emulator shares: the error answer and the clock.

`local.py` (the HTTP server), `local_jobs.py` and `local_genie.py` all raise `ApiError`; it lives here, apart from
them, so that none of them has to import another.
"""
import time


class ApiError(Exception):
    """An error answer: `{"error_code", "message"}` with an HTTP status (429/503 also carry Retry-After)."""

    def __init__(self, status, error_code, message, retry_after=None):
        super().__init__(f"{status} {error_code}: {message}")
        self.status, self.error_code, self.message, self.retry_after = status, error_code, message, retry_after


def bad(message):
    return ApiError(400, "INVALID_PARAMETER_VALUE", message)


def missing(message):
    return ApiError(404, "RESOURCE_DOES_NOT_EXIST", message)


def now_ms():
    return int(time.time() * 1000)
