"""/openapi.json declares what the server really sends: the error body on every error
status, typed job specs per kind, and examples."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.service.conftest import live_server
from worker.kinds import KINDS


@pytest.fixture(scope="module")
def server(tiny_encoder_rm):
    with live_server(model=str(tiny_encoder_rm), max_items=4) as live:
        yield live


@pytest.fixture(scope="module")
def document(server) -> dict:
    return httpx.get(f"{server.url}/openapi.json").json()


def _validate(document: dict, name: str, instance: object) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    jsonschema.validate(instance, schema)


def test_errors_are_declared_with_the_real_body(document):
    assert "HTTPValidationError" not in json.dumps(document)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody"), (path, method, status)
    scoring = document["paths"]["/score"]["post"]["responses"]
    assert {"401", "404", "413", "415", "422", "429", "503"} <= set(scoring)
    assert "Retry-After" in scoring["429"]["headers"]
    assert "401" not in document["paths"]["/health"]["get"]["responses"]
    assert {"401", "404", "422", "503"} <= set(document["paths"]["/jobs/{job_id}"]["get"]["responses"])


def test_error_bodies_match_the_declared_schema(server, document):
    for response in (httpx.post(f"{server.url}/score", json={"items": []}),
                     httpx.post(f"{server.url}/score", json={"items": [{"prompt": "a", "response": "b"}] * 5}),
                     httpx.post(f"{server.url}/score", json={"items": [{"prompt": "a", "response": "b"}],
                                                             "model": "nope"}),
                     httpx.post(f"{server.url}/score", content=b"x", headers={"content-type": "text/plain"})):
        assert response.status_code in (404, 415, 422)
        _validate(document, "ErrorBody", response.json())


def test_job_specs_are_a_union_discriminated_by_kind(document):
    body = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    job_request = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert job_request["discriminator"]["propertyName"] == "kind"
    assert set(job_request["discriminator"]["mapping"]) == set(KINDS)
    train = document["components"]["schemas"]["TrainRMSpec"]
    assert "train_file" in train["required"] and train["additionalProperties"] is False
    for example in job_request["examples"]:
        _validate(document, "JobRequest", example)
    with pytest.raises(jsonschema.ValidationError):
        _validate(document, "JobRequest", {"kind": "train_rm", "spec": {"model": "minilm"}})


def test_main_request_models_carry_examples(document):
    schemas = document["components"]["schemas"]
    for name in ("ScoreRequest", "PreferenceRequest", "GetRewardRequest", "ClassifyRequest",
                 "PoolingRequest", "EmbeddingsRequest", "AdaptRequest", "AliasRequest"):
        assert schemas[name].get("examples"), name
        for example in schemas[name]["examples"]:
            _validate(document, name, example)
