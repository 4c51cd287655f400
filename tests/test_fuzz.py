"""Schema-driven fuzzing of every route with schemathesis, against a real server.

The service's own OpenAPI description (/schema/openapi.json) drives the requests: valid and
invalid bodies, parameters and methods for every operation, with a fixed seed and a bounded
number of examples, so a run is repeatable and takes a few minutes at most. Every check
schemathesis has must pass (no 5xx; responses that match the documented schemas, status
codes, content types and headers; input the schema forbids refused with a 4xx) but one:
``positive_data_acceptance``, which expects every schema-valid body to succeed, while some
refusals depend on state (a missing adapter directory, a conversation without a user turn).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from rag_service.settings import Settings
from tests.support import ENGINES, free_port, running_server

# Cases per operation and generation mode. The routes' validation is the same code on both
# engines; the postgres run (three times slower per case) checks what reaches the database.
MAX_EXAMPLES = {"embedded": 30, "postgres": 15}
DOCS = [
    {"id": "leave", "text": "Employees get 30 days of paid leave per year.", "metadata": {"n": 1}},
    {"id": "parking", "text": "Parking is free in garage B for all staff.", "metadata": {"n": 2}},
]


@pytest.fixture(scope="module", params=ENGINES)
def api_url(request, tmp_path_factory, embedder, fake_server) -> Iterator[tuple[str, int]]:
    import httpx

    database_url = None
    if request.param == "postgres":
        database_url = request.getfixturevalue("pg_cluster").create_database()
    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("fuzz"),
        port=free_port(),
        upstream_url=fake_server.url,
        upstream_read_timeout_s=2.0,
        rag_collection="kb",
    )
    with running_server(settings, embedder) as url:
        httpx.post(
            f"{url}/v1/collections/kb/documents", json={"documents": DOCS}, timeout=60
        ).raise_for_status()
        yield url, MAX_EXAMPLES[request.param]


def test_every_route_holds_to_its_schema(api_url):
    """Each operation of the schema, fuzzed in turn; every failure is collected and shown."""
    api_url, examples = api_url
    schema = schemathesis.openapi.from_url(f"{api_url}/schema/openapi.json")
    failures: dict[str, str] = {}
    operations = 0
    sent: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(mode))
            @settings(
                max_examples=examples,
                derandomize=True,  # a fixed seed: the same requests on every run
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],  # no shrinking: the first failure
            )
            def fuzz(case: schemathesis.Case) -> None:
                sent.append(case.operation.label)
                case.call_and_validate(
                    base_url=api_url,
                    timeout=60,
                    excluded_checks=[checks.positive_data_acceptance],
                )

            try:
                fuzz()
            except Unsatisfiable:  # nothing in this operation can be made invalid
                assert mode is GenerationMode.NEGATIVE, operation.label
            except BaseException as exc:  # one operation's failure must not hide the others
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:2000]
    assert operations >= 15
    assert len(sent) >= operations * examples  # the cases were really sent
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_hostile_shapes_are_answered_without_a_5xx(api_url):
    """The shapes of the second reliability round (tests/hostile.py), bombs at a size CI
    builds in milliseconds: each gets one of its right statuses, none a 5xx, and nothing of
    them is stored."""
    import httpx

    from tests.hostile import COLLECTION, cases

    url, _ = api_url
    with httpx.Client(base_url=url, timeout=60) as http:
        for case in cases(scale=0.01):
            answers = case.send(http)
            for resp in answers if isinstance(answers, list) else [answers]:
                assert resp.status_code in case.expect, (
                    case.name,
                    resp.status_code,
                    resp.text[:300],
                )
        names = [c["name"] for c in http.get("/v1/collections").json()["data"]]
        if COLLECTION in names:  # only what the Markdown case stored: a correct 200
            ids = [
                d["id"] for d in http.get(f"/v1/collections/{COLLECTION}/documents").json()["data"]
            ]
            assert ids == ["emphasis.md"], ids
