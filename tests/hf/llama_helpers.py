"""A tiny random Llama saved as a Hugging Face folder with its tokenizer: the stand-in for a real
checkpoint in the import and bench tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def llama(tokenizer, **overrides) -> LlamaForCausalLM:
    values = dict(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        eos_token_id=tokenizer.token_to_id("</s>"),
        tie_word_embeddings=True,
    )
    values.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**values)).eval()
    # random norm weights too, so a swapped norm could not pass
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_llama(model, tokenizer, path, chat_template: str | None = TEMPLATE):
    model.save_pretrained(path)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return path
