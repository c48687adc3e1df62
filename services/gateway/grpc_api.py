"""The public gRPC Gateway service: the chat-completions semantics of the REST API over gRPC."""
import time

import grpc
from google.protobuf.json_format import MessageToDict
from pydantic import ValidationError

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.gateway.chat import ChatService, total_usage
from services.gateway.errors import ApiError, invalid_request
from services.gateway.metrics import IN_FLIGHT, TTFT, Phases, request_done, request_id
from services.gateway.schema import ChatCompletionRequest, ImagePart, ImageURL, Message, TextPart, VideoPart, VideoURL


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, chat: ChatService):
        self.chat = chat

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        answers: dict[int, pb.ChatResponse] = {}
        async for r in self._stream(request, context, stream=False):
            a = answers.setdefault(r.index, pb.ChatResponse(id=r.id, model=request.model, index=r.index))
            a.text += r.text
            a.token_ids.extend(r.token_ids)
            a.logprobs.extend(r.logprobs)
            if r.finish_reason:
                a.finish_reason = r.finish_reason
                a.usage.CopyFrom(r.usage)
        choices = [answers[i] for i in sorted(answers)]
        answer = pb.ChatResponse()
        answer.CopyFrom(choices[0])
        if len(choices) > 1:
            answer.choices.extend(choices)
            answer.usage.CopyFrom(total_usage([c.usage for c in choices]))
        return answer

    async def ChatStream(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext):
        async for r in self._stream(request, context, stream=True):
            yield r

    async def ListModels(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelList:
        try:
            self._authenticate(context)
        except ApiError as e:
            await context.abort(e.grpc_code(), e.message)
        return pb.ModelList(models=[self.chat.model_name])

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.chat.api_keys.check(metadata.get("authorization"))

    async def _stream(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext, stream: bool):
        """The answer as ChatResponses: one per decoder message when streamed, else one per choice."""
        start, status, ttft, usages = time.perf_counter(), "CANCELLED", None, []  # CANCELLED unless it ends otherwise
        phases = Phases()
        rid = request_id(dict(context.invocation_metadata() or ()).get("x-request-id"))
        IN_FLIGHT.labels("grpc").inc()
        try:
            self._authenticate(context)
            with self.chat.admission.slot():
                chat_request = to_chat_request(request, stream)
                generate = await self.chat.prepare(chat_request, rid, phases=phases)
                sent = time.perf_counter()
                async for i, r in self.chat.generate(generate, chat_request):
                    if ttft is None:  # a final-only answer says when its first token came
                        first_s = r.first_token_s or time.perf_counter() - sent
                        phases.decoder(first_s, r.embeddings_s)
                        ttft = round(sent - start + first_s, 4)
                        TTFT.labels("grpc").observe(ttft)
                    if r.finish_reason:
                        usages.append(r.usage)
                    yield pb.ChatResponse(id=rid, model=request.model, text=r.text, token_ids=r.token_ids, index=i,
                                          logprobs=r.logprobs, finish_reason=r.finish_reason,
                                          usage=r.usage if r.finish_reason else None)
            status = "OK"
        except ApiError as e:
            status = e.grpc_code().name
            await context.abort(e.grpc_code(), e.message)
        finally:
            usage = total_usage(usages)
            request_done("grpc", rid, status, start, ttft, usage and usage.prompt_tokens,
                         usage and usage.completion_tokens, phases)


def to_chat_request(request: pb.ChatRequest, stream: bool) -> ChatCompletionRequest:
    """Validate a gRPC request with the same rules as REST; an invalid one is an ApiError 400."""
    fields = MessageToDict(request, preserving_proto_field_name=True)
    fields.pop("messages", None)
    if "seed" in fields:  # a uint64, which MessageToDict writes as a string (JSON's numbers stop at 2^53)
        fields["seed"] = int(fields["seed"])
    try:
        messages = [Message(role=m.role, content=[_part(p) for p in m.content]) for m in request.messages]
        return ChatCompletionRequest(messages=messages, stream=stream, **fields)
    except ValidationError as e:
        raise invalid_request(e.errors()) from e


def _part(part: pb.ContentPart) -> TextPart | ImagePart | VideoPart:
    kind = part.WhichOneof("part")
    for option in ("max_dynamic_patch", "detail"):
        if part.HasField(option) and kind not in ("image_url", "image_bytes"):
            raise ApiError(400, f"{option} is set on a content part that is not an image")
    if kind == "text":
        return TextPart(type="text", text=part.text)
    if kind in ("image_url", "image_bytes"):
        url = ImageURL(url=part.image_url if kind == "image_url" else "bytes:",
                       max_dynamic_patch=part.max_dynamic_patch if part.HasField("max_dynamic_patch") else None,
                       detail=part.detail if part.HasField("detail") else None)
        if kind == "image_bytes":
            url._data = part.image_bytes
        return ImagePart(type="image_url", image_url=url)
    if kind == "video":
        v, source = part.video, part.video.WhichOneof("source")
        if source is None:
            raise ApiError(400, "a video part has neither a url nor data")
        url = VideoURL(url=v.url if source == "url" else "bytes:",
                       num_segments=v.num_segments if v.HasField("num_segments") else None,
                       bound=[v.bound.start_s, v.bound.end_s] if v.HasField("bound") else None)
        if source == "data":
            url._data = v.data
        return VideoPart(type="video_url", video_url=url)
    raise ApiError(400, "a content part has neither text, an image nor a video")
