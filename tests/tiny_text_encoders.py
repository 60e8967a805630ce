"""Tiny chat-template text encoders for tests, built in code (no network).

Tokenizers are real ``Qwen2Tokenizer`` objects (byte-level BPE with Qwen's pre-tokenizer) whose
small vocabularies are trained here on the prompt templates and the base words, so that every
template word is one token, as with the real vocabularies (Qwen-Image's system prefix is then
exactly the 34 tokens its pipeline drops). Decoder-only encoders are 2-layer Qwen2.5-VL, or
Qwen3 / Mistral-3 deep enough for the hidden layers Flux.2 stacks, all with hidden size 32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from conceptattention.bundled.components import BASE_WORDS, seeded

TEXT_HIDDEN = 32
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
MISTRAL_SPECIAL = ("<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")

# Qwen3's chat template, reduced to what the Flux.2 Klein pipeline renders (user turns, no thinking).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
# Mistral-Small-3.x's layout for a system and a user turn with structured content, as Flux.2-dev renders it.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- set text = message['content'][0]['text'] %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{{- '[INST]' + text + '[/INST]' }}{%- endif %}{%- endfor %}"
)


@cache
def _vocab_and_merges(corpus: tuple[str, ...], special: tuple[str, ...]) -> tuple[dict, tuple]:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=6000,  # more than needed: every corpus word ends up one token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special),
        show_progress=False,
    )
    bpe.train_from_iterator([*corpus, *BASE_WORDS, *(" " + w for w in BASE_WORDS)], trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], tuple(tuple(m) for m in model["merges"])


def make_bpe_tokenizer(
    corpus: Sequence[str], special: Sequence[str], chat_template: str | None = None, **tokens: str
) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer trained on ``corpus`` + the base words; ``tokens``: eos/pad/bos overrides."""
    vocab, merges = _vocab_and_merges(tuple(corpus), tuple(special))
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab), merges=list(merges), additional_special_tokens=list(special[1:]), **tokens
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _ids(tokenizer) -> dict[str, int]:
    pad = tokenizer.pad_token_id
    return {"bos_token_id": pad, "eos_token_id": pad, "pad_token_id": pad}


def make_qwen25vl_encoder(tokenizer, seed: int = 0, num_layers: int = 2):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
            **_ids(tokenizer),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "fullatt_block_indexes": [0],
        },
    )
    return seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config)).eval()


def make_qwen3_encoder(tokenizer, seed: int = 0, num_layers: int = 28):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        **_ids(tokenizer),
    )
    return seeded(seed, lambda: Qwen3ForCausalLM(config)).eval()


def make_mistral3_encoder(tokenizer, seed: int = 0, num_layers: int = 31):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            **_ids(tokenizer),
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 28,
            "patch_size": 14,
        },
    )
    return seeded(seed, lambda: Mistral3ForConditionalGeneration(config)).eval()


def make_gemma2_encoder(tokenizer, seed: int = 0, num_layers: int = 3):
    """A ``Gemma2Model`` (no LM head, as Lumina-Image 2.0 ships it) of hidden size 32; eager attention, so that
    Gemma-2's attention logit soft-capping is applied; the tokenizer's own pad / bos / eos ids."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    return seeded(seed, lambda: Gemma2Model(config)).eval()
