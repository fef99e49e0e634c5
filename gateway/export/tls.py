"""TLS settings shared by the destination kinds that may use it (syslog ``tls://``, NATS ``tls://``,
Splunk HEC ``https://``), and the small option checker the kinds share.

A destination's ``options`` may hold

* ``caCertificate``: the PEM of the certificate authority (or authorities) that signed the
  receiver's certificate, trusted instead of the system's store (a private PKI, a self-signed
  collector);
* ``verifyTls``: ``false`` turns certificate checking off (encrypted, but anyone can answer: for a
  lab only; the default is ``true``);
* ``serverName``: the name the certificate must carry, when it is not the URL's host (an address in
  the URL, a certificate issued for the service's name);
* ``clientCertificate``: the PEM of the certificate (and its chain) the gateway presents when the
  receiver asks for one (mutual TLS).  Its private key is given beside the options as the
  destination's ``clientKey``: stored encrypted (gateway/vault.py, the ``client_key`` column),
  never shown or echoed, decrypted only to build the TLS context of a delivery.

None of the options is secret: certificates are public.  Python's ``ssl`` loads a certificate and
key only from files: they are written to a private temporary directory (mode 0700, files 0600),
loaded, and deleted at once, so the key is on disk only for that moment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import tempfile
from functools import lru_cache

from requests.adapters import HTTPAdapter

TLS_OPTIONS = {"caCertificate": str, "verifyTls": bool, "serverName": str, "clientCertificate": str}
PEM_BEGIN = "-----BEGIN CERTIFICATE-----"


def check_options(options: object, allowed: dict[str, type], kind: str) -> dict:
    """``options`` as a dict whose keys are among ``allowed`` with values of their types; a ``ValueError``
    naming the first problem otherwise."""
    if not isinstance(options, dict):
        raise ValueError("options must be an object")
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(
                f"a {kind} destination has no option '{str(key)[:40]}' "
                f"(it takes {', '.join(sorted(allowed))})"
            )
        wanted = allowed[key]
        if wanted is bool and not isinstance(value, bool):
            raise ValueError(f"option '{key}' must be true or false")
        if wanted is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"option '{key}' must be an integer")
        if wanted is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"option '{key}' must be a number")
        if wanted is str and (not isinstance(value, str) or not value or len(value) > 20000):
            raise ValueError(f"option '{key}' must be a non-empty string")
    return options


def check_tls(options: dict, uses_tls: bool) -> None:
    """The TLS options make sense: only with TLS, and a CA certificate that loads."""
    given = [key for key in TLS_OPTIONS if key in options]
    if given and not uses_tls:
        raise ValueError(f"option '{given[0]}' needs a TLS URL")
    pem = options.get("caCertificate")
    if pem is not None:
        if PEM_BEGIN not in pem:
            raise ValueError("option 'caCertificate' must be PEM ('-----BEGIN CERTIFICATE-----' ...)")
        try:
            _context(pem, True)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"option 'caCertificate' does not load: {exc}") from None


def check_client_certificate(options: dict, key: str | None) -> None:
    """Option ``clientCertificate`` and the key go together, and load as a pair."""
    cert = options.get("clientCertificate")
    if cert is None and key is None:
        return
    if cert is None:
        raise ValueError("'clientKey' needs option 'clientCertificate' (the certificate it belongs to)")
    if key is None:
        raise ValueError("option 'clientCertificate' needs 'clientKey' (its private key, PEM)")
    if PEM_BEGIN not in cert:
        raise ValueError("option 'clientCertificate' must be PEM ('-----BEGIN CERTIFICATE-----' ...)")
    try:
        _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key)
    except (ssl.SSLError, ValueError):
        raise ValueError(
            "option 'clientCertificate' and 'clientKey' do not load as a certificate and its key"
        ) from None


def context(options: dict, client_key: str | None = None) -> ssl.SSLContext:
    """A client TLS context for these options (built once per distinct setting; with a client
    certificate, a context of its own each time, which the caller keeps)."""
    if client_key and options.get("clientCertificate"):
        ctx = _build(options.get("caCertificate"), options.get("verifyTls", True))
        _load_pair(ctx, options["clientCertificate"], client_key)
        return ctx
    return _context(options.get("caCertificate"), options.get("verifyTls", True))


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    directory = tempfile.mkdtemp(prefix="gateway-tls-")  # 0700
    try:
        cert_file, key_file = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, text in ((cert_file, cert), (key_file, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
        ctx.load_cert_chain(cert_file, key_file)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class ContextAdapter(HTTPAdapter):
    """A ``requests`` adapter whose connections use one SSL context (a client certificate)."""

    def __init__(self, ctx: ssl.SSLContext, **kwargs) -> None:
        self.ctx = ctx
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self.ctx
        return super().init_poolmanager(*args, **kwargs)


def with_client_certificate(session, options: dict, client_key: str | None, destination_id: int):
    """``session`` with the destination's client certificate mounted for ``https://`` (or without
    one when it has none): mounted once per session and setting."""
    wanted = None
    if client_key and options.get("clientCertificate"):
        wanted = hashlib.sha256(
            f"{destination_id}|{options['clientCertificate']}|{client_key}|{sorted(options.items())}".encode()
        ).hexdigest()
    if getattr(session, "gateway_client_certificate", None) != wanted:
        session.mount("https://", ContextAdapter(context(options, client_key)) if wanted else HTTPAdapter())
        session.gateway_client_certificate = wanted
    return session


@lru_cache(maxsize=64)
def _context(pem: str | None, verify: bool) -> ssl.SSLContext:
    return _build(pem, verify)


def _build(pem: str | None, verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pem) if pem else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def requests_verify(options: dict) -> bool | str:
    """What ``requests``' ``verify=`` takes for these options: a CA bundle file, or a bool."""
    if not options.get("verifyTls", True):
        return False
    pem = options.get("caCertificate")
    return ca_file(pem) if pem else True


@lru_cache(maxsize=64)
def ca_file(pem: str) -> str:
    """A file holding ``pem`` (requests reads CA bundles from files), named by its digest."""
    digest = hashlib.sha256(pem.encode()).hexdigest()[:24]
    path = os.path.join(tempfile.gettempdir(), f"gateway-export-ca-{digest}.pem")
    if not os.path.exists(path):
        fd, scratch = tempfile.mkstemp(dir=tempfile.gettempdir(), suffix=".pem")
        with os.fdopen(fd, "w") as out:
            out.write(pem)
        os.replace(scratch, path)
    return path
