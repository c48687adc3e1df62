"""Qwen2 / Qwen2.5 (InternVL2.5-1B/4B, and the AWQ 4B): the Llama shape with q/k/v biases, same tensor names."""
from services.common.checkpoint import TextConfig
from services.llm_decoder.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: TextConfig):
        assert cfg.attention_bias, "Qwen2 projects q/k/v with biases"
        super().__init__(cfg)
