"""Check the services against the original OpenGVLab code (`InternVLChatModel.chat`) on tiny original checkpoints.

Not part of `make test`: it needs a checkout of github.com/OpenGVLab/InternVL (its code is not vendored here), plus
`einops` on the path. For each family it writes a tiny original-layout checkpoint, asks the original model through
`model.chat()` (which builds the prompt with the checkpoint's conversation template) and the running services the
same questions, greedy, and compares the tokens.

    python -m tools.compare_with_opengvlab --internvl /path/to/InternVL/internvl_chat [--families ...]

InternVL-Chat-V1-5 ships the 1.5-era conversation.py (English InternLM system prompt): point --internvl-v1-5 at a
checkout of that era (e.g. commit a08ba33's internvl_chat) for that family, or it is compared with HEAD's template.
"""
import argparse
import base64
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

QUESTIONS = [("text", "What is the capital of France?", False), ("image", "Describe it.", True)]
MAX_NUM, MAX_TOKENS = 2, 12


def reference(internvl: str, ckpt: str, image: str) -> dict:
    """Run in a subprocess: the original package is also called `internvl`, like our generated stubs."""
    import torch
    from torch import nn

    sys.path[:0] = [internvl, str(Path(__file__).resolve().parent.parent / "tests")]
    # Training-only imports of the original code, stubbed: DropPath (identity at inference) and peft (LoRA).
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = type("DropPath", (nn.Identity,), {"__init__": lambda self, *a, **k: nn.Identity.__init__(self)})
    sys.modules.update({"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                        "timm.models.layers": layers, "peft": types.ModuleType("peft")})
    sys.modules["peft"].LoraConfig = sys.modules["peft"].get_peft_model = None
    from internvl.model.internvl_chat import InternVLChatModel
    del sys.modules["peft"]  # transformers probes for a real peft later
    from PIL import Image
    from reference_preprocess import reference_pixel_values
    from transformers import AutoTokenizer

    model = InternVLChatModel.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    if (Path(ckpt) / "tokenizer.model").exists():  # InternLM2: its own sentencepiece tokenizer class, as the cards'
        from internvl.model.internlm2.tokenization_internlm2 import InternLM2Tokenizer  # use_fast=False loads
        tokenizer = InternLM2Tokenizer.from_pretrained(ckpt)
    else:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    # transformers 5 builds remote-code models on the meta device: their non-persistent rotary buffers need a redo.
    for m in model.modules():
        if hasattr(m, "inv_freq") and hasattr(m, "_set_cos_sin_cache"):
            m.inv_freq = 1.0 / (m.base ** (torch.arange(0, m.dim, 2).float() / m.dim))
            m._set_cos_sin_cache(seq_len=m.max_position_embeddings, device="cpu", dtype=torch.float32)
    outputs = []

    @torch.no_grad()
    def generate(pixel_values=None, input_ids=None, **kw):
        """chat()'s generate without a KV cache (the old InternLM2 code predates transformers' Cache objects):
        the original splice, then full forwards of the original language model, greedy."""
        embed = model.language_model.get_input_embeddings()
        embeds = embed(input_ids)
        if pixel_values is not None:
            flat = embeds.reshape(-1, embeds.shape[-1])
            flat[input_ids.reshape(-1) == model.img_context_token_id] = model.extract_feature(pixel_values).reshape(
                -1, flat.shape[-1])
        ids = []
        while len(ids) < kw["max_new_tokens"] and (not ids or ids[-1] != kw["eos_token_id"]):
            ids.append(int(model.language_model(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax()))
            embeds = torch.cat([embeds, embed(torch.tensor([ids[-1:]]))], dim=1)
        outputs.append(ids)
        return torch.tensor([ids])

    model.generate = generate
    pixels = reference_pixel_values(Image.open(image).convert("RGB"), max_num=MAX_NUM)
    for _, question, with_image in QUESTIONS:
        model.chat(tokenizer, pixels if with_image else None, question,
                   dict(max_new_tokens=MAX_TOKENS, do_sample=False))
    return {name: ids for (name, _, _), ids in zip(QUESTIONS, outputs)}


def served(ckpt: str, image: str) -> dict:
    import openai

    from tools.run_local import start_stack

    url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    stack = start_stack(ckpt, log=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused")
        answers = {}
        for name, question, with_image in QUESTIONS:
            content = [{"type": "image_url", "image_url": {"url": url}}] if with_image else []
            r = client.chat.completions.create(
                model=Path(ckpt).name, max_tokens=MAX_TOKENS, temperature=0,
                messages=[{"role": "user", "content": content + [{"type": "text", "text": question}]}],
                extra_body={"max_num": MAX_NUM, "return_token_ids": True})
            answers[name] = r.choices[0].token_ids
        return answers
    finally:
        stack.stop()


def main() -> None:
    from tests.conftest import noise_image
    from tools.make_tiny_checkpoint import FAMILIES, write_tiny_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--internvl", help="the internvl_chat folder of an OpenGVLab/InternVL checkout")
    p.add_argument("--internvl-v1-5", help="the same folder at the V1-5 era, for internvl-chat-v1_5")
    p.add_argument("--families", nargs="+", default=sorted(FAMILIES))
    p.add_argument("--ps-version", default="v2", help="ps_version written into the checkpoints (v1 or v2)")
    p.add_argument("--reference", nargs=3, metavar=("INTERNVL", "CKPT", "IMAGE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference:
        print(json.dumps(reference(*args.reference)))
        return
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        image = f"{tmp}/image.png"
        noise_image(620, 410, seed=21).save(image)
        for family in args.families:
            ckpt = write_tiny_checkpoint(f"{tmp}/{family}", family=family, layout="original")
            config = json.loads((ckpt / "config.json").read_text())
            (ckpt / "config.json").write_text(json.dumps({**config, "ps_version": args.ps_version}))
            code = args.internvl_v1_5 if family == "internvl-chat-v1_5" and args.internvl_v1_5 else args.internvl
            out = subprocess.run([sys.executable, "-m", "tools.compare_with_opengvlab", "--reference", code,
                                  str(ckpt), image], capture_output=True, text=True, check=True)
            expected, ours = json.loads(out.stdout.splitlines()[-1]), served(str(ckpt), image)
            for name in expected:
                same = expected[name] == ours[name]
                failed |= not same
                print(f"{family:24} {name:6} {'equal' if same else 'DIFFERENT'}  original={expected[name]} "
                      f"served={ours[name]}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
