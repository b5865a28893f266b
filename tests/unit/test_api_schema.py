"""The OpenAPI document checked into the repo is the one the code serves.

When this fails, the API changed: regenerate the file with
`python -m glide.api.app > glide/api/openapi.json` and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path

from glide.api.app import openapi_document

CHECKED_IN = Path(__file__).parents[2] / "glide" / "api" / "openapi.json"


def test_checked_in_openapi_matches_the_code():
    assert json.loads(CHECKED_IN.read_text()) == openapi_document()


def test_every_operator_endpoint_is_documented():
    paths = openapi_document()["paths"]
    want = {
        ("get", "/v1/health"), ("get", "/v1/ready"), ("get", "/v1/status"),
        ("get", "/v1/volumes"), ("post", "/v1/volumes"), ("get", "/v1/volumes/{name}"),
        ("patch", "/v1/volumes/{name}"), ("delete", "/v1/volumes/{name}"),
        ("post", "/v1/volumes/{name}/sync"), ("post", "/admin/handoff"),
        ("get", "/v1/handoff"), ("get", "/metrics"),
    }
    have = {(m, p) for p, ops in paths.items() for m in ops}
    assert want <= have, want - have
    create = paths["/v1/volumes"]["post"]
    assert {"409", "422", "413"} <= set(create["responses"])
