"""One typed settings object: embedded defaults < TOML file < PACSD_<SECTION>__<KEY> env.

config/pacsd.toml documents every key; keep it in step with the models here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# PS3.5 Table 6.2-1: AE is up to 16 chars of the default repertoire, no backslash or
# control characters; leading/trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

# Explicit VR Little Endian first: it keeps the VRs a later reader (dciodvfy, viewers)
# needs, and is what every modality proposes.
DEFAULT_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
]


def check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not _AE_TITLE.match(stripped):
        raise ValueError(
            f"AE title {value!r} must be 1-16 printable ASCII characters without a backslash"
        )
    return stripped


class Section(BaseModel):
    # A misspelt key is an error, not a silently ignored line.
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _lower_choices(cls, value, info):
        # "INFO" and "info" both work for the Literal-typed choices.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and getattr(annotation, "__origin__", None) is Literal:
            return value.lower()
        return value


class DicomSettings(Section):
    ae_title: str = "PACSD"
    port: int = Field(11112, ge=0, le=65535)
    bind: str = "0.0.0.0"
    check_called_ae: bool = True
    require_known_callers: bool = False
    # Largest P-DATA-TF PDU pacsd will receive; advertised in A-ASSOCIATE.
    max_pdu_length: int = Field(262144, ge=1024, le=16 * 1024 * 1024)
    # Acceptor's transfer-syntax preference, first wins when the requestor offers several.
    transfer_syntaxes: list[str] = Field(default_factory=lambda: list(DEFAULT_TRANSFER_SYNTAXES))
    # Seconds a connection may stay without an association PDU (ARTIM, PS3.8 9.1.5).
    artim_timeout: float = Field(30.0, gt=0)
    # Seconds without any PDU on an established association before it is aborted.
    network_timeout: float = Field(300.0, gt=0)
    # Seconds pacsd waits for a DIMSE response when it is the requestor.
    dimse_timeout: float = Field(60.0, gt=0)
    # What to do with a User Identity sub-item: "accept" answers a positive response
    # when asked for one, "ignore" leaves it unanswered (both let the association on).
    user_identity: Literal["accept", "ignore"] = "ignore"
    max_associations: int = Field(64, ge=1)
    # Seconds open associations get to finish after SIGTERM before they are aborted.
    shutdown_grace: float = Field(10.0, ge=0)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: check_ae_title(v)))


class HttpSettings(Section):
    # DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and WADO-URI, served from the daemon's own loop.
    enabled: bool = True
    port: int = Field(8042, ge=0, le=65535)
    bind: str = "127.0.0.1"
    # Where the DICOMweb resources live: http://host:port/dicom-web/studies...
    base_path: str = "/dicom-web"
    # The address clients reach pacsd at, e.g. "https://pacs.example.org" behind a reverse
    # proxy; BulkDataURIs in metadata are built from it. Empty: from the request's Host header.
    public_url: str = ""
    # Origins browser viewers may call from ("*" for any); empty: no CORS headers at all.
    cors_origins: list[str] = Field(default_factory=list)
    # Largest STOW-RS request body in bytes; a bigger one is answered 413 and nothing is stored.
    stow_max_bytes: int = Field(4 * 1024 ** 3, ge=1024)

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        value = "/" + value.strip("/")
        return "" if value == "/" else value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not re.match(r"^https?://[^/]+(/.*)?$", value):
            raise ValueError(f"public_url {value!r} must be an absolute http(s) URL")
        return value


def _default_ingest_processes() -> int:
    """One core is the event loop's; the others, up to four, parse."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class StorageSettings(Section):
    data_dir: Path = Path("./var")
    duplicates: Literal["keep", "overwrite", "reject"] = "keep"
    # Below this many free bytes on the data disk, C-STORE answers A700 (out of resources)
    # instead of filling the disk.
    min_free_bytes: int = Field(256 * 1024 * 1024, ge=0)
    # SOP classes to accept for storage beyond the standard ones pynetdicom lists.
    extra_sop_classes: list[str] = Field(default_factory=list)
    # Threads for blocking work: parsing headers, hashing, fsync, rename.
    workers: int = Field(4, ge=1, le=64)
    # Processes that parse received instances and write their blobs, so that ingest uses
    # more than one core; 0 parses in the threads above. "auto": one per core but one, at
    # most four.
    ingest_processes: int | Literal["auto"] = "auto"

    @field_validator("ingest_processes")
    @classmethod
    def _process_count(cls, value: int | str) -> int | str:
        if value != "auto" and not 0 <= value <= 64:
            raise ValueError("ingest_processes must be \"auto\" or a number from 0 to 64")
        return value

    @property
    def ingest_process_count(self) -> int:
        if self.ingest_processes == "auto":
            return _default_ingest_processes()
        return self.ingest_processes

    @field_validator("extra_sop_classes")
    @classmethod
    def _uids(cls, value: list[str]) -> list[str]:
        from pacsd.uid import uid_problem

        for uid in value:
            if problem := uid_problem("extra SOP class", uid):
                raise ValueError(problem)
        return value

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


class DatabaseSettings(Section):
    # Empty: an SQLite file index.db inside storage.data_dir.
    url: str = ""


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": JSON lines when stderr is not a terminal, coloured console otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class CommitmentSettings(Section):
    # Seconds before the first retry of an undelivered N-EVENT-REPORT; doubled on each try.
    retry_seconds: float = Field(5.0, gt=0)
    # Longest wait between two tries.
    max_retry_seconds: float = Field(600.0, gt=0)
    # An undelivered report is given up (logged, state "expired") after this many seconds.
    expire_seconds: float = Field(7 * 24 * 3600.0, gt=0)


class IanSettings(Section):
    # An IAN goes out once a study has had no new instance for this many seconds.
    study_quiet_seconds: float = Field(30.0, ge=0)
    retry_seconds: float = Field(10.0, gt=0)
    max_retry_seconds: float = Field(600.0, gt=0)
    expire_seconds: float = Field(7 * 24 * 3600.0, gt=0)


class Peer(Section):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    # Send this peer Instance Availability Notifications (a RIS, another archive).
    ian: bool = False

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: check_ae_title(v)))


_toml_path: Path | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PACSD_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    commitment: CommitmentSettings = Field(default_factory=CommitmentSettings)
    ian: IanSettings = Field(default_factory=IanSettings)
    peers: list[Peer] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_toml_path))
        return tuple(sources)

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        if not self.database.url:
            self.database.url = f"sqlite+aiosqlite:///{self.storage.data_dir / 'index.db'}"
        seen: set[str] = set()
        for peer in self.peers:
            if peer.ae_title in seen:
                raise ValueError(f"peer AE title {peer.ae_title!r} is configured twice")
            seen.add(peer.ae_title)
        return self

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None


def load_settings(path: Path | str | None = None) -> Settings:
    """Read the TOML file (if any) with environment overrides on top."""
    global _toml_path
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
    _toml_path = Path(path) if path is not None else None
    try:
        return Settings()
    finally:
        _toml_path = None
