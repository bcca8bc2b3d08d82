"""CardioScan's configuration: one typed tree, read from defaults, a YAML file and the environment.

Precedence, lowest first: built-in defaults (embedded SQLite + spool under ``./var``, CPU),
the YAML file (``--config`` or ``CARDIOSCAN_CONFIG``), then environment variables
``CARDIOSCAN_<KEY>`` with ``__`` between nested keys, e.g. ``CARDIOSCAN_HTTP__PORT=8080`` or
``CARDIOSCAN_EHR__CLIENT_SECRET=...``. Lists are JSON in the environment:
``CARDIOSCAN_PACS='[{"name": "orthanc", "ae_title": "ORTHANC", "host": "pacs", "port": 4242}]'``.
Secrets are :class:`pydantic.SecretStr`, so ``cardioscan config show`` prints them masked.
"""

from __future__ import annotations

import difflib
import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "CARDIOSCAN_"
CONFIG_ENV = "CARDIOSCAN_CONFIG"
"""Environment variable naming the YAML file when ``--config`` is not given."""

OUTPUT_KINDS = ("json", "wfdb", "csv", "dicom", "fhir", "overlay")
"""Result files a worker can write for a job (see :mod:`service.outputs`)."""

DEFAULT_DIGITIZER = "pipeline.digitizer:digitize"

_yaml_path: ContextVar[Path | None] = ContextVar("cardioscan_yaml_path", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Section):
    """PEM files for TLS; TLS is on when ``cert_file`` and ``key_file`` are both set."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    """CA bundle used to verify peers (DICOM TLS mutual authentication)."""

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


MIN_API_KEY_CHARS = 16
"""Shorter keys are refused: an API key is a password that machines type."""

HttpAuth = Literal["none", "api-key"]


class ApiKey(_Section):
    """A client of the HTTP API: ``name`` is what the audit trail records, never the key."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    key: SecretStr

    @model_validator(mode="after")
    def _long_enough(self) -> ApiKey:
        if len(self.key.get_secret_value()) < MIN_API_KEY_CHARS:
            raise ValueError(
                f"API key {self.name!r} is shorter than {MIN_API_KEY_CHARS} characters; make "
                "one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return self


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    public_base_url: str | None = None
    """Base URL clients use to reach this server (for links in FHIR output); default
    derived from host and port."""
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    digitize_wait_seconds: float = Field(default=60.0, ge=0)
    """How long ``POST /api/v1/digitize`` waits for the result before answering 202."""
    tls: TlsSettings = TlsSettings()
    auth: HttpAuth | None = None
    """Who may call ``/api/v1`` and ``/fhir``: ``api-key`` (a key from ``api_keys`` as
    ``Authorization: Bearer <key>`` or ``X-API-Key``) or ``none``. Default: ``api-key``
    when keys are configured, else ``none`` (fine on loopback only)."""
    api_keys: list[ApiKey] = []

    @model_validator(mode="after")
    def _auth_resolved(self) -> HttpSettings:
        if self.auth is None:
            self.auth = "api-key" if self.api_keys else "none"
        if self.auth == "api-key" and not self.api_keys:
            raise ValueError("http.auth api-key needs at least one entry in http.api_keys")
        names = [k.name for k in self.api_keys]
        keys = [k.key.get_secret_value() for k in self.api_keys]
        if len(set(names)) != len(names) or len(set(keys)) != len(keys):
            raise ValueError("http.api_keys: every name and every key must be unique")
        return self

    @property
    def base_url(self) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        scheme = "https" if self.tls.enabled else "http"
        host = "localhost" if self.host in ("0.0.0.0", "::") else self.host
        return f"{scheme}://{host}:{self.port}"


class AllowedCaller(_Section):
    """A calling AE title the DICOM listener accepts, optionally pinned to a host."""

    ae_title: str
    host: str | None = None


class DicomSettings(_Section):
    enabled: bool = True
    ae_title: str = Field(default="CARDIOSCAN", max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_callers: list[AllowedCaller] = []
    """Empty: any calling AE title is accepted."""
    max_pdu: int = 0
    tls: TlsSettings = TlsSettings()


class PacsDestination(_Section):
    """A DICOM C-STORE destination for the ECG waveform object."""

    name: str
    ae_title: str = Field(max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False


EhrAuth = Literal["none", "bearer", "client_credentials", "smart-backend"]


class EhrSettings(_Section):
    """The EHR's FHIR endpoint; delivery is on when ``base_url`` is set."""

    name: str = "ehr"
    base_url: str | None = None
    auth: EhrAuth = "none"
    token: SecretStr | None = None
    """Static bearer token for ``auth: bearer``."""
    token_url: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    private_key_path: Path | None = None
    """PEM key that signs the SMART Backend Services JWT assertion."""
    key_id: str | None = None
    scope: str | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _auth_complete(self) -> EhrSettings:
        if self.base_url is None:
            return self
        missing: list[str] = []
        if self.auth == "bearer" and self.token is None:
            missing.append("token")
        if self.auth in ("client_credentials", "smart-backend"):
            missing += [k for k in ("token_url", "client_id") if getattr(self, k) is None]
        if self.auth == "client_credentials" and self.client_secret is None:
            missing.append("client_secret")
        if self.auth == "smart-backend" and self.private_key_path is None:
            missing.append("private_key_path")
        if missing:
            raise ValueError(f"ehr auth {self.auth!r} needs: {', '.join(missing)}")
        return self


class FolderDestination(_Section):
    """A directory that receives a copy of every job's result files (research archives)."""

    name: str
    path: Path


class Destination(BaseModel):
    """One configured delivery target, as the outbox sees it."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: Literal["pacs", "ehr", "folder"]
    config: PacsDestination | EhrSettings | FolderDestination


class Settings(BaseSettings):
    """The effective configuration of one CardioScan process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Path("var")
    database_url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///<data_dir>/cardioscan.db``. For several nodes:
    ``postgresql+psycopg://user:pass@host/db``."""
    spool_dir: Path | None = None
    """Received objects; default ``<data_dir>/spool``. Shared by every node."""
    results_dir: Path | None = None
    """Result files per job; default ``<data_dir>/results``. Shared by every node."""
    spool_min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Refuse new objects (DICOM 0xA700, HTTP 507) below this much free disk."""

    http: HttpSettings = HttpSettings()
    dicom: DicomSettings = DicomSettings()
    pacs: list[PacsDestination] = []
    ehr: EhrSettings = EhrSettings()
    folders: list[FolderDestination] = []
    fhir_version: Literal["R4", "R5"] = "R4"

    engine: str = "auto"
    """``auto``, ``classic`` or ``learned``; or ``package.module:function``, a callable with
    :func:`pipeline.digitizer.digitize`'s signature (custom engines, tests)."""
    device: str = "cpu"
    fs: int = Field(default=500, ge=200, le=1000)
    outputs: list[str] = list(OUTPUT_KINDS)

    workers: int = Field(default=1, ge=0)
    """Worker processes started by ``serve`` and ``worker``."""
    batch_size: int = Field(default=1, ge=1)
    lease_seconds: float = Field(default=60.0, gt=0)
    job_timeout_seconds: float = Field(default=120.0, gt=0)
    """Per page: past it the digitizer process is replaced and the attempt fails."""
    max_attempts: int = Field(default=3, ge=1)
    delivery_max_attempts: int = Field(default=10, ge=1)
    backoff_base_seconds: float = Field(default=5.0, ge=0)
    backoff_max_seconds: float = Field(default=900.0, ge=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)

    retention_days: float = Field(default=30.0, ge=0)
    """Spool files and results older than this are purged; 0 keeps them forever."""
    retention_check_seconds: float = Field(default=3600.0, gt=0)

    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """``cardioscan worker`` serves /metrics here (``serve`` uses the HTTP port)."""
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("outputs")
    @classmethod
    def _known_outputs(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(OUTPUT_KINDS))
        if unknown:
            raise ValueError(f"unknown output kinds {unknown}; known: {list(OUTPUT_KINDS)}")
        return v

    @model_validator(mode="after")
    def _unique_destination_names(self) -> Settings:
        names = [d.name for d in self.destinations()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {dupes}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        yaml_path = _yaml_path.get()
        if yaml_path is not None:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path),)
        return sources

    # Derived values ------------------------------------------------------------------

    @property
    def digitizer_target(self) -> str:
        """``module:function`` that digitizes one page."""
        return self.engine if ":" in self.engine else DEFAULT_DIGITIZER

    @property
    def engine_name(self) -> str:
        """The ``engine`` argument passed to the digitizer (``auto`` for a custom target)."""
        return "auto" if ":" in self.engine else self.engine

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'cardioscan.db'}"

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    @property
    def results_path(self) -> Path:
        return self.results_dir or self.data_dir / "results"

    def destinations(self) -> list[Destination]:
        """Every delivery target a finished job gets an outbox row for."""
        out = [Destination(name=p.name, kind="pacs", config=p) for p in self.pacs]
        if self.ehr.base_url:
            out.append(Destination(name=self.ehr.name, kind="ehr", config=self.ehr))
        out += [Destination(name=f.name, kind="folder", config=f) for f in self.folders]
        return out

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations() if d.name == name), None)

    def masked(self) -> dict[str, Any]:
        """The configuration as plain data with secrets and DB passwords masked."""
        from service.db.engine import shown_url

        data = self.model_dump(mode="json")  # SecretStr dumps as "**********"
        data["database_url"] = shown_url(self.db_url)
        data["spool_dir"] = str(self.spool_path)
        data["results_dir"] = str(self.results_path)
        return data


class ConfigFileError(ValueError):
    """The YAML file cannot be read as a configuration; ``str()`` says where and why."""


def _check_yaml(path: Path) -> None:
    """Refuse a file that is not YAML, or whose top level is not a mapping of keys."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigFileError(f"{path}{where} is not valid YAML: {problem or exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read {path}: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigFileError(
            f"{path} must hold a mapping of settings (e.g. 'http: {{port: 8080}}'), "
            f"not a {type(data).__name__}")


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the configuration: ``path`` (or ``$CARDIOSCAN_CONFIG``), then the environment.

    ``overrides`` win over both (tests, embedding). Raises ``FileNotFoundError``,
    :class:`ConfigFileError`, pydantic's ``ValidationError`` or pydantic-settings'
    ``SettingsError``; :func:`explain` words any of them for an operator.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    if path is not None:
        _check_yaml(path)
    token = _yaml_path.set(path)
    try:
        return Settings(**overrides)
    finally:
        _yaml_path.reset(token)


def load_settings_or_report(path: Path | None) -> Settings | None:
    """:func:`load_settings` for a command: when the configuration cannot be used, one
    ``configuration error`` message on stderr (see :func:`explain`) and None."""
    try:
        return load_settings(path)
    except Exception as exc:  # missing file, bad YAML, invalid settings
        print(f"cardioscan: configuration error: {explain(exc)}", file=sys.stderr)
        return None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation names (``X``, ``list[X]``, ``X | None`` ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings model that holds the key at ``loc`` (list indexes skipped)."""
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = _models_in(field.annotation) if field is not None else []
        if not inner:
            return None
        model = inner[0]
    return model


def explain(exc: BaseException) -> str:
    """A configuration failure in an operator's words: each bad key with what is wrong, and
    the environment variable that sets it. Values are never repeated (they may be secrets)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = tuple(err["loc"])
            key = ".".join(map(str, loc)) or "(top level)"
            env = ENV_PREFIX + "__".join(str(p).upper() for p in loc if isinstance(p, str))
            if err["type"] == "extra_forbidden":
                parent = _model_at(loc[:-1])
                known = list(parent.model_fields) if parent is not None else []
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else (
                    f"; known here: {', '.join(known)}" if known else "")
                lines.append(f"  {key}: unknown setting{hint}")
                continue
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  {key} ({env}): {msg}")
        count = len(lines)
        return f"{count} invalid setting{'s' if count != 1 else ''}:\n" + "\n".join(lines)
    if exc.__cause__ is not None and type(exc).__name__ == "SettingsError":
        return f"{exc}: {exc.__cause__}"  # e.g. a list variable that is not valid JSON
    return str(exc)
