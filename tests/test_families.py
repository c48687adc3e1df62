"""Every seed family, both checkpoint layouts, through the running services.

For each family the tiny-checkpoint tool writes the same random weights in the transformers-native and the original
OpenGVLab layout. Greedy answers through the services must be identical for both layouts and equal to
`InternVLForConditionalGeneration.generate` on the native one. The AWQ variant's native twin holds its dequantized
weights, so the 4-bit path is checked against the same reference. InternLM2 families run with both tokenizer kinds:
the sentencepiece model (rebuilt by the services) and a Metaspace tokenizer.json as transformers' converter writes it
(whose word-boundary marker depends on where a text segment stands, so a prompt spliced from pieces would differ),
in the native layout.
The services run with standard input on a pipe nobody writes: a start-up that asks a question would hang there.
"""
import subprocess

import openai
import pytest

from tests.conftest import Reference, data_url, noise_image
from tools.make_tiny_checkpoint import FAMILIES, write_tiny_checkpoint
from tools.run_local import start_stack

VARIANTS = ([(family, False, "sentencepiece") for family in FAMILIES] + [("internvl2_5", True, "sentencepiece")]
            + [(family, False, "metaspace-first") for family, spec in FAMILIES.items() if spec.llm == "internlm2"])
SYSTEM = "You are a tiny test model."
IMAGE = noise_image(620, 410, seed=21)
QUESTIONS = [  # (OpenAI content, chat-template content, images)
    ("What is the capital of France?", [{"type": "text", "text": "What is the capital of France?"}], []),
    ([{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}, {"type": "text", "text": "Describe it."}],
     [{"type": "image"}, {"type": "text", "text": "Describe it."}], [IMAGE]),
]
MAX_NUM, MAX_TOKENS = 2, 12


def ask(stack, name: str) -> list[list[int]]:
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    answers = []
    for content, _, _ in QUESTIONS:
        r = client.chat.completions.create(
            model=name, max_tokens=MAX_TOKENS, temperature=0, extra_body={"max_num": MAX_NUM, "return_token_ids": True},
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}])
        answers.append(r.choices[0].token_ids)
    return answers


def variant_id(family: str, awq: bool, tokenizer: str) -> str:
    return family + ("-awq" if awq else "") + ("" if tokenizer == "sentencepiece" else f"-{tokenizer}")


@pytest.mark.parametrize("family,awq,tokenizer", VARIANTS, ids=[variant_id(*v) for v in VARIANTS])
def test_both_layouts_equal_the_reference(family, awq, tokenizer, redis_url, tmp_path_factory):
    root = tmp_path_factory.mktemp(variant_id(family, awq, tokenizer))
    answers = {}
    # The tokenizer's kind is the gateway's business, whatever the weights' layout: a Metaspace variant runs the native
    # layout only (the sentencepiece variants run both layouts of every family).
    layouts = ("native", "original") if tokenizer == "sentencepiece" else ("native",)
    for layout in layouts:
        path = write_tiny_checkpoint(root / layout, family=family, layout=layout, awq=awq, tokenizer=tokenizer)
        with open(root / f"{layout}.log", "w") as log:
            stack = start_stack(str(path), redis_url=redis_url, log=log, stdin=subprocess.PIPE, timeout_s=120,
                                extra_env={"CACHE_NAMESPACE": f"{root.name}-{layout}"})
            try:
                answers[layout] = ask(stack, layout)
            finally:
                stack.stop()
        assert "[y/N]" not in (root / f"{layout}.log").read_text()
    reference = Reference(root / "native")
    system = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
    expected = [reference.generate(system + [{"role": "user", "content": content}], images, MAX_NUM, MAX_TOKENS)
                for _, content, images in QUESTIONS]
    assert answers == dict.fromkeys(layouts, expected)
