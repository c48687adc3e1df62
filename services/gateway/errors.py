"""Client-facing errors: one exception type, rendered as OpenAI-style JSON on REST and as a status on gRPC."""
import re

import grpc


class ApiError(Exception):
    """A request the gateway refuses or cannot serve; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def __reduce__(self):  # raised in a preprocessing worker, re-raised in the gateway
        return ApiError, (self.status, self.message), self.__dict__

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC_CODES.get(self.status, grpc.StatusCode.INTERNAL)


_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def invalid_request(errors: list[dict]) -> ApiError:
    """The first of pydantic's validation errors, said plainly, naming the field as the client wrote it."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first['ctx']['error']}")
    if first["loc"] == ("body",) and first["type"] in ("model_attributes_type", "missing"):
        # JSON that is no object, no body, or a body FastAPI did not parse as JSON at all (curl -d sends a form's type)
        return bad_request("the request body must be a JSON object, sent with Content-Type: application/json")
    # A message's content is a string or a list of parts: the error of the branch the client did not take says
    # nothing useful ("should be a valid string" for a list with a bad part).
    if first["loc"][-1:] == ("str",) and first["type"] == "string_type" and len(errors) > 1:
        first = errors[1]
        if first["type"] == "list_type":
            first = first | {"msg": "Input should be a string or a list of content parts"}
    where = ".".join(_field_path(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    if where:
        return bad_request(f"{where}: {message}", where)
    # A rule across fields (the request's own validators) names the field it is about first: "`top_logprobs` needs"
    return bad_request(message, named.group(1) if (named := re.match(r"`(\w+)`", message)) else None)


def _field_path(loc: tuple) -> list[str]:
    """pydantic's location less what it adds for unions: the branch ("list[tagged-union[...]]") and a part's tag
    (`content.0.image_url.image_url.url`: the tag, then the field of the same name)."""
    path = []
    for part in map(str, loc):
        if part == "body" or "[" in part or (part == "str" and path[-1:] == ["content"]) or path[-1:] == [part]:
            continue
        path.append(part)
    return path
