"""clients/python/internvl_client.py's batch_chat against the real stack: answers in order, equal to one-by-one."""
import httpx
import pytest

from clients.python.internvl_client import batch_chat
from tests.conftest import data_url, noise_image, png_bytes
from tests.test_end_to_end import MODEL

SAMPLING = dict(max_tokens=8, temperature=0, max_num=2)


def test_batch_chat_answers_in_order_as_one_by_one(stack, client, tmp_path):
    images = [noise_image(200 + 37 * i, 300 - 23 * i, seed=500 + i) for i in range(4)]
    (tmp_path / "third.png").write_bytes(png_bytes(images[2]))
    questions = [f"Question {i}: what do you see?" for i in range(6)]
    # every kind of image the helper takes: bytes, a data URL, a file path, none
    sent = [png_bytes(images[0]), data_url(images[1]), tmp_path / "third.png", None, png_bytes(images[3]), None]
    answers = batch_chat(stack.gateway_url, MODEL, questions, sent, concurrency=3, **SAMPLING)
    one_by_one = []
    for question, image in zip(questions, [images[0], images[1], images[2], None, images[3], None]):
        content = ([{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []) + \
            [{"type": "text", "text": question}]
        one_by_one.append(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0,
            extra_body={"max_num": 2}).choices[0].message.content)
    assert answers == one_by_one and len(set(answers)) > 1  # distinct answers, so order is checked
    assert batch_chat(stack.gateway_url, MODEL, questions[3:4], **SAMPLING) == one_by_one[3:4]


def test_batch_chat_raises_on_a_refused_request(stack):
    with pytest.raises(httpx.HTTPStatusError):
        batch_chat(stack.gateway_url, "no-such-model", ["hi"], max_tokens=2)
    with pytest.raises(ValueError):
        batch_chat(stack.gateway_url, MODEL, ["a", "b"], [None])
    for shape in ({"stream": True}, {"n": 2}):  # one text per question: options that change the answer's shape
        with pytest.raises(ValueError, match="one text per question"):
            batch_chat(stack.gateway_url, MODEL, ["a"], **shape)
    assert batch_chat(stack.gateway_url, MODEL, ["a"], n=1, stream=False, max_tokens=1)[0] is not None


def test_batch_chat_raises_a_transport_error_when_no_server_answers():
    from tools.run_local import free_port
    with pytest.raises(httpx.ConnectError):
        batch_chat(f"http://127.0.0.1:{free_port()}", MODEL, ["hi"], max_tokens=2)
