"""InternLM2's sentencepiece tokenizer, rebuilt with the tokenizers library, against sentencepiece itself."""
import pytest
import sentencepiece

from services.common.tokenizer import load_tokenizer
from tools.make_tiny_checkpoint import INTERNLM2_SPECIAL_TOKENS, internlm2_added_tokens, write_tiny_checkpoint

TEXTS = ["Hello 你好 the lighthouse", "  two  spaces\nnew line\n\n", "The 42 apples; 3.14!", "user\n", "\nDescribe it.",
         "émigré café ﬁ", "tab\there", " leading", "trailing ", "", "😀 emoji", "Frame1: (ref)"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lm2") / "ckpt", family="internvl2", layout="original")


def test_segments_encode_as_sentencepiece_does(original):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(original / "tokenizer.model"))
    tok = load_tokenizer(original)
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
        assert tok(text).input_ids == [sp.bos_id()] + sp.encode(text)


def test_special_tokens_split_the_text_like_the_original_tokenizer(original):
    """Between special tokens each segment is encoded on its own (with sentencepiece's dummy prefix)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(original / "tokenizer.model"))
    tok = load_tokenizer(original)
    ids = {t: i for i, t in internlm2_added_tokens().items()}
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nQ 你<|im_end|><|im_start|>assistant\n"
    expected = [1, ids["<|im_start|>"], *sp.encode("user\n"), ids["<img>"], ids["<IMG_CONTEXT>"],
                ids["<IMG_CONTEXT>"], ids["</img>"], *sp.encode("\nQ 你"), ids["<|im_end|>"], ids["<|im_start|>"],
                *sp.encode("assistant\n")]
    assert tok(text).input_ids == expected
    assert len(tok) == max(ids.values()) + 1 and set(INTERNLM2_SPECIAL_TOKENS) <= set(ids)


def test_decoding_round_trips(original):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(original / "tokenizer.model"))
    tok = load_tokenizer(original)
    for text in TEXTS:
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
