"""Settings that hospital IT staff edit: one YAML file, validated by pydantic.

Errors name the file, the line and the field (``ConfigError.problems``). Secrets
never live in the file: a field ending in ``_env`` names the environment variable
that holds the secret, and a few well-known variables override the file:

- ``ECGBRIDGE_DATA_DIR``      -> ``data_dir``
- ``ECGBRIDGE_DATABASE_URL``  -> ``storage.database_url``
- ``ECGBRIDGE_BROKER_URL``    -> ``broker.url``

With no file at all the embedded defaults apply: data in ``./ecgbridge-data``,
SQLite, an embedded Redis broker, one worker, DICOM on 127.0.0.1:11112 and one
route sending every DICOM ECG to the diagnosis model.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from ecgbridge.core.tls import TlsFiles
from ecgbridge.errors import ConfigError

__all__ = [
    "Settings",
    "DicomListener",
    "Listeners",
    "ConsoleSettings",
    "OidcSettings",
    "RetentionSettings",
    "Storage",
    "Broker",
    "Workers",
    "ModelEntry",
    "EhrAuth",
    "FhirDestination",
    "OrderIdentifierSystems",
    "Hl7Destination",
    "MllpListener",
    "InboxListener",
    "Delivery",
    "EhrAuth",
    "EhrSource",
    "RouteMatch",
    "Route",
    "OverreadSettings",
    "load_settings",
    "default_settings",
    "check_config",
    "ConfigReport",
    "redact_url",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _http_url(value: str, field: str = "base_url") -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{field} must start with http:// or https://")
    return value.rstrip("/")


def _loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_https(url: str, allow_insecure_http: bool, field: str = "base_url") -> None:
    """Plain http:// only to this machine (a local proxy) or when explicitly allowed."""
    if url.startswith("http://") and not allow_insecure_http and not _loopback(url):
        raise ValueError(
            f"{field} {url} is plain http: patient data would cross the network unencrypted; use https:// "
            "(or set allow_insecure_http: true for a test system)"
        )


class ListenerTls(_Strict):
    """TLS on a listener: DICOM secure transport, MLLP over TLS, the console over HTTPS.

    TLS 1.2 or newer with the BCP 195 cipher suites; with ``require_client_cert``, only
    clients whose certificate ``ca_file`` signed may connect (mutual TLS).
    """

    cert_file: Path
    key_file: Path
    #: CA certificates of the clients (mutual TLS).
    ca_file: Path | None = None
    require_client_cert: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"

    def files(self) -> TlsFiles:
        return TlsFiles(self.cert_file, self.key_file, self.ca_file)

    @model_validator(mode="after")
    def _mutual(self) -> ListenerTls:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file: the CA that signs the clients' certificates")
        return self


class ClientTls(_Strict):
    """TLS when ecgbridge connects out (MLLP to an EHR, FHIR): whom to trust and, for mutual TLS, who we are."""

    #: CA certificates to trust; default: the system's.
    ca_file: Path | None = None
    #: Our certificate and key, when the receiver asks for one (mutual TLS).
    cert_file: Path | None = None
    key_file: Path | None = None
    verify_hostname: bool = True
    min_version: Literal["1.2", "1.3"] = "1.2"

    def files(self) -> TlsFiles:
        return TlsFiles(self.cert_file, self.key_file, self.ca_file)

    @model_validator(mode="after")
    def _pair(self) -> ClientTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate and its key)")
        return self


def _check_networks(values: list[str]) -> list[str]:
    for item in values:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from exc
    return values


class DicomListener(_Strict):
    enabled: bool = True
    ae_title: str = "ECGBRIDGE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    #: Empty list: any calling AE title is accepted.
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    #: Empty list: any address. Entries are IP addresses or CIDR networks.
    allowed_addresses: list[str] = Field(default_factory=list)
    #: Reject associations whose called AE title is not ``ae_title``.
    require_called_ae_title: bool = False
    max_associations: int = Field(16, ge=1)
    network_timeout_s: float = Field(60.0, gt=0)
    #: A larger C-STORE (as stored, file meta included) is refused with status 0xA700; an ECG is
    #: well under 1 MB. The object is written to a file as it arrives, never held whole in memory.
    max_object_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    #: DICOM secure transport (TLS); null: plain TCP.
    tls: ListenerTls | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not 1 <= len(v.strip()) <= 16:
            raise ValueError("an AE title has 1 to 16 characters")
        return v.strip()

    @field_validator("allowed_addresses")
    @classmethod
    def _nets(cls, v: list[str]) -> list[str]:
        return _check_networks(v)


class MllpListener(_Strict):
    """HL7 v2 over MLLP (ORU^R01 with waveforms, ORM^O01 / OML^O21 orders, ADT)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(2575, ge=0, le=65535)
    #: Empty list: any address. Entries are IP addresses or CIDR networks.
    allowed_addresses: list[str] = Field(default_factory=list)
    #: A message larger than this is refused with AR (and the connection keeps serving).
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    #: A connection with no complete frame for this long is closed.
    idle_timeout_s: float = Field(120.0, gt=0)
    #: A frame that was started must be complete within this time.
    frame_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(64, ge=1)
    #: MLLP over TLS; null: plain TCP.
    tls: ListenerTls | None = None

    _check_nets = field_validator("allowed_addresses")(lambda cls, v: _check_networks(v))


class InboxListener(_Strict):
    """A folder an ECG management system exports files to; each file is taken once."""

    enabled: bool = False
    #: Folder watched for new files; done/ and failed/ are created inside it.
    path: Path | None = None
    poll_interval_s: float = Field(2.0, gt=0)
    #: A file must be unchanged this long before it is taken (the exporter finished writing).
    settle_s: float = Field(1.0, ge=0)
    patterns: list[str] = Field(default_factory=lambda: ["*.dcm", "*.xml", "*.DCM", "*.XML"])

    @model_validator(mode="after")
    def _path(self) -> InboxListener:
        if self.enabled and self.path is None:
            raise ValueError("an enabled inbox needs path: the folder to watch")
        return self


class Listeners(_Strict):
    dicom: DicomListener = Field(default_factory=DicomListener)
    mllp: MllpListener = Field(default_factory=MllpListener)
    inbox: InboxListener = Field(default_factory=InboxListener)


class OidcSettings(_Strict):
    """Sign-in through an OpenID Connect provider (authorization code flow with PKCE).

    The provider says who someone is; ``role_mapping`` says what they may do here: the
    values of ``roles_claim`` map to console roles, the highest one counts, and a person
    with no mapped value is refused.
    """

    #: Shown on the login page as "Sign in with <name>".
    name: str = Field("single sign-on", min_length=1, max_length=64)
    #: The provider's issuer URL; its discovery document is <issuer>/.well-known/openid-configuration.
    issuer: str
    client_id: str = Field(min_length=1)
    #: Environment variable holding the client secret (never the secret itself); null: a public client.
    client_secret_env: str | None = None
    #: Scopes asked for; must include openid (add the one that releases roles_claim, e.g. groups).
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    #: The claim that names the console user.
    username_claim: str = "preferred_username"
    #: The claim holding the person's groups or roles (a list of strings, or one string).
    roles_claim: str = "groups"
    #: Claim value -> console role (viewer, operator or admin).
    role_mapping: dict[str, Literal["viewer", "operator", "admin"]]
    #: Let people without a console user sign in; they are created as OIDC-only users (no password).
    allow_unknown_users: bool = False
    #: The callback URL registered at the provider (behind a proxy: its public https URL);
    #: null: /login/oidc/callback on the console's URL as the browser reached it.
    redirect_url: str | None = None
    #: The issuer and every endpoint its discovery document names must be https.
    require_https: bool = True
    #: Tests only: with require_https false, plain http to the provider is accepted.
    allow_insecure_http: bool = False
    #: Seconds per request to the provider (discovery, keys, token).
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        return _http_url(v, "issuer")

    @field_validator("redirect_url")
    @classmethod
    def _redirect(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v, "redirect_url")

    @model_validator(mode="after")
    def _checks(self) -> OidcSettings:
        if "openid" not in self.scopes:
            raise ValueError("scopes must include openid")
        if not self.role_mapping:
            raise ValueError("role_mapping maps no claim value to a role: every sign-in would be refused")
        if self.require_https == self.allow_insecure_http:
            raise ValueError(
                "plain http to the provider is for tests only: it needs both require_https: false and "
                "allow_insecure_http: true (keep require_https: true otherwise)"
            )
        if self.require_https and not self.issuer.startswith("https://"):
            raise ValueError("issuer must be https:// (require_https is true)")
        return self


class ConsoleSettings(_Strict):
    """The operations console and its HTTP API (pages, JSON API, /metrics) on its own port."""

    enabled: bool = True
    #: 127.0.0.1 by default: put a TLS reverse proxy (or the console's own TLS) in front to open it.
    host: str = "127.0.0.1"
    #: 0 picks a free port (tests).
    port: int = Field(8080, ge=0, le=65535)
    #: HTTPS; null: plain HTTP (keep host 127.0.0.1 then, or put a TLS proxy in front).
    tls: ListenerTls | None = None
    #: Seconds a login stays valid without activity.
    session_idle_s: int = Field(8 * 3600, ge=60)
    #: Largest file accepted by "explain an uploaded file".
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    #: Failed logins for one user name (or from one address) before it is locked for login_lockout_s.
    login_max_failures: int = Field(5, ge=1)
    login_lockout_s: float = Field(300.0, gt=0)
    #: Optional sign-in through an OpenID Connect provider, next to the password form.
    oidc: OidcSettings | None = None


class RetentionSettings(_Strict):
    """How long message content and rows are kept (``ecgbridge prune``; the gateway every ``run_every_h``).

    Off by default: nothing is deleted unless a number of days is set.
    """

    #: Delete the content (inbound bytes, attachments, artifacts, the result's EHR values) of finished
    #: messages older than this; the row, its states, events and counts stay. None: never.
    content_days: int | None = Field(None, ge=1)
    #: Delete the rows too (message, result, deliveries, events) after this many days. None: never.
    metadata_days: int | None = Field(None, ge=1)
    #: Hours between the gateway's runs; 0: only by ``ecgbridge prune``.
    run_every_h: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> RetentionSettings:
        if self.content_days and self.metadata_days and self.metadata_days < self.content_days:
            raise ValueError("metadata_days must be at least content_days (rows go after their content)")
        if self.run_every_h and not (self.content_days or self.metadata_days):
            raise ValueError("run_every_h is set but neither content_days nor metadata_days: nothing to prune")
        return self


class Storage(_Strict):
    #: SQLAlchemy URL. Default: SQLite file in the data directory.
    #: PostgreSQL for scale: postgresql+psycopg://user@host:5432/ecgbridge
    database_url: str | None = None


class Broker(_Strict):
    #: Celery broker URL (redis://host:6379/0). Default: an embedded Redis
    #: started by ``ecgbridge run``, persisted in the data directory.
    url: str | None = None
    #: Seconds before an unacknowledged task is redelivered (Redis visibility timeout).
    visibility_timeout_s: int = Field(3600, ge=10)


class Workers(_Strict):
    #: Analysis worker processes ``ecgbridge run`` starts (0: run none, e.g. workers elsewhere;
    #: unset: one per CPU core).
    processes: int | None = Field(None, ge=0)
    #: Celery pool concurrency inside each worker process.
    concurrency: int = Field(1, ge=1)
    #: Delivery worker processes ``ecgbridge run`` starts beside the analysis workers (0: the
    #: analysis workers deliver too, as a plain ``ecgbridge worker`` does).
    delivery_processes: int = Field(1, ge=0)
    #: Threads of a delivery worker: deliveries it sends at once (each mostly waits on a receiver).
    delivery_threads: int = Field(8, ge=1)

    @property
    def analysis_processes(self) -> int:
        """``processes``, or the machine's CPU cores when it is not set."""
        return self.processes if self.processes is not None else max(1, os.cpu_count() or 1)


class ModelEntry(_Strict):
    name: str
    #: Directory with manifest.json + ONNX file; default: the model shipped with ecgbridge.
    path: Path | None = None


#: SMART Backend Services scopes that cover every query the EHR context fetch makes.
DEFAULT_SMART_SCOPE = "system/Patient.rs system/Observation.rs system/Condition.rs system/MedicationStatement.rs"
#: SMART scopes a FHIR destination needs: find the patient and the order (ServiceRequest), write the
#: report and what it references. Without ServiceRequest read the report names its order by identifier.
DEFAULT_SMART_WRITE_SCOPE = (
    "system/Patient.rs system/ServiceRequest.rs system/DiagnosticReport.cru system/Observation.cru "
    "system/Device.cru system/Provenance.crs"
)

_AUTH_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "bearer": ("token_env",),
    "smart-backend": ("client_id", "token_url", "private_key_file", "key_id", "scope"),
}


class EhrAuth(_Strict):
    """How ecgbridge authenticates to a FHIR server: an EHR source it reads, or a destination it writes to.

    ``smart-backend`` is SMART Backend Services (client_credentials with a signed JWT
    assertion): the private key stays in a file on the worker, never in this YAML.
    """

    type: Literal["none", "bearer", "smart-backend"] = "none"
    #: bearer: environment variable holding the token (never the token itself).
    token_env: str | None = None
    #: smart-backend: the client id the EHR registered for ecgbridge.
    client_id: str | None = None
    #: smart-backend: token endpoint; null = discovered from {base_url}/.well-known/smart-configuration.
    token_url: str | None = None
    #: smart-backend: PEM private key (RSA -> RS384, EC P-384 -> ES384); relative to this file.
    private_key_file: Path | None = None
    #: smart-backend: the ``kid`` of the registered public key (JWKS).
    key_id: str | None = None
    #: smart-backend: scopes asked for; null = read access to every resource the fetch uses.
    scope: str | None = None

    @field_validator("token_url")
    @classmethod
    def _token_url(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v, "token_url")

    @model_validator(mode="after")
    def _fields(self) -> EhrAuth:
        allowed = _AUTH_FIELDS[self.type]
        stray = [
            f for fields in _AUTH_FIELDS.values() for f in fields if f not in allowed and getattr(self, f) is not None
        ]
        if stray:
            raise ValueError(f"auth type {self.type!r} does not use {', '.join(sorted(set(stray)))}")
        if self.type == "bearer" and not self.token_env:
            raise ValueError("auth type 'bearer' needs token_env: the environment variable holding the token")
        if self.type == "smart-backend":
            missing = [f for f in ("client_id", "private_key_file", "key_id") if not getattr(self, f)]
            if missing:
                raise ValueError(f"auth type 'smart-backend' needs {', '.join(missing)}")
        return self

    @property
    def smart_scope(self) -> str:
        return self.scope or DEFAULT_SMART_SCOPE

    def token(self) -> str | None:
        """The bearer token from its environment variable (None unless ``type: bearer``)."""
        if self.type != "bearer" or not self.token_env:
            return None
        value = os.environ.get(self.token_env)
        if not value:
            raise ConfigError(f"environment variable {self.token_env} (FHIR bearer token) is not set")
        return value


class DestinationConfig(_Strict):
    """What every destination has: a unique name and a ``type`` that picks its sender.

    Each destination type subclasses this with ``type: Literal["<type>"] = "<type>"`` and
    its own fields, and is registered (:func:`register_destination_type`, which
    :func:`ecgbridge.outbound.sender.register_sender` calls), so the loader validates
    ``destinations[]`` entries by their ``type`` with file:line errors like any setting.
    """

    name: str
    type: str
    #: Sends to this destination at once, at most, in each worker process (a delivery worker's
    #: threads share it); null: as many as the delivery threads. Per process, not cluster-wide.
    max_in_flight: int | None = Field(None, ge=1)
    #: per_patient: a later ECG of a patient is not sent here while an earlier one of the same patient
    #: (received before it) still may be (not yet analysed, or its delivery here pending), across every
    #: worker process (:mod:`ecgbridge.core.ordering`); none: each delivery goes when it is ready.
    ordering: Literal["none", "per_patient"] = "none"
    #: A later ECG waits behind an earlier one at most this long after the earlier one was received;
    #: then it is sent anyway (an event on it names the ECG it went ahead of).
    ordering_max_wait_s: float = Field(600.0, gt=0)

    def wants_report(self) -> bool:
        """Whether what this destination is sent carries the rendered PDF / PNG report.

        The report is drawn only for results a destination (or a person) wants it for: a
        route whose destinations all say no analyses without rendering anything.
        """
        return False


class OrderIdentifierSystems(_Strict):
    """The identifier systems under which the EHR's ServiceRequests carry an ECG's order numbers.

    A report's ``basedOn`` finds its order by them (``ServiceRequest?identifier=<system>|<number>``)
    and names them when it refers to the order by identifier. One system each, because three
    parties issue the numbers (the ordering EHR the placer number, the ECG department the
    filler number, the worklist the accession number): under one system a placer number could
    match another order's filler number. Set them to the EHR's own (often ``urn:oid:...``).
    """

    placer: str = Field("urn:ecgbridge:placer-order", min_length=1)
    filler: str = Field("urn:ecgbridge:filler-order", min_length=1)
    accession: str = Field("urn:ecgbridge:accession", min_length=1)


class FhirDestination(DestinationConfig):
    type: Literal["fhir"] = "fhir"
    base_url: str
    #: none, bearer (token_env) or SMART Backend Services (smart-backend), as for EHR sources.
    auth: EhrAuth = Field(default_factory=EhrAuth)
    timeout_s: float = Field(10.0, gt=0)
    #: Identifier system of DICOM PatientID values in this EHR (used to find the Patient).
    patient_identifier_system: str = "urn:ecgbridge:patient-id"
    #: Identifier systems of the order numbers (placer, filler, accession) on the EHR's
    #: ServiceRequests: the report's ``basedOn`` finds its order by them.
    order_identifier_systems: OrderIdentifierSystems = Field(default_factory=OrderIdentifierSystems)
    #: auto: what the server's CapabilityStatement lists, best first: transaction, batch,
    #: individual (read once per worker process; a server refusing a whole transaction or
    #: batch gets the next mode from then on);
    #: individual: one conditional create per resource (works with every server);
    #: batch: one batch Bundle per layer of references (Devices, Observations, the report);
    #: transaction: the report and its Observations in one atomic transaction Bundle.
    write_mode: Literal["auto", "individual", "batch", "transaction"] = "auto"
    #: Send the rendered report (PDF, then the PNG page) as the DiagnosticReport's presentedForm.
    #: false: the report is not drawn for this destination (nor is the analysis held for it).
    presented_form: bool = True
    #: separate: one Observation per global measurement (heart rate, PR, QRS, QT, QTc, axes);
    #: panel: one Observation (LOINC 34534-8) with a component each, a third of the requests.
    measurements: Literal["separate", "panel"] = "separate"
    #: Whom to trust (CA file) and our client certificate, for https.
    tls: ClientTls | None = None
    #: Let base_url be plain http:// to another machine (test systems only).
    allow_insecure_http: bool = False

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v)

    @model_validator(mode="after")
    def _https(self) -> FhirDestination:
        _require_https(self.base_url, self.allow_insecure_http)
        return self

    def wants_report(self) -> bool:
        return self.presented_form


class Hl7Destination(DestinationConfig):
    """An HL7 v2 receiver (the EHR's interface engine) that takes ORU^R01 over MLLP."""

    type: Literal["hl7"] = "hl7"
    host: str
    port: int = Field(ge=1, le=65535)
    #: Seconds to wait for the ACK before the attempt counts as failed (and is retried).
    ack_timeout_s: float = Field(30.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    sending_application: str = "ECGBRIDGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    #: Attach the PDF report (OBX ED); false: the report is not drawn for this destination.
    include_report_pdf: bool = True
    #: MLLP over TLS to the receiver; null: plain TCP.
    tls: ClientTls | None = None
    #: persistent: one MLLP connection per worker process, kept open for the next message and
    #: used by one send at a time (messages to this receiver go out one after another, in order);
    #: per_message: a new connection for every message (several at once with delivery threads).
    connection: Literal["persistent", "per_message"] = "persistent"
    #: A persistent connection unused this many seconds is closed (opened again on the next message).
    idle_close_s: float = Field(60.0, gt=0)
    #: An HL7 interface files results in the order they come: per patient by default.
    ordering: Literal["none", "per_patient"] = "per_patient"

    def wants_report(self) -> bool:
        return self.include_report_pdf


class EhrSource(_Strict):
    """A FHIR R4 server the workers read patient context from (labs, vitals, problems, drugs)."""

    name: str
    base_url: str
    auth: EhrAuth = Field(default_factory=EhrAuth)
    #: Seconds per HTTP request.
    timeout_s: float = Field(5.0, gt=0)
    #: Seconds for the whole fetch of one ECG's context; past it the ECG goes on with what was read.
    total_timeout_s: float = Field(15.0, gt=0)
    #: Extra attempts per request after a transient failure (connection, timeout, 429, 5xx).
    retries: int = Field(2, ge=0, le=10)
    #: Identifier system of DICOM PatientID values in this EHR (used to find the Patient).
    patient_identifier_system: str = "urn:ecgbridge:patient-id"
    #: Labs and vitals older than this (before the ECG) are not read.
    observation_window_days: int = Field(365, ge=1)
    #: Search pages read per query at most (newest first); older results are left out and said so.
    max_observation_pages: int = Field(20, ge=1)
    #: Resources asked for per search page (``_count``); servers may cap it lower.
    page_size: int = Field(200, ge=10, le=1000)
    #: Also read MedicationStatement (loop diuretic, beta blocker, ACEi/ARB, MRA).
    fetch_medications: bool = True
    tls: ClientTls | None = None
    allow_insecure_http: bool = False

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v)

    @model_validator(mode="after")
    def _timeouts(self) -> EhrSource:
        if self.total_timeout_s < self.timeout_s:
            raise ValueError("total_timeout_s must be at least timeout_s")
        _require_https(self.base_url, self.allow_insecure_http)
        if self.auth.token_url is not None:
            _require_https(self.auth.token_url, self.allow_insecure_http, "auth.token_url")
        return self


#: Destination ``type`` -> its configuration class; the built-in types, then any registered.
_DESTINATION_TYPES: dict[str, type[DestinationConfig]] = {"fhir": FhirDestination, "hl7": Hl7Destination}


def register_destination_type(type_name: str, config_class: type[DestinationConfig]) -> None:
    """Let ``destinations[]`` entries with ``type: <type_name>`` validate as ``config_class``."""
    _DESTINATION_TYPES[type_name] = config_class


def destination_types() -> list[str]:
    return sorted(_DESTINATION_TYPES)


def _destination_by_type(value: Any) -> Any:
    """``type`` picks the destination model; it may be left out for FHIR (the first kind)."""
    if not isinstance(value, dict):
        return value
    type_name = str(value.get("type", "fhir"))
    config_class = _DESTINATION_TYPES.get(type_name)
    if config_class is None:
        raise ValueError(
            f"type {type_name!r} is not a destination type (expected one of: {', '.join(destination_types())})"
        )
    return config_class.model_validate(value)


Destination = Annotated[SerializeAsAny[DestinationConfig], BeforeValidator(_destination_by_type)]


class Delivery(_Strict):
    #: Attempts per destination before the delivery is dead-lettered.
    max_attempts: int = Field(10, ge=1)
    backoff_initial_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    #: How long one task holds a delivery it is sending before another may take it (a worker that
    #: died mid-send); longer than any one send takes.
    claim_s: float = Field(120.0, gt=0)


class OverreadSettings(_Strict):
    """Which senders' messages are cardiologists' confirmed reads (over-reads), and how they find their ECG.

    Deny by default: nothing is an over-read until a source is named here. An ORU^R01 without
    waveform from a sending application not listed stays refused as before (AR, "carries no
    waveform"); a DICOM SR from a calling AE title not listed is refused (0x0122). The rules
    are in ``ecgbridge.core.labels``.
    """

    #: MSH-3 sending applications (namespace id) whose ORU^R01 without waveform are over-reads.
    hl7_sending_applications: list[str] = Field(default_factory=list)
    #: Calling AE titles whose DICOM SR (and whose ECGs' annotations) are over-reads.
    dicom_calling_ae_titles: list[str] = Field(default_factory=list)
    #: Take the confirmed statements of vendor XML exports (Philips, GE MUSE) in the inbox as over-reads.
    inbox: bool = False
    #: Minutes either side of the read's acquisition time within which an ECG of the same patient
    #: is its ECG (the third linking rule: used when no SOP Instance UID or order number links it).
    link_window_min: float = Field(10.0, gt=0, le=24 * 60)

    def hl7_source(self, sending_application: str | None) -> bool:
        return bool(sending_application) and sending_application in self.hl7_sending_applications

    def dicom_source(self, calling_ae_title: str | None) -> bool:
        return bool(calling_ae_title) and (calling_ae_title or "").strip() in self.dicom_calling_ae_titles


SourceName = Literal["dicom", "hl7", "file"]
_ALL_SOURCES: tuple[SourceName, ...] = ("dicom", "hl7", "file")


class RouteMatch(_Strict):
    """Every listed criterion must hold; an empty list means "any"."""

    #: Message sources this route takes: dicom (C-STORE), hl7 (MLLP), file (inbox / local import).
    sources: list[SourceName] = Field(default_factory=lambda: list(_ALL_SOURCES))
    #: Calling AE titles (DICOM).
    calling_ae_titles: list[str] = Field(default_factory=list)
    #: SOP Class UIDs (DICOM).
    sop_class_uids: list[str] = Field(default_factory=list)
    #: MSH-3 sending application (HL7), namespace id.
    sending_applications: list[str] = Field(default_factory=list)
    #: MSH-4 sending facility (HL7), namespace id.
    sending_facilities: list[str] = Field(default_factory=list)
    #: MSH-9 message type as TYPE^EVENT, e.g. ORU^R01 (HL7).
    message_types: list[str] = Field(default_factory=list)
    #: OBX-3 identifiers (HL7); the route matches when any OBX carries one of them.
    obx_codes: list[str] = Field(default_factory=list)


class Route(_Strict):
    name: str
    match: RouteMatch = Field(default_factory=RouteMatch)
    models: list[str] = Field(default_factory=lambda: ["diagnosis"])
    #: Candidate models run on every ECG of the route beside ``models``: stored and shown, never
    #: delivered (``ecgbridge validate`` compares them; ``ecgbridge models promote`` makes one live).
    shadow_models: list[str] = Field(default_factory=list)
    destinations: list[str] = Field(default_factory=list)
    #: Name of an ``ehr`` source to read patient context from (LVEF model); null = ECG only.
    ehr_context: str | None = None

    @model_validator(mode="after")
    def _shadows_apart(self) -> Route:
        both = sorted(set(self.models) & set(self.shadow_models))
        if both:
            raise ValueError(f"{', '.join(map(repr, both))} cannot be both a live and a shadow model of the route")
        return self


def _default_routes() -> list[Route]:
    return [Route(name="all-ecg")]


class Settings(_Strict):
    data_dir: Path = Path("ecgbridge-data")
    listeners: Listeners = Field(default_factory=Listeners)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    storage: Storage = Field(default_factory=Storage)
    broker: Broker = Field(default_factory=Broker)
    workers: Workers = Field(default_factory=Workers)
    models: list[ModelEntry] = Field(default_factory=lambda: [ModelEntry(name="diagnosis")])
    destinations: list[Destination] = Field(default_factory=list)
    #: FHIR servers patient context is read from; routes name one in ``ehr_context``.
    ehr: list[EhrSource] = Field(default_factory=list)
    delivery: Delivery = Field(default_factory=Delivery)
    routes: list[Route] = Field(default_factory=_default_routes)
    #: Cardiologists' confirmed reads: which sources send them (``ecgbridge.core.labels``).
    overreads: OverreadSettings = Field(default_factory=OverreadSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Where this configuration came from (set by the loader, not by the file).
    source_file: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _references(self) -> Settings:
        problems = _reference_problems(
            [m.name for m in self.models],
            [d.name for d in self.destinations],
            [e.name for e in self.ehr],
            [(r.name, r.models, r.shadow_models, r.destinations, r.ehr_context) for r in self.routes],
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ----- derived values -------------------------------------------------
    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite:///{(self.data_dir / 'ecgbridge.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return self.broker.url is None

    @property
    def broker_socket(self) -> Path:
        return (self.data_dir / "broker" / "redis.sock").resolve()

    @property
    def broker_url(self) -> str:
        return self.broker.url or f"redis+socket://{self.broker_socket}"

    def destination(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"no destination named {name!r}")

    def route(self, name: str) -> Route:
        for r in self.routes:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.routes) or "none"
        raise ConfigError(f"no route named {name!r} (routes: {known})")

    def ehr_source(self, name: str) -> EhrSource:
        for e in self.ehr:
            if e.name == name:
                return e
        raise ConfigError(f"no EHR source named {name!r}")


def _reference_problems(
    model_names: list[str],
    dest_names: list[str],
    ehr_names: list[str],
    routes: list[tuple[str, list[str], list[str], list[str], str | None]],
) -> list[str]:
    """Names that must be unique and routes naming a model, destination or EHR source not listed.

    One function for :class:`Settings` and for the lenient pass over the raw YAML that
    :func:`load_settings` runs when field errors stop pydantic before it gets here.
    """
    problems = []
    for key, names in (("destinations", dest_names), ("ehr", ehr_names), ("routes", [r[0] for r in routes])):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            problems.append(f"{key}: names must be unique ({', '.join(map(repr, repeated))} used more than once)")
    models = set(model_names)
    for i, (_name, route_models, shadows, route_dests, ehr_context) in enumerate(routes):
        for m in route_models:
            if m not in models:
                problems.append(f"routes[{i}].models: {m!r} is not a model listed under models ({sorted(models)})")
        for m in shadows:
            if m not in models:
                problems.append(
                    f"routes[{i}].shadow_models: {m!r} is not a model listed under models ({sorted(models)})"
                )
        for d in route_dests:
            if d not in dest_names:
                problems.append(
                    f"routes[{i}].destinations: {d!r} is not a destination listed under destinations ({dest_names})"
                )
        if ehr_context is not None and ehr_context not in ehr_names:
            problems.append(
                f"routes[{i}].ehr_context: {ehr_context!r} is not an EHR source listed under ehr ({ehr_names})"
            )
    return problems


def _raw_names(items: Any) -> list[str]:
    if not isinstance(items, list):
        return []
    return [str(i["name"]) for i in items if isinstance(i, dict) and isinstance(i.get("name"), str | int)]


def _raw_strings(value: Any) -> list[str]:
    return [str(v) for v in value if isinstance(v, str | int)] if isinstance(value, list) else []


def _lenient_references(raw: dict[str, Any]) -> list[str]:
    """:func:`_reference_problems` over the raw YAML, reading only what has the right shape.

    The cross-references live in an ``after`` validator, which pydantic runs only once every
    field is valid; this pass lets ``config check`` report them with the field errors.
    """
    models = _raw_names(raw["models"]) if "models" in raw else ["diagnosis"]
    routes: list[tuple[str, list[str], list[str], list[str], str | None]] = []
    raw_routes = raw.get("routes", [{"name": "all-ecg"}])
    for i, r in enumerate(raw_routes if isinstance(raw_routes, list) else []):
        if not isinstance(r, dict):
            r = {}
        ehr_context = r.get("ehr_context")
        routes.append(
            (
                str(r.get("name", f"#{i}")),
                _raw_strings(r.get("models", ["diagnosis"])),
                _raw_strings(r.get("shadow_models")),
                _raw_strings(r.get("destinations", [])),
                str(ehr_context) if isinstance(ehr_context, str | int) else None,
            )
        )
    return _reference_problems(models, _raw_names(raw.get("destinations")), _raw_names(raw.get("ehr")), routes)


_ENV_OVERRIDES = {
    "ECGBRIDGE_DATA_DIR": ("data_dir",),
    "ECGBRIDGE_DATABASE_URL": ("storage", "database_url"),
    "ECGBRIDGE_BROKER_URL": ("broker", "url"),
}


def _apply_env(raw: dict[str, Any]) -> dict[str, Any]:
    for var, path in _ENV_OVERRIDES.items():
        value = os.environ.get(var)
        if not value:
            continue
        node = raw
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    return raw


def _line_index(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map every key path in a YAML document to its 1-based line number."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            lines.update({k: v for k, v in _line_index(value_node, path + (key,)).items() if k != path + (key,)})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_index(item, path + (i,)))
    return lines


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _parse_loc(text: str) -> tuple[Any, ...]:
    """'routes[0].models' -> ('routes', 0, 'models')."""
    parts: list[Any] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", text):
        parts.append(int(index) if index else name)
    return tuple(parts)


def _nearest_line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@", re.IGNORECASE)


def redact_url(text: str) -> str:
    """``text`` with the password of any URL in it masked (postgresql://u:secret@h -> u:********@h)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}********@", text)


def _problem_line(problem: str) -> int:
    """The line number of a 'file:line: ...' problem (for sorting); problems without one go last."""
    m = re.search(r":(\d+): ", problem)
    return int(m.group(1)) if m else 1 << 30


def load_settings(path: str | Path | None = None) -> Settings:
    """Load and validate a config file (or the embedded defaults when ``path`` is None)."""
    if path is None:
        try:
            return Settings.model_validate(_apply_env({}))
        except ValidationError as exc:
            raise ConfigError("environment overrides are invalid", [str(exc)]) from exc
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise ConfigError(f"{where}: not valid YAML", [f"{where}: {getattr(exc, 'problem', exc)}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{file}: the top level must be a mapping of settings",
            [f"{file}:1: expected keys such as listeners, routes"],
        )
    lines = _line_index(node) if node is not None else {}
    try:
        settings = Settings.model_validate(_apply_env(raw))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            line = _nearest_line(lines, loc)
            where = f"{file}:{line}" if line else str(file)
            field = _format_loc(loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling against config/ecgbridge.example.yaml)"
            if not loc and err["type"] == "value_error":
                # cross-field problems from Settings._references: each names its own field path
                for item in msg.split("; "):
                    sub_field, _, why = item.partition(": ")
                    sub_line = _nearest_line(lines, _parse_loc(sub_field))
                    problems.append(f"{file}:{sub_line or 1}: {sub_field}: {why}")
                continue
            problems.append(f"{where}: {field}: {msg}")
        for item in _lenient_references(raw):
            sub_field, _, why = item.partition(": ")
            sub_line = _nearest_line(lines, _parse_loc(sub_field))
            problem = f"{file}:{sub_line or 1}: {sub_field}: {why}"
            if problem not in problems:
                problems.append(problem)
        problems.sort(key=_problem_line)
        raise ConfigError(f"{file}: {len(problems)} problem(s) in the configuration", problems) from exc
    # absolute, not resolved: a Kubernetes ConfigMap mounts the file as a symbolic link that the
    # kubelet re-points on each update, so a reload must read the link again, not its old target
    settings.source_file = file.absolute()
    for auth in [source.auth for source in settings.ehr] + [
        d.auth for d in settings.destinations if isinstance(d, FhirDestination)
    ]:
        key = auth.private_key_file
        if key is not None and not key.is_absolute():
            auth.private_key_file = (file.resolve().parent / key).resolve()
    for block in tls_blocks(settings).values():
        for name in ("cert_file", "key_file", "ca_file"):
            value = getattr(block, name)
            if value is not None and not value.is_absolute():
                setattr(block, name, (file.resolve().parent / value).resolve())
    if not settings.data_dir.is_absolute() and "ECGBRIDGE_DATA_DIR" not in os.environ:
        settings.data_dir = (file.resolve().parent / settings.data_dir).resolve()
    return settings


def tls_blocks(settings: Settings) -> dict[str, ListenerTls | ClientTls]:
    """Every TLS block of the configuration by its place in the file (for path resolution and checks)."""
    blocks: dict[str, ListenerTls | ClientTls] = {}
    for name in ("dicom", "mllp"):
        tls = getattr(settings.listeners, name).tls
        if tls is not None:
            blocks[f"listeners.{name}.tls"] = tls
    if settings.console.tls is not None:
        blocks["console.tls"] = settings.console.tls
    for i, dest in enumerate(settings.destinations):
        tls = getattr(dest, "tls", None)
        if isinstance(tls, ListenerTls | ClientTls):
            blocks[f"destinations[{i}].tls"] = tls
    for i, source in enumerate(settings.ehr):
        if source.tls is not None:
            blocks[f"ehr[{i}].tls"] = source.tls
    return blocks


def default_settings() -> Settings:
    return load_settings(None)


@dataclass(frozen=True)
class ConfigReport:
    """What ``ecgbridge config check`` says: the settings (None when invalid), problems, warnings.

    Problems and warnings are 'file:line: field: why'; warnings (a key file that does not
    exist, a secret's environment variable that is not set) do not make the file invalid:
    they may well be in place on the machine the service runs on.
    """

    source: Path | None
    settings: Settings | None
    problems: list[str]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return self.settings is not None and not self.problems


def _walk(node: Any, loc: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], dict[str, Any], str, Any]]:
    """Every (path of the mapping, mapping, key, value) in a raw YAML document."""
    found: list[tuple[tuple[Any, ...], dict[str, Any], str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((loc, node, str(key), value))
            found += _walk(value, loc + (key,))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _walk(item, loc + (i,))
    return found


def _raw_warnings(raw: dict[str, Any], file: Path, lines: dict[tuple[Any, ...], int]) -> list[str]:
    warnings = []
    for loc, mapping, key, value in _walk(raw):
        if not isinstance(value, str) or not value.strip() or mapping.get("type") == "none":
            continue
        where = f"{file}:{_nearest_line(lines, loc + (key,)) or 1}: {_format_loc(loc + (key,))}"
        if key.endswith("_env") and not os.environ.get(value):
            warnings.append(
                f"{where}: environment variable {value} is not set here; the service reads the secret from it "
                "(set it in the service's environment)"
            )
        elif key.endswith("_file"):
            target = Path(value).expanduser()
            if not target.is_absolute():
                target = file.resolve().parent / target
            if not target.exists():
                warnings.append(f"{where}: file {target} does not exist")
            elif not target.is_file():
                warnings.append(f"{where}: {target} is not a file")
    return warnings


def check_config(path: str | Path | None = None) -> ConfigReport:
    """Validate a config file, reporting every problem at once, plus warnings; never raises ConfigError."""
    file = Path(path) if path is not None else None
    settings: Settings | None = None
    problems: list[str] = []
    try:
        settings = load_settings(file)
    except ConfigError as exc:
        problems = list(exc.problems) or [exc.message]
    warnings: list[str] = []
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
            raw = yaml.safe_load(text)
            node = yaml.compose(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            raw, node = None, None
        if isinstance(raw, dict):
            warnings = _raw_warnings(raw, file, _line_index(node) if node is not None else {})
    if settings is not None:
        from ecgbridge.core.tls import check_files

        for where, block in tls_blocks(settings).items():
            tls_problems, tls_warnings = check_files(block.files(), where)
            problems += [f"{file}: {p}" for p in tls_problems]
            warnings += [f"{file}: {w}" for w in tls_warnings]
    return ConfigReport(file, settings, problems, sorted(warnings, key=_problem_line))
