"""The model cards' `batch_chat` over the gateway's OpenAI API: one request per question, sent concurrently.

A single file with one dependency (httpx): copy it next to your code, or import it from a checkout.

    from internvl_client import batch_chat
    answers = batch_chat("http://localhost:8000", "InternVL2_5-4B", ["Describe the image.", "What is it?"],
                         images=["cat.jpg", "https://example.com/dog.png"], max_tokens=256, temperature=0)
"""
import asyncio
import base64
from pathlib import Path

import httpx

Image = str | Path | bytes | None  # http(s):// or data: URL, a file path, encoded bytes (PNG, JPEG, ...), or none


def batch_chat(base_url: str, model: str, questions: list[str], images: list[Image] | None = None, *,
               api_key: str | None = None, concurrency: int = 16, timeout_s: float = 600.0, **sampling) -> list[str]:
    """The answers to `questions`, in their order; question i is asked about images[i] (if any), the image first as
    the cards' `<image>\\n{question}`. `sampling` goes into each request as it is (max_tokens, temperature, max_num,
    ...), except what would change the answer's shape (`stream`, `n` other than 1: one text per question). At most
    `concurrency` requests are in flight; a request the server refuses or fails raises httpx.HTTPStatusError (its
    body the OpenAI error), a server that cannot be reached httpx.TransportError (e.g. httpx.ConnectError)."""
    if images is not None and len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    if sampling.get("stream") or sampling.get("n", 1) not in (1, None):
        raise ValueError("batch_chat returns one text per question: `stream` and `n` other than 1 do not apply")
    return asyncio.run(_batch_chat(base_url, model, questions, images or [None] * len(questions), api_key,
                                   concurrency, timeout_s, sampling))


async def _batch_chat(base_url, model, questions, images, api_key, concurrency, timeout_s, sampling) -> list[str]:
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # The pool's own limit matches ours, so no request waits inside httpx past its timeout.
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def ask(question: str, image: Image) -> str:
            content = ([{"type": "image_url", "image_url": {"url": _image_url(image)}}] if image is not None
                       else []) + [{"type": "text", "text": question}]
            async with limit:
                r = await http.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": content}], **sampling})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        return list(await asyncio.gather(*(ask(q, i) for q, i in zip(questions, images))))


def _image_url(image: Image) -> str:
    if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
        return image
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    # The gateway reads the format from the bytes themselves, whatever the declared type says.
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()
