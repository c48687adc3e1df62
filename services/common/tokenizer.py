"""The checkpoint's tokenizer, for the gateway (prompts) and the decoder (text deltas).

InternLM2 checkpoints (InternVL2-8B, InternVL2_5-8B, InternVL-Chat-V1-5) ship a sentencepiece model with remote
tokenizer code. Under transformers 5 that code's fast class comes out broken (no normalizer, decoder or byte fallback: it splits
"user" into "us" "er" and drops characters outside the vocabulary), so the tokenizer is rebuilt here from
tokenizer.model with the tokenizers library, the way InternLM2's own converter does it, and checked against
sentencepiece in the tests. Everything else (a tokenizer.json included) loads with AutoTokenizer; no remote code runs.
"""
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from services.common.checkpoint import CheckpointError


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if config.get("tokenizer_class") == "InternLM2Tokenizer" and not (path / "tokenizer.json").exists():
        return internlm2_tokenizer(path, config)
    if "auto_map" in config:
        # Remote tokenizer classes are never run, and AutoTokenizer would stop to ask about them (or refuse): the
        # converted tokenizer.json they come with is loaded as it is.
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def sentencepiece_bpe(model_file: Path, added: dict[int, str], add_bos: bool) -> Tokenizer:
    """A sentencepiece BPE model (with byte fallback) as a tokenizers.Tokenizer, plus the added tokens at their ids."""
    extractor = SentencePieceExtractor(str(model_file))
    spec = extractor.proto
    kwargs = extractor.extract(BPE)
    unk = spec.pieces[spec.trainer_spec.unk_id].piece
    tok = Tokenizer(BPE(vocab=kwargs["vocab"], merges=kwargs["merges"], unk_token=unk,
                        byte_fallback=spec.trainer_spec.byte_fallback, fuse_unk=True))
    # Each text segment between special tokens starts with the dummy "▁", as sentencepiece.encode gives it.
    prefix = [normalizers.Prepend("▁")] if spec.normalizer_spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    for token_id, content in sorted(added.items()):
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if tok.token_to_id(content) != token_id:
            raise CheckpointError(f"{model_file.parent}: added token {content} should have id {token_id}, "
                                  f"got {tok.token_to_id(content)}")
    if add_bos:
        bos = spec.pieces[spec.trainer_spec.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.trainer_spec.bos_id)])
    return tok


def internlm2_tokenizer(path: Path, config: dict) -> PreTrainedTokenizerFast:
    added = {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
    tok = sentencepiece_bpe(path / "tokenizer.model", added, config.get("add_bos_token", True))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if isinstance(config.get(k), str)}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=config.get("model_max_length", 32768),
                                   **special)
