"""Absolute URLs of pacsd's own resources, for BulkDataURI and Retrieve URL values.

[http] public_url wins: behind a reverse proxy only the operator knows the address clients
use. Without it the request's Host header is used, with the port the request actually came in
on added when the header has none: dicomweb-client (Python) sends `Host` without the port
(research note §4.2), and a URL built from that alone would point at port 80.
"""

from __future__ import annotations

import re

from starlette.requests import Request

_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
_DEFAULT_PORT = {"http": 80, "https": 443}


def service_url(request: Request) -> str:
    """The DICOMweb base URL as the client reaches it, without a trailing slash."""
    http = request.app.state.settings.http
    if http.public_url:
        return http.public_url + http.base_path
    scheme = request.url.scheme
    server = request.scope.get("server") or ("127.0.0.1", _DEFAULT_PORT.get(scheme, 80))
    host = request.headers.get("host", "")
    match = _HOST.fullmatch(host)
    if match and match.group(2):
        return f"{scheme}://{host}{http.base_path}"
    if match:
        host = match.group(1)
    else:  # absent or not a plain host name: the address the request came in on
        address = str(server[0])
        host = f"[{address}]" if ":" in address else address
    port = server[1]
    if port and port != _DEFAULT_PORT.get(scheme):
        host += f":{port}"
    return f"{scheme}://{host}{http.base_path}"


def instance_url(service: str, study: str, series: str, instance: str) -> str:
    return f"{service}/studies/{study}/series/{series}/instances/{instance}"
