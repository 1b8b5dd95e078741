"""The HTTP listener as a service: CORS for browser viewers, JSON errors for unknown
resources, a clear start-up failure when its port is taken, and turning it off."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest

from tests.conftest import free_port, launch_daemon

VIEWER = "https://viewer.example.org"


def test_cors_preflight_and_headers_for_a_listed_origin(start_daemon):
    daemon = start_daemon(HTTP__CORS_ORIGINS=f'["{VIEWER}"]')
    with httpx.Client(base_url=daemon.dicomweb_url, timeout=30) as http:
        preflight = http.options("/studies", headers={
            "Origin": VIEWER, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "accept, authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == VIEWER
        assert "GET" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        assert int(preflight.headers["access-control-max-age"]) > 0

        search = http.get("/studies", headers={"Origin": VIEWER, "Accept": "application/dicom+json"})
        assert search.status_code in (200, 204)
        assert search.headers["access-control-allow-origin"] == VIEWER
        assert "warning" in search.headers["access-control-expose-headers"].lower()
        # images and thumbnails may be embedded by the viewer's page
        assert search.headers["cross-origin-resource-policy"] == "cross-origin"

        # errors carry the header too, or the browser hides the message from the viewer
        missing = http.get("/studies/1.2.3/metadata", headers={"Origin": VIEWER})
        assert missing.status_code == 404
        assert missing.headers["access-control-allow-origin"] == VIEWER

        other = http.get("/studies", headers={"Origin": "https://elsewhere.example.org"})
        assert "access-control-allow-origin" not in other.headers
        refused = http.options("/studies", headers={
            "Origin": "https://elsewhere.example.org", "Access-Control-Request-Method": "GET"})
        assert refused.status_code == 400


def test_no_cors_headers_unless_configured(daemon):
    response = httpx.get(daemon.dicomweb_url + "/studies", headers={"Origin": VIEWER}, timeout=30)
    assert response.status_code in (200, 204)
    assert "access-control-allow-origin" not in response.headers


def test_unknown_resource_and_method_are_json_errors(daemon):
    with httpx.Client(base_url=daemon.http_url, timeout=30) as http:
        missing = http.get("/dicom-web/patients")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/json"
        assert missing.json() == {"status": 404, "error": "Not Found",
                                  "message": "no resource at /dicom-web/patients"}
        wrong = http.delete("/dicom-web/studies")
        assert wrong.status_code == 405
        assert "DELETE" in wrong.json()["message"]
    assert [e["status"] for e in daemon.events("http.rejected")] == [404, 405]


def test_http_port_taken_stops_start_with_a_clear_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http_port = taken.getsockname()[1]
        dicom_port = free_port()
        env = {"PACSD_DICOM__PORT": str(dicom_port), "PACSD_DICOM__BIND": "127.0.0.1",
               "PACSD_HTTP__PORT": str(http_port), "PACSD_STORAGE__DATA_DIR": str(tmp_path / "data"),
               "PACSD_LOGGING__FORMAT": "json"}
        result = subprocess.run([sys.executable, "-m", "pacsd", "serve"], capture_output=True, text=True,
                                timeout=60, env={**_base_env(), **env})
    assert result.returncode != 0
    assert f"HTTP listener on 127.0.0.1:{http_port}" in result.stderr
    assert "in use" in result.stderr
    # the DICOM listener it had opened is closed again
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", dicom_port))


def test_http_can_be_turned_off(tmp_path):
    daemon = launch_daemon(tmp_path, "nohttp", HTTP__ENABLED="false")
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(daemon.dicomweb_url + "/studies", timeout=5)
        assert not daemon.events("http.listening")
        assert daemon.events("dicom.listening")
    finally:
        assert daemon.stop() == 0


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PACSD_")}
