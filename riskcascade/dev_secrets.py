"""Development TLS and token material, so that `riskcascade up` serves TLS with tokens on one machine with no set-up.

For each file the ``security`` settings need and that is missing, ``ensure_dev_material`` writes (mode 0600):

- a throwaway CA: ``ca_file``, its key beside it (``ca_key_path``),
- a server certificate for localhost, 127.0.0.1 and ::1 signed by it: ``tls_cert_file``, ``tls_key_file``,
- under mutual TLS, a client certificate signed by it: ``client_cert_file``, ``client_key_file``,
- one client ``dev`` with every role in ``tokens_file`` (only the token's SHA-256) and its token in
  ``client_token_file``.

Existing files are never overwritten. Production brings its own files and sets ``security.dev_material`` off.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from riskcascade.core.config import SecuritySettings

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
TOKEN_BYTES = 32  # 256 random bits, URL-safe text
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates are valid from a little before now
CA_NAME = "riskcascade development CA"
SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")
CLIENT_NAME = "riskcascade development client"
DEV_CLIENT = "dev"
DEV_ROLES = ["admin"]
TOKENS_HEADER = (
    "# riskcascade gRPC clients: name -> token_sha256 (hex SHA-256 of the bearer token) and roles or methods.\n"
    "# Roles: decide (Decide, DecideBatch, GetDecision, GetServiceInfo), feedback (SubmitFeedback), admin (all).\n"
    "# Written by `riskcascade up` for development; the token itself is in the client token file.\n"
)


class DevMaterialError(RuntimeError):
    """Dev material cannot be written without overwriting or guessing; the message names the file."""


def ca_key_path(ca_file: Path) -> Path:
    """Where the dev CA's private key lives: beside its certificate, with the suffix .key."""
    return ca_file.with_suffix(".key")


def needed_files(security: SecuritySettings) -> list[Path]:
    """The files the server and this repo's clients read under these settings."""
    files: list[Path] = []
    if security.tls:
        files += [security.ca_file, security.tls_cert_file, security.tls_key_file]
        if security.require_client_cert:
            files += [security.client_ca_file or security.ca_file, security.client_cert_file, security.client_key_file]
    if security.tokens:
        files += [security.tokens_file, security.client_token_file]
    return list(dict.fromkeys(files))


def missing_files(security: SecuritySettings) -> list[Path]:
    return [path for path in needed_files(security) if not path.exists()]


def ensure_dev_material(security: SecuritySettings) -> list[Path]:
    """Write the dev material for whichever needed file is missing; returns the files written."""
    written: list[Path] = []
    if security.tls:
        written += _ensure_pair(security, security.tls_cert_file, security.tls_key_file, server=True)
        if security.require_client_cert:
            written += _ensure_pair(security, security.client_cert_file, security.client_key_file, server=False)
    if security.tokens:
        written += _ensure_token(security)
    return written


def _ensure_pair(security: SecuritySettings, cert_file: Path, key_file: Path, server: bool) -> list[Path]:
    if cert_file.exists() and key_file.exists():
        return []
    _refuse_half(cert_file, key_file)
    ca_cert, ca_key, written = _ca(security)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(ca_cert, ca_key, key, server, security.dev_cert_days)
    _write_private(key_file, _key_pem(key))
    _write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return [*written, cert_file, key_file]


def _ca(security: SecuritySettings) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, list[Path]]:
    cert_file, key_file = security.ca_file, ca_key_path(security.ca_file)
    if cert_file.exists() and key_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        return x509.load_pem_x509_certificate(cert_file.read_bytes()), key, []
    _refuse_half(cert_file, key_file)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=security.dev_cert_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_file, _key_pem(key))
    _write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, [cert_file, key_file]


def _leaf(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey, server: bool,
    days: int,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    common_name = SERVER_NAMES[0] if server else CLIENT_NAME
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
    )
    if server:
        names = [x509.DNSName(n) for n in SERVER_NAMES] + [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_IPS]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _ensure_token(security: SecuritySettings) -> list[Path]:
    """A tokens file with one all-roles client, whose token is the client token file's (written if missing)."""
    if security.tokens_file.exists():
        return []
    written = []
    if security.client_token_file.exists():
        token = security.client_token_file.read_text().strip()
    else:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        _write_private(security.client_token_file, (token + "\n").encode())
        written.append(security.client_token_file)
    clients = {"clients": {DEV_CLIENT: {"token_sha256": hashlib.sha256(token.encode()).hexdigest(), "roles": DEV_ROLES}}}
    _write_private(security.tokens_file, (TOKENS_HEADER + yaml.safe_dump(clients, sort_keys=False)).encode())
    return [*written, security.tokens_file]


def _refuse_half(cert_file: Path, key_file: Path) -> None:
    present = [p for p in (cert_file, key_file) if p.exists()]
    if present:
        missing = cert_file if key_file.exists() else key_file
        raise DevMaterialError(
            f"{present[0]} exists but {missing} does not: bring the pair, or remove {present[0]} to get a dev one"
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only; never overwrite (O_EXCL)."""
    path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
