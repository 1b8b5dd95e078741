"""Packaging files stay valid and in step with the code.

Covers Dockerfile, .dockerignore, docker-compose.yml, config/pacsd.toml and
config/pacsd.service. No Docker engine or running systemd is needed: the Dockerfile is parsed
with dockerfile-parse, the compose file is checked against the Compose Specification schema
that check-jsonschema ships, and the unit file with `systemd-analyze verify` where that exists.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path, PurePosixPath

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from pydantic import BaseModel

from pacsd.config import (
    CommitmentSettings,
    DatabaseSettings,
    DicomSettings,
    HttpSettings,
    IanSettings,
    LoggingSettings,
    Peer,
    Settings,
    StorageSettings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
TOML_FILE = ROOT / "config" / "pacsd.toml"
UNIT_FILE = ROOT / "config" / "pacsd.service"

DATA_DIR = "/var/lib/pacsd"
DICOM_PORT = DicomSettings().port
HTTP_PORT = HttpSettings().port
SHUTDOWN_GRACE = DicomSettings().shutdown_grace


@pytest.fixture(autouse=True)
def _no_pacsd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read PACSD_* from the environment; start every test without any."""
    for name in list(os.environ):
        if name.upper().startswith("PACSD_"):
            monkeypatch.delenv(name)


def _duration_seconds(text: str | int | float) -> float:
    """'15s', '1m30s', '500ms', '15' (seconds) -> seconds; the forms compose and systemd share."""
    if isinstance(text, (int, float)):
        return float(text)
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h)", text)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == text.replace(" ", ""), (
        f"cannot read duration {text!r}"
    )
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile() -> list[dict]:
    with DOCKERFILE.open("rb") as f:
        parser = DockerfileParser(fileobj=f, env_replace=False)
        return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def _final_stage(instructions: list[dict]) -> list[dict]:
    last_from = max(n for n, i in enumerate(instructions) if i["instruction"] == "FROM")
    return instructions[last_from:]


def _only(instructions: list[dict], name: str) -> list[dict]:
    return [i for i in instructions if i["instruction"] == name]


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _dockerignored(path: str) -> bool:
    """Whether the build context loses `path` to .dockerignore (a pattern matching the path
    itself or any directory above it excludes it; '!' re-includes; last match wins)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in _dockerignore_patterns():
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        forms = [pattern]
        if pattern.startswith("**/"):
            forms.append(pattern[3:])
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            ignored = not negate
    return ignored


def test_dockerfile_bases_on_python_311_slim_bookworm():
    froms = _only(_dockerfile(), "FROM")
    assert froms, "Dockerfile has no FROM"
    for instr in froms:
        assert instr["value"].split()[0] == "python:3.11-slim-bookworm", instr["content"]


def test_dockerfile_exposes_dicom_and_http_ports():
    exposed = set()
    for instr in _only(_final_stage(_dockerfile()), "EXPOSE"):
        exposed.update(port.split("/")[0] for port in instr["value"].split())
    assert {str(DICOM_PORT), str(HTTP_PORT)} <= exposed


def test_dockerfile_declares_data_volume():
    volumes: list[str] = []
    for instr in _only(_final_stage(_dockerfile()), "VOLUME"):
        value = instr["value"].strip()
        volumes += json.loads(value) if value.startswith("[") else value.split()
    assert DATA_DIR in volumes


def test_dockerfile_runs_as_a_created_non_root_user():
    stage = _final_stage(_dockerfile())
    users = _only(stage, "USER")
    assert users, "the runtime stage has no USER: pacsd would run as root"
    user = users[-1]["value"].split(":")[0].strip()
    assert user not in ("root", "0", ""), f"USER {user} is root"
    runs = " ".join(i["value"] for i in _only(stage, "RUN"))
    useradd = re.search(r"useradd\s((?:[^&;|]|\\\n)*)", runs)
    assert useradd, "no useradd in the runtime stage"
    args = shlex.split(useradd.group(1))
    name = args[-1]
    uid = args[args.index("--uid") + 1] if "--uid" in args else None
    assert user in (name, uid), f"USER {user} is not the user created ({name}, uid {uid})"
    assert uid not in ("0", None), "the created user needs a fixed, non-zero uid"
    # The user must be able to write its data directory before the volume is mounted on it.
    assert re.search(rf"(chown|install -d -o)\s+({name}|{uid})\b.*{DATA_DIR}", runs)


def test_dockerfile_cmd_is_pacsd_serve():
    cmds = _only(_final_stage(_dockerfile()), "CMD")
    assert cmds, "no CMD"
    value = cmds[-1]["value"].strip()
    argv = json.loads(value) if value.startswith("[") else shlex.split(value)
    assert argv[:2] == ["pacsd", "serve"], argv
    entrypoints = _only(_final_stage(_dockerfile()), "ENTRYPOINT")
    assert not entrypoints, "an ENTRYPOINT would change what CMD runs"


def test_dockerfile_healthcheck_echoes_the_dicom_port():
    checks = _only(_final_stage(_dockerfile()), "HEALTHCHECK")
    assert len(checks) == 1
    value = checks[0]["value"]
    assert " CMD " in f" {value} ", value
    command = value.split("CMD", 1)[1]
    argv = shlex.split(command)
    assert argv[:3] == ["pacsd", "echo", "127.0.0.1"], argv
    assert str(DICOM_PORT) in argv[3], "health check must probe the DICOM port"
    # check_called_ae is on by default: the probe must call pacsd by its own AE title.
    assert "--aec" in argv, "health check must name pacsd's AE title as the called AE"
    assert DicomSettings().ae_title in argv[argv.index("--aec") + 1]


def test_dockerfile_stops_with_sigterm():
    signals = [i["value"].strip() for i in _only(_final_stage(_dockerfile()), "STOPSIGNAL")]
    assert signals == ["SIGTERM"]


def test_dockerfile_env_keeps_data_and_index_on_the_volume(monkeypatch):
    stage = _final_stage(_dockerfile())
    env: dict[str, str] = {}
    for instr in _only(stage, "ENV"):
        for token in shlex.split(instr["value"]):
            if "=" in token:
                key, _, val = token.partition("=")
                env[key] = val
    assert env.get("PACSD_STORAGE__DATA_DIR") == DATA_DIR
    assert env.get("PACSD_DATABASE__URL") == f"sqlite+aiosqlite:///{DATA_DIR}/index.db"
    assert env.get("PACSD_HTTP__BIND") == "0.0.0.0"
    # The settings code must read them back the way the image means them.
    for key, val in env.items():
        if key.startswith("PACSD_"):
            monkeypatch.setenv(key, val)
    settings = load_settings()
    assert settings.storage.data_dir == Path(DATA_DIR)
    db_path = Path(settings.database.url.split(":///", 1)[1])
    assert db_path.is_absolute() and db_path.parent == Path(DATA_DIR)
    assert settings.http.bind == "0.0.0.0"


def test_dockerfile_copy_sources_exist_and_reach_the_build_context():
    copies = [i for i in _dockerfile() if i["instruction"] in ("COPY", "ADD")]
    assert copies
    sources: list[str] = []
    for instr in copies:
        tokens = shlex.split(instr["value"])
        if any(t.startswith("--from") for t in tokens):
            continue  # copies between stages, not from the source tree
        paths = [t for t in tokens if not t.startswith("--")]
        assert len(paths) >= 2, instr["content"]
        sources += paths[:-1]
    assert sources
    for source in sources:
        assert not Path(source).is_absolute() and ".." not in Path(source).parts, source
        assert (ROOT / source).exists(), f"COPY source {source} is missing from the repo"
        assert not _dockerignored(source), f"COPY source {source} is excluded by .dockerignore"
    # What `pip install .` needs: pyproject.toml, the readme it names, the package.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    readme = pyproject["project"].get("readme")
    readme = readme.get("file") if isinstance(readme, dict) else readme
    needed = {"pyproject.toml", "pacsd"} | ({readme} if readme else set())
    copied = {str(PurePosixPath(s)) for s in sources}
    assert needed <= copied, f"not copied into the build stage: {needed - copied}"


def test_dockerignore_keeps_local_state_out():
    for path in (".venv", "var", ".git", "bench/results", "pacsd/__pycache__", "tests"):
        assert _dockerignored(path), f"{path} is sent to the Docker build context"
    assert not _dockerignored("pacsd/config.py")


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _compose_validator():
    try:
        import jsonschema
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ImportError as exc:  # pragma: no cover - the test extra installs both
        pytest.fail(f"{exc}: install the test extra, pip install -e '.[test]'")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    # Older copies name draft-07 by an id jsonschema does not know; read them as draft-07.
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_matches_the_compose_specification():
    validator = _compose_validator()
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(servcies=c.pop("services")),
        lambda c: c["services"]["pacsd"].update(restart=["unless-stopped"]),
        lambda c: c["services"]["pacsd"].update(prots=c["services"]["pacsd"]["ports"]),
    ],
    ids=["misspelt-top-level-key", "restart-as-list", "misspelt-service-key"],
)
def test_compose_schema_rejects_a_broken_file(breakage):
    """The schema check above can fail: a damaged copy of the file does not validate."""
    compose = _compose()
    breakage(compose)
    assert list(_compose_validator().iter_errors(compose))


def test_compose_service_builds_here_and_publishes_the_ports():
    service = _compose()["services"]["pacsd"]
    build = service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (COMPOSE_FILE.parent / context).resolve() == ROOT
    assert (ROOT / context / "Dockerfile").is_file()
    published = {str(p) for p in service["ports"]}
    assert f"{DICOM_PORT}:{DICOM_PORT}" in published
    assert f"{HTTP_PORT}:{HTTP_PORT}" in published
    assert service["restart"] == "unless-stopped"
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert _duration_seconds(service["stop_grace_period"]) > SHUTDOWN_GRACE


def test_compose_named_volumes_are_declared_and_hold_the_data_dir():
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    mounts: dict[str, str] = {}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source, _, target = volume.partition(":")
                target = target.split(":")[0]
            else:
                source, target = volume.get("source", ""), volume["target"]
            if source and not source.startswith((".", "/", "~")):
                mounts[target] = source
                assert source in declared, f"volume {source} is used but not declared"
    assert mounts.get(DATA_DIR) == "pacsd-data"
    assert "pacsd-data" in declared


# ---------------------------------------------------------------------------------------------
# config/pacsd.toml


def _sections() -> dict[str, type[BaseModel]]:
    """Settings field name -> model, for every [section] table of the config."""
    sections = {}
    for name, field in Settings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            sections[name] = field.annotation
    return sections


def _peer_model() -> type[BaseModel]:
    (model,) = typing.get_args(Settings.model_fields["peers"].annotation)
    return model


def test_settings_models_walked_are_the_documented_ones():
    """If a section or a peers type is added, this walk (and so the checks below) sees it."""
    assert set(_sections()) | {"peers"} == set(Settings.model_fields)
    assert set(_sections().values()) == {
        DicomSettings, HttpSettings, StorageSettings, DatabaseSettings, LoggingSettings,
        CommitmentSettings, IanSettings,
    }
    assert _peer_model() is Peer


def test_example_config_equals_the_embedded_defaults():
    from_file = load_settings(TOML_FILE)
    defaults = Settings()
    for section in _sections():
        for key in type(getattr(defaults, section)).model_fields:
            got = getattr(getattr(from_file, section), key)
            want = getattr(getattr(defaults, section), key)
            assert got == want, f"[{section}] {key} = {got!r} in pacsd.toml, default {want!r}"
    assert from_file.peers == defaults.peers == []
    assert from_file == defaults


def test_example_config_lists_every_key_of_every_section():
    data = tomllib.loads(TOML_FILE.read_text())
    assert set(data) == set(_sections()), "sections in pacsd.toml differ from Settings"
    for section, model in _sections().items():
        in_file, in_code = set(data[section]), set(model.model_fields)
        assert in_file == in_code, (
            f"[{section}] missing from pacsd.toml: {sorted(in_code - in_file)}; "
            f"not in the code: {sorted(in_file - in_code)}"
        )


def _commented_peers() -> list[dict]:
    """The commented-out [[peers]] example tables (a "# [[peers]]" line directly followed by
    "# key = value" lines), uncommented and parsed."""
    blocks: list[list[str]] = []
    taking = False
    for line in TOML_FILE.read_text().splitlines():
        body = re.sub(r"^#\s?", "", line) if line.startswith("#") else None
        if body is not None and body.strip() == "[[peers]]":
            taking = True
            blocks.append([])
        elif taking and body is not None and re.match(r"^\w+\s*=", body):
            blocks[-1].append(body)
        else:
            taking = False
    return [tomllib.loads("\n".join(block)) for block in blocks if block]


def test_example_config_documents_peers_in_comments():
    peers = _commented_peers()
    assert peers, "no commented [[peers]] example in pacsd.toml"
    model = _peer_model()
    fields = set(model.model_fields)
    required = {name for name, field in model.model_fields.items() if field.is_required()}
    for entry in peers:
        assert required <= set(entry) <= fields, f"peer example keys {sorted(entry)}"
        model.model_validate(entry)
    # Every key a peer can have is shown in at least one example.
    assert set().union(*(set(entry) for entry in peers)) == fields


def _documented_env() -> dict[str, str]:
    """`Env: PACSD_X__Y=value` examples in pacsd.toml, name -> value (quotes removed)."""
    examples = {}
    pattern = re.compile(r"Env(?: \([^)]*\))?:\s+(PACSD_\w+)=('([^']*)'|\S+)")
    for match in pattern.finditer(TOML_FILE.read_text()):
        examples[match.group(1)] = match.group(3) if match.group(3) is not None else match.group(2)
    return examples


def test_example_config_documents_the_env_form_of_every_key(monkeypatch):
    documented = _documented_env()
    file_values = tomllib.loads(TOML_FILE.read_text())
    expected_names = {
        f"PACSD_{section}__{key}".upper()
        for section, model in _sections().items()
        for key in model.model_fields
    }
    assert set(documented) == expected_names, (
        f"undocumented: {sorted(expected_names - set(documented))}; "
        f"stale: {sorted(set(documented) - expected_names)}"
    )
    # Each example, set on its own, must load and give the value it claims.
    for name, value in documented.items():
        section, key = name.removeprefix("PACSD_").lower().split("__")
        monkeypatch.setenv(name, value)
        got = load_settings().model_dump(mode="json")[section][key]
        monkeypatch.delenv(name)
        want = json.loads(value) if value.startswith("[") else file_values[section][key]
        if (section, key) in {("database", "url"), ("http", "public_url")}:
            # The file leaves these empty (SQLite inside data_dir; URLs from each request);
            # the examples show PostgreSQL and a reverse proxy's address.
            want = value
        if isinstance(want, str) and key == "data_dir":
            got, want = Path(got), Path(want)
        assert got == want, f"{name}={value} gives {got!r}"


def test_env_overrides_the_file(monkeypatch, tmp_path):
    assert load_settings(TOML_FILE).dicom.port == 11112
    monkeypatch.setenv("PACSD_DICOM__PORT", "11113")
    settings = load_settings(TOML_FILE)
    assert settings.dicom.port == 11113
    assert settings.dicom.ae_title == "PACSD"  # the rest of [dicom] still comes from the file

    # defaults < file < env, with a file value that differs from the default.
    custom = tmp_path / "pacsd.toml"
    custom.write_text('[dicom]\nport = 2000\nae_title = "FILEAE"\n[http]\nport = 9000\n')
    settings = load_settings(custom)
    assert (settings.dicom.port, settings.dicom.ae_title) == (11113, "FILEAE")
    assert settings.http.port == 9000 and settings.http.bind == "127.0.0.1"
    monkeypatch.delenv("PACSD_DICOM__PORT")
    assert load_settings(custom).dicom.port == 2000


def test_peers_from_env_json(monkeypatch, tmp_path):
    documented = re.search(r"PACSD_PEERS='([^']+)'", TOML_FILE.read_text())
    assert documented, "pacsd.toml does not show PACSD_PEERS"
    monkeypatch.setenv("PACSD_PEERS", documented.group(1))
    settings = load_settings(TOML_FILE)
    assert settings.peers == [Peer(ae_title="VIEWER", host="127.0.0.1", port=11113)]
    assert settings.peer("VIEWER ").port == 11113

    # The environment replaces the file's peers instead of merging with them.
    with_peers = tmp_path / "peers.toml"
    with_peers.write_text('[[peers]]\nae_title = "CT1"\nhost = "ct1"\nport = 104\n')
    assert [p.ae_title for p in load_settings(with_peers).peers] == ["VIEWER"]
    monkeypatch.delenv("PACSD_PEERS")
    assert [p.ae_title for p in load_settings(with_peers).peers] == ["CT1"]


# ---------------------------------------------------------------------------------------------
# config/pacsd.service


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(UNIT_FILE.read_text())
    return unit


def test_unit_runs_pacsd_serve_with_the_config():
    service = _unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/pacsd/.venv/bin/pacsd"
    assert argv[1:4] == ["serve", "--config", "/etc/pacsd/pacsd.toml"]
    assert service["User"] == "pacsd"
    assert service["WorkingDirectory"] == DATA_DIR
    assert service["Restart"] == "on-failure"


def test_unit_stops_with_sigterm_and_waits_past_the_shutdown_grace():
    service = _unit()["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert _duration_seconds(service["TimeoutStopSec"]) > SHUTDOWN_GRACE


def test_unit_is_hardened_but_can_write_its_data():
    service = _unit()["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert DATA_DIR in service["ReadWritePaths"].split()
    assert service["PrivateTmp"] == "yes"
    assert service["ProtectHome"] == "yes"
    # Port 104 support is documented but off: no capability unless the admin opts in.
    assert "AmbientCapabilities" not in service
    assert "# AmbientCapabilities=CAP_NET_BIND_SERVICE" in UNIT_FILE.read_text()
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def _systemd_verify(unit_text: str, tmp_path: Path) -> str:
    """Run `systemd-analyze verify` on unit_text; return what it says about the unit.

    verify insists that ExecStart's program exists, and /opt/pacsd is not installed on a
    development machine, so the copy under test points at a stub executable instead.
    It exits 0 even for unknown keys or bad values, so its output is the verdict.
    """
    stub = tmp_path / "pacsd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "pacsd.service"
    unit.write_text(unit_text.replace("/opt/pacsd/.venv/bin/pacsd", str(stub)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    about_unit = [line for line in output.splitlines() if "pacsd.service" in line]
    if result.returncode != 0:
        about_unit.append(f"exit status {result.returncode}: {output.strip()}")
    return "\n".join(about_unit)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed; the unit is only checked with configparser",
)
def test_unit_passes_systemd_analyze_verify(tmp_path):
    assert _systemd_verify(UNIT_FILE.read_text(), tmp_path) == ""
    # ...and it does speak up about a bad value in this unit.
    broken = UNIT_FILE.read_text().replace("[Service]\n", "[Service]\nKillSignal=SIGNOPE\n", 1)
    assert "SIGNOPE" in _systemd_verify(broken, tmp_path)
