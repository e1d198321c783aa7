"""The API against its own OpenAPI document: schemathesis generates requests for every operation
(valid and invalid, with the token) and none is answered with a server error.

`make soak` runs the same with more examples against a real `podembed serve` and reports the slowest answer.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from pymongo.database import Database
from redis import Redis
from schemathesis.checks import not_a_server_error

from config.settings import Settings
from producer.web.api import create_app

TOKEN = "schema-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Examples per operation: the suite's share; `make soak` runs more.
EXAMPLES_PER_OPERATION = 25


def check_operations(schema: schemathesis.BaseSchema, examples: int, call: object) -> dict[str, int]:
    """Generate `examples` requests for each operation of `schema`, send each with `call(case)`, and count
    the status codes per operation; a server error fails at once, naming the request."""
    seen: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=examples, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            response = call(case)
            assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                                response.text[:300])
            answer = f"{case.operation.label} {response.status_code}"
            seen[answer] = seen.get(answer, 0) + 1

        check()
    return seen


def test_generated_requests_get_no_server_error(settings: Settings, redis: Redis, db: Database) -> None:
    app = create_app(settings.replace(api_token=TOKEN))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen = check_operations(schema, EXAMPLES_PER_OPERATION,
                            lambda case: case.call_and_validate(headers=AUTH, checks=[not_a_server_error]))
    labels = {label.rsplit(" ", 1)[0] for label in seen}
    assert {"POST /jobs", "GET /jobs", "GET /jobs/{job_id}", "POST /jobs/{job_id}/retry",
            "POST /jobs/{job_id}/cancel", "GET /search", "GET /healthz"} <= labels, labels
