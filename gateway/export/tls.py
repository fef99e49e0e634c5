"""TLS settings shared by the destination kinds that may use it (syslog ``tls://``, NATS ``tls://``,
Splunk HEC ``https://``), and the small option checker the kinds share.

A destination's ``options`` may hold

* ``caCertificate``: the PEM of the certificate authority (or authorities) that signed the
  receiver's certificate, trusted instead of the system's store (a private PKI, a self-signed
  collector);
* ``verifyTls``: ``false`` turns certificate checking off (encrypted, but anyone can answer: for a
  lab only; the default is ``true``);
* ``serverName``: the name the certificate must carry, when it is not the URL's host (an address in
  the URL, a certificate issued for the service's name).

None of these is secret: a CA certificate is public.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from functools import lru_cache

TLS_OPTIONS = {"caCertificate": str, "verifyTls": bool, "serverName": str}
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


def context(options: dict) -> ssl.SSLContext:
    """A client TLS context for these options (built once per distinct setting)."""
    return _context(options.get("caCertificate"), options.get("verifyTls", True))


@lru_cache(maxsize=64)
def _context(pem: str | None, verify: bool) -> ssl.SSLContext:
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
