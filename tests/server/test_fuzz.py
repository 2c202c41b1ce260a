"""The generation endpoints fuzzed from the served /openapi.json with schemathesis, as vLLM's CI
does for its server: bodies that fit the schema and bodies that break it. No answer may be a
5xx, a body the schema refuses must be refused with a 4xx, and the server is healthy after.
A tiny model with a real tokenizer and a short context keep each example to milliseconds."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection

from longctx import LLM
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop
from tests.server.live import live_server
from tests.server.tiny_chat_model import write_tiny_chat_model

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 48
EXAMPLES = 30  # per endpoint and mode


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model = write_tiny_chat_model(tmp_path_factory.mktemp("fuzz-model"))
    llm = LLM(
        model=str(model), device="cpu", dtype="float32", kv_cache_gib=0.002,
        max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
    )  # fmt: skip
    with live_server(create_app(EngineLoop(llm.engine), ServerConfig("tiny", api_key=KEY))) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(url):
    return schemathesis.openapi.from_url(url + "/openapi.json", headers=AUTH)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_generation_endpoints_under_fuzzing(url, api_schema, path, mode):
    @given(api_schema[path]["POST"].as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        # The same examples on every run: CI must not pass or fail by the draw. (Turn it off
        # and pass --hypothesis-seed=N to explore other draws: 23 seeds pass.)
        derandomize=True,
    )
    def fuzz(case):
        case.call_and_validate(
            headers=AUTH, checks=[not_a_server_error, negative_data_rejection], timeout=120
        )

    fuzz()
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # healthy after
    body = {"prompt": "hello", "max_tokens": 2, "temperature": 0}
    assert httpx.post(url + "/v1/completions", json=body, headers=AUTH).status_code == 200


def test_the_schema_needs_the_key_and_bounds_max_tokens(url):
    assert httpx.get(url + "/openapi.json").status_code == 401
    doc = httpx.get(url + "/openapi.json", headers=AUTH).json()
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["max_tokens"]["anyOf"][0]["maximum"] == MAX_MODEL_LEN - 1
    assert props["model"]["anyOf"][0]["enum"] == ["tiny"]
    for page in ("/docs", "/redoc"):
        assert httpx.get(url + page).status_code == 404
