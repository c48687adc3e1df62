"""One file per LLM family; `load_language_model` builds the right one and fills it from the checkpoint."""
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from services.common.checkpoint import ModelConfig
from services.common.weights import TensorReader, load_weights
from services.llm_decoder.models import awq
from services.llm_decoder.models.internlm2 import InternLM2ForCausalLM
from services.llm_decoder.models.llama import LlamaForCausalLM
from services.llm_decoder.models.qwen2 import Qwen2ForCausalLM

log = logging.getLogger(__name__)

FAMILIES = {"qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM, "internlm2": InternLM2ForCausalLM}


def load_language_model(cfg: ModelConfig, path: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Build the LLM and read only the language-model tensors."""
    start = time.perf_counter()
    reader = TensorReader(path)
    text = cfg.text
    if text.tie_word_embeddings and f"{cfg.text_prefix}lm_head.weight" in reader.weight_map:
        text = replace(text, tie_word_embeddings=False)  # a head stored apart is used, as transformers does
    # Built in the model dtype rather than cast afterwards: AWQ scales must stay fp16.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = FAMILIES[text.family](text)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, reader, cfg.text_prefix, model.checkpoint_name)
    awq.prepare(model)
    log.info("language model loaded in %.1fs (%s, %s)", time.perf_counter() - start, device, dtype)
    return model.eval()
