"""Schemathesis hooks for the run against the demo (see schemathesis.toml).

A client sends a fresh Idempotency-Key with each new request. Schemathesis draws keys from the
schema and so reuses short ones ("0") across different bodies, which Tollgate rightly refuses
with 422 idempotency_key_mismatch. Each valid key it draws gets a unique suffix; an invalid one
is left as drawn, so the negative tests still send it.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"^[!-~]([ -~]*[!-~])?$")


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers or {}
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and VALID_KEY.match(key) and len(key) <= 255:
        headers["Idempotency-Key"] = key[:200] + "-" + uuid.uuid4().hex
        # A valid key stays valid: the case is what it was generated as. Without this,
        # schemathesis re-judges the edited case without the -H credentials (added later, at
        # send) and takes it for a call missing its Authorization.
        case._sync_validated_hashes()
