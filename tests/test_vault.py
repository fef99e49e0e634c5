"""One vault for every secret at rest (gateway/vault.py): ITSM credentials and export signing secrets.

The first key of ``GATEWAY_SECRETS_KEYS`` encrypts; every configured key and the key derived from
``GATEWAY_SECRET_KEY`` decrypt; ``gateway secrets rotate`` re-encrypts every stored secret with the
first key (the old ``gateway itsm new-key`` / ``rotate-secrets`` do the same)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from sqlalchemy import select

from gateway import vault
from gateway.cli import main
from gateway.export import secrets as export_secrets
from gateway.models import ExportDestination, ItsmConnection
from tests.itsm_sim import ServiceNowSim
from tests.test_export import create as create_export
from tests.test_itsm import _itsm, connect, sn_body

OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def test_first_key_encrypts_and_old_keys_and_the_secret_key_decrypt():
    sealed_by_secret_key = vault.encrypt({"SECRET_KEY": "s3cret"}, "whsec-value")
    sealed_by_old = vault.encrypt({"SECRETS_KEYS": OLD, "SECRET_KEY": "s3cret"}, "itsm-token")
    both = {"SECRETS_KEYS": f"{NEW},{OLD}", "SECRET_KEY": "s3cret"}
    assert vault.decrypt(both, sealed_by_secret_key) == "whsec-value"
    assert vault.decrypt(both, sealed_by_old) == "itsm-token"
    rotated = vault.rotate(both, sealed_by_old)
    assert vault.decrypt({"SECRETS_KEYS": NEW}, rotated) == "itsm-token"
    with pytest.raises(vault.SecretsUnavailable):
        vault.decrypt({"SECRETS_KEYS": OLD}, rotated)
    with pytest.raises(vault.SecretsUnavailable):  # another SECRET_KEY opens nothing
        vault.decrypt({"SECRET_KEY": "other"}, sealed_by_secret_key)
    with pytest.raises(vault.SecretsUnavailable):
        vault.encrypt({"SECRETS_KEYS": "not-a-key"}, "x")
    # the export module's seal/unseal are the vault
    assert export_secrets.unseal(both, export_secrets.seal({"SECRET_KEY": "s3cret"}, "v")) == "v"
    assert export_secrets.SecretUnreadable is vault.SecretsUnavailable


def test_gateway_secrets_rotate_reencrypts_itsm_and_export_secrets(gw, monkeypatch):
    sn = ServiceNowSim()
    try:
        gw.app.config["EXPORT_ALLOW_PRIVATE_TARGETS"] = True
        tenant, auth = _itsm(gw)
        gw.app.config["SECRETS_KEYS"] = None  # the export secret is sealed by the SECRET_KEY-derived key
        exporter = gw.partner("Exporter", [tenant], "exports.manage")
        made = create_export(gw, tenant, exporter, "http://127.0.0.1:9/")
        gw.app.config["SECRETS_KEYS"] = OLD
        connection = connect(gw, tenant, auth, sn_body(sn))
        monkeypatch.setenv("GATEWAY_DATABASE_URL", gw.app.config["DATABASE_URL"])
        monkeypatch.setenv("GATEWAY_SECRET_KEY", gw.app.config["SECRET_KEY"])
        monkeypatch.setenv("GATEWAY_SECRETS_KEYS", f"{NEW},{OLD}")
        runner = CliRunner()
        rotated = runner.invoke(main, ["secrets", "rotate"])
        assert rotated.exit_code == 0, rotated.output
        assert "1 ITSM connection(s) and 1 export destination(s)" in rotated.output
        only_new = {"SECRETS_KEYS": NEW}
        with gw.db.engine.connect() as conn:
            itsm_secret = conn.execute(
                select(ItsmConnection.secret).where(ItsmConnection.id == int(connection["id"]))
            ).scalar()
            export_secret = conn.execute(
                select(ExportDestination.secret).where(ExportDestination.id == int(made["id"]))
            ).scalar()
        assert vault.decrypt(only_new, itsm_secret) == "sn-password-0123456789"
        assert vault.decrypt(only_new, export_secret) == made["secret"]
        # the old ITSM commands are aliases
        assert len(runner.invoke(main, ["itsm", "new-key"]).output.strip()) == 44
        assert len(runner.invoke(main, ["secrets", "new-key"]).output.strip()) == 44
        monkeypatch.setenv("GATEWAY_SECRETS_KEYS", NEW)
        assert runner.invoke(main, ["itsm", "rotate-secrets"]).exit_code == 0
        monkeypatch.delenv("GATEWAY_SECRETS_KEYS")
        refused = runner.invoke(main, ["secrets", "rotate"])
        assert refused.exit_code == 1 and "GATEWAY_SECRETS_KEYS is not set" in refused.output
    finally:
        sn.stop()
