"""The OpenAPI description of ssm-server's routes (request bodies from the pydantic models)."""

from __future__ import annotations

from servers.ssm_server import protocol as P

_ERROR = {"description": "OpenAI error body",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _post(summary: str, schema: str, errors=(400, 404)) -> dict:
    responses = {"200": {"description": "OK (text/event-stream when stream is true)"}}
    responses.update({str(code): _ERROR for code in errors})
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": responses}}


def _profile(summary: str, ok: dict) -> dict:
    """A profiling route: an optional body, 404 without --profile-dir, 409 out of turn."""
    body = {"type": "object", "properties": {"profile_prefix": {
        "type": "string", "description": "file name prefix of the trace (default ssm-server)"}}}
    responses = {**ok, **{str(code): _ERROR for code in (400, 404, 409, 500)}}
    return {"post": {"summary": summary, "requestBody": {"required": False, "content": {
        "application/json": {"schema": body}}}, "responses": responses}}


def openapi_spec() -> dict:
    schemas = {}
    for model in (P.CompletionRequest, P.ChatRequest, P.TokenizeRequest, P.DetokenizeRequest):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[model.__name__] = s
    schemas["Error"] = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "code": {"type": ["string", "integer", "null"]}, "param": {"type": ["string", "null"]}}}}}
    get = lambda summary: {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ssm-server", "version": "1",
                 "description": "OpenAI-compatible serving of Mamba, Mamba2 and hybrid models"},
        "paths": {
            "/v1/completions": _post("Text completion", "CompletionRequest", (400, 404, 429)),
            "/v1/chat/completions": _post("Chat completion", "ChatRequest", (400, 404, 429)),
            "/tokenize": _post("Prompt to token ids (vLLM's shape)", "TokenizeRequest"),
            "/detokenize": _post("Token ids to text (vLLM's shape)", "DetokenizeRequest"),
            "/v1/models": get("The served model"),
            "/health": get("200 when ready"),
            "/metrics": get("Prometheus metrics (ssm: prefix)"),
            "/openapi.json": get("This description"),
            "/start_profile": _profile("Start torch.profiler on the device thread (with --profile-dir; vLLM's route)",
                                       {"200": {"description": "Profiling: {}"}}),
            "/stop_profile": _profile("Stop profiling and write the Chrome trace (with --profile-dir; vLLM's route)",
                                      {"200": {"description": "The trace written and the engine steps profiled",
                                               "content": {"application/json": {"schema": {
                                                   "type": "object", "properties": {
                                                       "trace": {"type": "string"},
                                                       "steps": {"type": "integer"}}}}}}}),
        },
        "components": {"schemas": schemas},
    }
