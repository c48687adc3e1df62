"""The OpenAI chat-completions request, validated at the edge (REST and gRPC both come through here)."""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


class ImageURL(BaseModel):
    url: str = Field(min_length=1, description="http(s) URL or data: URL of an image")
    detail: Literal["auto", "low", "high"] | None = None
    _data: bytes | None = PrivateAttr(default=None)  # raw bytes sent over gRPC, used instead of the URL


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def parts(self) -> list[TextPart | ImagePart]:
        return [TextPart(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not act on (user, logprobs=false, ...)

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2 ** 64)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_num: int | None = Field(default=None, ge=1, description="most tiles per image (the model cards' max_num)")
    return_token_ids: bool = Field(default=False, description="add the generated token ids to each choice (as vLLM)")

    def images(self) -> list[ImageURL]:
        return [p.image_url for m in self.messages for p in m.parts() if isinstance(p, ImagePart)]
