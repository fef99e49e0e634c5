"""Schemathesis over the whole spec, against the gateway on a real socket (PostgreSQL, Redis).

Generated requests, valid and invalid, for every operation, with a token holding every
scope and the path's tenant set to a real one: no answer may be a server error, and every
answer must match the response schema the spec documents for its status.  Bounded in
examples and time so the suite stays short; ``GATEWAY_FUZZ_EXAMPLES`` raises the bound.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT
from tests.factories import document, finding

EXAMPLES = os.environ.get("GATEWAY_FUZZ_EXAMPLES", "25")
MAX_TIME = os.environ.get("GATEWAY_FUZZ_SECONDS", "90")


def test_schemathesis_finds_no_server_error_and_no_schema_violation(pg_gw, live_server, redis_clean, tmp_path):
    cli = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert cli, "schemathesis is a test dependency"
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write alerts.write security.read alerts.manage admin",
                                     [tenant])
    token = pg_gw.token(client_id, secret)
    pushed = pg_gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical",
                             data=document([finding(f"f-{i}") for i in range(3)]),
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert pushed.status_code == 202
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f'[parameters]\n"path.tenant" = "{tenant}"\n'
        f'[generation]\nallow-x00 = true\ndatabase = "none"\n'
    )
    report = tmp_path / "report.json"
    result = subprocess.run(
        [cli, "--config-file", str(config), "run", str(ROOT / "openapi" / "openapi.yaml"),
         "--url", live_server.url, "-H", f"Authorization: Bearer {token}",
         "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
                     "content_type_conformance",
         "--phases", "coverage,fuzzing", "--max-examples", EXAMPLES, "--max-time", MAX_TIME,
         # one worker: on CPython 3.11 the ast module's recursion counter is not thread-safe, and
         # Hypothesis parses lambdas' source in both worker threads ("SystemError: AST constructor
         # recursion depth mismatch", a runtime error of the tool, not an answer of ours)
         "--workers", "1", "--seed", "8", "--no-color", "--suppress-health-check", "all",
         "--request-timeout", "30", "--report", "json", "--report-json-path", str(report)],
        capture_output=True, text=True, timeout=int(MAX_TIME) + 240, cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    if os.environ.get("GATEWAY_FUZZ_OUTPUT"):
        with open(os.environ["GATEWAY_FUZZ_OUTPUT"], "w") as saved:
            saved.write(output)
    assert result.returncode == 0, output[-20000:]
    assert "Response violates schema" not in output and "Server error" not in output, output[-20000:]
