"""The OpenAPI document of the server, built from the request models themselves.

The routes read their bodies by hand (size limit, strict JSON: see json_body.py), so FastAPI
cannot infer them; the document is assembled here from the pydantic models, with the bounds
that only this server knows filled in: the served model names, max_tokens within the context
limit, token ids within the vocabulary. A body valid by this document can still be refused for
what no schema can say (a prompt of too many tokens, special text a template alters); one
invalid by it is always refused with a 4xx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from longctx import __version__
from longctx.server.protocol import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {
    "400": "invalid request (JSON, a field, the context limit, the KV cache)",
    "401": "missing or wrong API key",
    "403": "a web page of an origin not allowed, or a non-loopback host name",
    "404": "unknown model",
    "413": "request body too large",
    "499": "the client closed the request",
    "500": "the engine failed while running the request",
    "503": "the server is shutting down",
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


@dataclass(frozen=True)
class ServedLimits:
    model_names: tuple[str, ...]
    max_model_len: int
    vocab_size: int


def openapi_document(limits: ServedLimits, api_key: bool) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for model in (CompletionRequest, ChatCompletionRequest):
        schemas.update(_model_schemas(model))
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        _bound(schemas[name], limits)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "longctx", "version": __version__},
        "paths": {
            "/v1/completions": _generation("CompletionRequest", "text_completion"),
            "/v1/chat/completions": _generation("ChatCompletionRequest", "chat.completion"),
            "/v1/models": {"get": _operation("the served model", None)},
        },
        "components": {"schemas": schemas},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


def _model_schemas(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    return {**defs, model.__name__: schema}


def _bound(schema: dict[str, Any], limits: ServedLimits) -> None:
    """The bounds of this server: names, output length (at least one prompt token), ids."""
    props = schema["properties"]
    props["model"]["anyOf"][0]["enum"] = list(limits.model_names)
    for field in ("max_tokens", "max_completion_tokens"):
        if field in props:
            props[field]["anyOf"][0]["maximum"] = limits.max_model_len - 1
    if "prompt" in props:
        _bound_ids(props["prompt"], limits.vocab_size - 1)


def _bound_ids(node: Any, largest: int) -> None:
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = largest
        for value in node.values():
            _bound_ids(value, largest)
    elif isinstance(node, list):
        for value in node:
            _bound_ids(value, largest)


def _generation(request_schema: str, obj: str) -> dict[str, Any]:
    body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=request_schema)}}},
    }
    return {"post": {**_operation(f"a {obj} object, or a stream of chunks", body)}}


def _operation(description: str, body: dict[str, Any] | None) -> dict[str, Any]:
    ok = {
        "description": description,
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    errors = {
        status: {
            "description": why,
            "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
        }
        for status, why in ERROR_STATUSES.items()
    }
    op: dict[str, Any] = {"responses": {"200": ok, **errors}}
    if body is not None:
        op["requestBody"] = body
    return op
