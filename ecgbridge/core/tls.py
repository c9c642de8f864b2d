"""TLS for every connection ecgbridge makes or takes: one place that builds the SSL contexts and checks the files.

Server side (DICOM, MLLP, console) and client side (MLLP to an EHR, FHIR) share the
same profile, that of BCP 195 and the DICOM secure transport connection profiles:
TLS 1.2 or newer, forward-secret AEAD cipher suites only, no compression, no
renegotiation; optional client-certificate verification (mutual TLS) against a CA file.
Certificates and keys come from PEM files named in the configuration and are read only
here; a private key is never logged. :func:`check_files` is what ``ecgbridge config check``
runs: the files exist, parse, the key matches the certificate, and it is valid now.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ecgbridge.errors import ConfigError

if TYPE_CHECKING:  # loaded by check_files only: every gateway imports this module, few check certificates
    from cryptography import x509

__all__ = [
    "CIPHERS",
    "TlsFiles",
    "server_context",
    "client_context",
    "listener_context",
    "connection_context",
    "check_files",
]

#: TLS 1.2 suites allowed by BCP 195 (RFC 9325) with forward secrecy and AEAD; TLS 1.3 suites are all fine.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
#: Warn when a certificate expires within this time.
EXPIRY_WARNING = timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one TLS endpoint (paths already resolved against the config file's folder)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    #: CA certificates to trust: a server's clients (mutual TLS) or a client's servers.
    ca_file: Path | None = None


def _base(purpose: ssl.Purpose, min_version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return ctx


def _load_chain(ctx: ssl.SSLContext, files: TlsFiles, what: str) -> None:
    if files.cert_file is None or files.key_file is None:
        raise ConfigError(f"{what}: TLS needs cert_file and key_file")
    try:
        ctx.load_cert_chain(str(files.cert_file), str(files.key_file))
    except (OSError, ssl.SSLError) as exc:
        # the reason only: never the key's content
        raise ConfigError(
            f"{what}: cannot load {files.cert_file.name} / {files.key_file.name}: "
            f"{getattr(exc, 'reason', None) or exc.__class__.__name__}"
        ) from None


def server_context(
    files: TlsFiles, *, require_client_cert: bool = False, min_version: str = "1.2", what: str = "TLS listener"
) -> ssl.SSLContext:
    """The context a listener wraps its sockets in; with ``require_client_cert``, mutual TLS."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, min_version)
    _load_chain(ctx, files, what)
    if require_client_cert:
        if files.ca_file is None:
            raise ConfigError(f"{what}: require_client_cert needs ca_file (the CA that signs client certificates)")
        ctx.load_verify_locations(cafile=str(files.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif files.ca_file is not None:
        ctx.load_verify_locations(cafile=str(files.ca_file))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(
    files: TlsFiles, *, verify_hostname: bool = True, min_version: str = "1.2", what: str = "TLS connection"
) -> ssl.SSLContext:
    """The context for connecting to a TLS server: its certificate verified (system CAs or ``ca_file``)."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, min_version)
    if files.ca_file is not None:
        ctx.load_verify_locations(cafile=str(files.ca_file))
    ctx.check_hostname = verify_hostname
    if files.cert_file is not None or files.key_file is not None:
        _load_chain(ctx, files, what)
    return ctx


class _ListenerTls(Protocol):
    @property
    def require_client_cert(self) -> bool: ...
    @property
    def min_version(self) -> str: ...
    def files(self) -> TlsFiles: ...


class _ClientTls(Protocol):
    @property
    def verify_hostname(self) -> bool: ...
    @property
    def min_version(self) -> str: ...
    def files(self) -> TlsFiles: ...


def listener_context(tls: _ListenerTls | None, what: str) -> ssl.SSLContext | None:
    """A listener's configured ``tls`` block as a server context; None when it has none (plain TCP)."""
    if tls is None:
        return None
    return server_context(
        tls.files(), require_client_cert=tls.require_client_cert, min_version=tls.min_version, what=what
    )


def connection_context(tls: _ClientTls | None, what: str) -> ssl.SSLContext | None:
    """A destination's or EHR source's ``tls`` block as a client context; None: the library's defaults."""
    if tls is None:
        return None
    return client_context(tls.files(), verify_hostname=tls.verify_hostname, min_version=tls.min_version, what=what)


def _read_cert(path: Path) -> x509.Certificate:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def check_files(files: TlsFiles, what: str, *, now: datetime | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) about one endpoint's files: missing, unreadable, key not matching, expired."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    now = now or datetime.now(UTC)
    problems: list[str] = []
    warnings: list[str] = []
    cert: x509.Certificate | None = None
    for label, path in (("cert_file", files.cert_file), ("key_file", files.key_file), ("ca_file", files.ca_file)):
        if path is not None and not path.is_file():
            problems.append(f"{what}.{label}: {path} does not exist")
    if problems:
        return problems, warnings
    if files.cert_file is not None:
        try:
            cert = _read_cert(files.cert_file)
        except ValueError:
            problems.append(f"{what}.cert_file: {files.cert_file} is not a PEM certificate")
    if files.key_file is not None:
        try:
            key = serialization.load_pem_private_key(files.key_file.read_bytes(), password=None)
        except (ValueError, TypeError):
            problems.append(f"{what}.key_file: {files.key_file} is not an unencrypted PEM private key")
        else:
            if cert is not None and cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) != key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ):
                problems.append(f"{what}.key_file: the private key does not belong to the certificate in cert_file")
    if cert is not None:
        if cert.not_valid_after_utc <= now:
            problems.append(f"{what}.cert_file: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        elif cert.not_valid_before_utc > now:
            problems.append(
                f"{what}.cert_file: the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
            )
        elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
            warnings.append(f"{what}.cert_file: the certificate expires on {cert.not_valid_after_utc:%Y-%m-%d}")
    if files.ca_file is not None:
        try:
            x509.load_pem_x509_certificates(files.ca_file.read_bytes())
        except ValueError:
            problems.append(f"{what}.ca_file: {files.ca_file} holds no PEM certificate")
    return problems, warnings
