"""HTTP as the pipeline's clients speak it to the team's servers: basic auth, and a status that tells refusal apart."""
from __future__ import annotations

import base64
import urllib.error
import urllib.request

TIMEOUT_S = 10


def basic_auth(username: str, password: str) -> str:
    """The value of an HTTP Authorization header for basic auth."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def http_status(url: str, authorization: str | None = None, timeout_s: float = TIMEOUT_S,
                json_body: bytes | None = None) -> int | None:
    """The HTTP status of GET url, or of POST json_body to it (None: nothing answers there)."""
    headers = {"Authorization": authorization} if authorization else {}
    if json_body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=json_body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except OSError:
        return None
