"""The OpenAI chat-completions request, validated at the edge (REST and gRPC both come through here)."""
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


# Strict types, as OpenAI's API: "yes", 1 or true for a boolean, 2.0 for an integer or true for a number are refused
# (400), never read as something the client may not have meant; an integer is a number.
class _Strict(BaseModel):
    """A part of a request in which an unknown field is refused (400), never silently dropped."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class ImageURL(_Strict):
    url: str = Field(min_length=1, description="http(s) URL or data: URL of an image")
    detail: Literal["auto", "low", "high"] | None = Field(
        default=None, description="low: the whole image as one tile; high: as many tiles as the server allows; "
                                  "auto: the request's max_num")
    max_dynamic_patch: int | None = Field(default=None, ge=1, description="most tiles for this image (as LMDeploy); "
                                          "overrides the request's max_num")
    _data: bytes | None = PrivateAttr(default=None)  # raw bytes sent over gRPC, used instead of the URL


class VideoURL(_Strict):
    url: str = Field(min_length=1, description="http(s) URL or data: URL of a video (mp4, webm, mkv, ...)")
    num_segments: int | None = Field(default=None, ge=1, description="frames sampled, one tile each (the cards' "
                                     "num_segments; default 8)")
    bound: Annotated[list[float], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[start_s, end_s]: sample only this span")
    _data: bytes | None = PrivateAttr(default=None)  # raw bytes sent over gRPC, used instead of the URL

    @model_validator(mode="after")
    def ordered_bound(self):
        if self.bound is not None and not (0 <= self.bound[0] < self.bound[1] and math.isfinite(self.bound[1])):
            raise ValueError("bound must be [start_s, end_s], finite, with 0 <= start_s < end_s")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


# The official client's answer message's fields beside role, content and refusal.
ANSWER_FIELDS = {"tool_calls", "function_call", "audio", "annotations"}


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` (OpenAI's newer name for the instructions) is a system message")
    content: str | Annotated[list[ContentPart], Field(min_length=1)]
    name: str | None = Field(default=None, description="the participant's name (accepted; the chat templates of "
                             "InternVL do not use it)")

    @field_validator("role")
    @classmethod
    def developer_is_system(cls, role: str) -> str:
        """OpenAI treats developer messages as system messages for models without the distinction (all of InternVL's
        templates): rendered as the system prompt, never as a role the template does not know."""
        return "system" if role == "developer" else role

    @model_validator(mode="before")
    @classmethod
    def answer_as_history(cls, fields):
        """An answer sent back as history (the official client's `message.model_dump()`) holds its other fields, null:
        accepted then; a value asks for what this server does not do (tool calls, audio) and is refused. An
        assistant's refusal (OpenAI's `refusal` with null content, or `refusal` parts) is what it said: its text; an
        assistant's null content is empty, as OpenAI's API allows."""
        if not isinstance(fields, dict):
            return fields
        for name in ANSWER_FIELDS & fields.keys():
            if fields[name] not in (None, []):
                raise ValueError(f"`{name}` in a message is not supported by this server")
        fields = {k: v for k, v in fields.items() if k not in ANSWER_FIELDS}
        refusal = fields.pop("refusal", None)
        if fields.get("role") != "assistant":
            if refusal is not None:
                raise ValueError("`refusal` is only allowed in an assistant message")
            return fields
        content = fields.get("content")
        if refusal is not None:
            if content not in (None, ""):
                raise ValueError("an assistant message has both `content` and `refusal`")
            fields["content"] = refusal
        elif content is None:
            fields["content"] = ""
        elif isinstance(content, list):
            fields["content"] = [{"type": "text", "text": p["refusal"]} if isinstance(p, dict) and
                                 p.get("type") == "refusal" and p.keys() == {"type", "refusal"} else p for p in content]
        return fields

    def parts(self) -> list[TextPart | ImagePart | VideoPart]:
        return [TextPart(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class StreamOptions(_Strict):
    include_usage: bool = False


# Options this server does not implement, with the values that mean "off". A request asking for more is refused
# rather than answered as if the option had been applied.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
               "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
               "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
               "web_search_options": (None,), "verbosity": (None,)}
# What OpenAI clients send that cannot change the answer: accepted and ignored. Any other unknown field is refused.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key"}

MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256


def _unencodable(value, path: str = "") -> str | None:
    """The path of the first string in `value` (parsed JSON) that cannot be encoded as UTF-8, else None."""
    if isinstance(value, str):
        return None if _utf8(value) else path
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and not _utf8(key):
            return path
        if (where := _unencodable(item, f"{path}.{key}" if path else str(key))) is not None:
            return where
    return None


def _utf8(text: str) -> bool:
    if text.isascii():  # O(1) in CPython: the common case costs nothing, however long the data URL
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)  # only IGNORED fields get this far

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, lt=2 ** 31)
    max_completion_tokens: int | None = Field(default=None, ge=1, lt=2 ** 31)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2 ** 64)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's sampling extensions
    top_k: int | None = Field(default=None, ge=-1, description="sample among the k most likely tokens (0, -1: all)")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="drop tokens below min_p x the top one's "
                                "probability")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0,
                                             description="> 1 discourages tokens of the prompt and the answer so far")
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2 ** 31)]] = Field(default_factory=list, max_length=64,
                                      description="more token ids that end the answer (as vLLM)")
    ignore_eos: bool = Field(default=False, description="do not stop at the template's end of turn (as vLLM)")
    min_tokens: int = Field(default=0, ge=0, lt=2 ** 31, description="no end of turn, stop token or stop string "
                            "before this many tokens (as vLLM)")
    add_generation_prompt: bool = Field(default=True, description="end the prompt with the assistant's turn opened "
                                        "(as vLLM; false: after the last message)")
    continue_final_message: bool = Field(default=False, description="the answer continues the final (assistant) "
                                         "message, which the prompt ends inside (as vLLM; needs "
                                         "add_generation_prompt false)")
    n: int = Field(default=1, ge=1, lt=2 ** 31, description="answers to generate (at most the server's MAX_N)")
    stop: list[str] = Field(default_factory=list, description="a string or up to 4 strings that end the answer "
                            "(not included in it, unless include_stop_str_in_output)")
    include_stop_str_in_output: bool = Field(default=False, description="the stop string that ends the answer is "
                                             "in its text (as vLLM)")
    logprobs: bool = Field(default=False, description="return each answer token's log-probability")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="with logprobs: this many most likely "
                                     "alternatives per token")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_num: int | None = Field(default=None, ge=1, description="most tiles per image (the model cards' max_num)")
    return_token_ids: bool = Field(default=False, description="add the generated token ids to each choice (as vLLM)")
    logit_bias: dict[Annotated[int, Field(ge=0, lt=2 ** 31, strict=False)],  # JSON's keys are strings
                     Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict, max_length=300, description="token id -> value added to its logit before sampling "
        "(the log-probabilities stay the model's own)")

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data):
        """OpenAI's parameters are nullable, null meaning the default: clients that send every parameter send nulls."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data):
        for name, value in data.items() if isinstance(data, dict) else ():
            if value not in UNSUPPORTED[name] if name in UNSUPPORTED else \
                    name not in cls.model_fields and name not in IGNORED:
                raise ValueError(f"`{name}` is not supported by this server")
        return data

    @model_validator(mode="before")
    @classmethod
    def refuse_lone_surrogates(cls, data):
        """JSON's \\ud800-style escapes can encode half a UTF-16 pair, which no tokenizer, protobuf or UTF-8 answer
        can carry: refused here, naming the field, instead of failing deep inside."""
        where = _unencodable(data)
        if where is not None:
            raise ValueError(f"{where or 'the request'}: the text is not valid Unicode (a lone surrogate escape such "
                             "as \\ud800)")
        return data

    @model_validator(mode="after")
    def stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        return self

    @model_validator(mode="after")
    def top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs` set to true")
        return self

    @model_validator(mode="after")
    def continue_an_assistant_message(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("`continue_final_message` needs `add_generation_prompt` set to false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("`continue_final_message` needs an assistant message last")
        return self

    @model_validator(mode="after")
    def min_tokens_within_max_tokens(self):
        most = self.max_completion_tokens or self.max_tokens
        if most is not None and self.min_tokens > most:
            raise ValueError(f"`min_tokens` ({self.min_tokens}) must be at most `max_tokens` ({most})")
        return self

    @field_validator("stop", mode="plain", json_schema_input_type=str | list[str] | None)
    @classmethod
    def stop_list(cls, value) -> list[str]:
        """One error that says what is accepted, rather than one per member of the union."""
        stop = [value] if isinstance(value, str) else [] if value is None else value
        if not (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and
                all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, each at "
                             f"most {MAX_STOP_CHARS} characters")
        return stop

    def images(self) -> list[ImageURL]:
        return [p.image_url for m in self.messages for p in m.parts() if isinstance(p, ImagePart)]


# The answers, as the OpenAPI document describes them (the chat answer is built as a plain dict, not validated again).
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every refused request."""
    error: ErrorDetail


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None
    token_ids: list[int] | None = Field(default=None, description="with return_token_ids")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens the decoder's prefix cache held (a chat's earlier turns, a "
                               "shared system prompt or image): not computed again")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    owned_by: str
    created: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Status(BaseModel):
    status: str
