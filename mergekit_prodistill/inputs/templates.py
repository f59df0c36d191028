"""Prompt templates: each expert sees its calibration prompts in its own format.

A template is a string containing ``{prompt}``, the name of a preset below (the formats
the ProDistill authors used for their Llama-2-13B experts), or ``chat``: the expert
tokenizer's own chat template, with the prompt as the user's message and the assistant's
turn opened.
"""

from typing import List

from mergekit_prodistill.errors import ProDistillError

PRESETS = {
    "vicuna": (
        "A chat between a curious user and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: {prompt} ASSISTANT:"
    ),
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:"
    ),
    "alpaca-cot": (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\n{prompt}\n\n"
        "### Response: Let's think step by step."
    ),
    "alpaca-code": (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nCreate a Python script "
        "for this problem:\n{prompt}\n\n### Response:"
    ),
}

PLACEHOLDER = "{prompt}"
CHAT = "chat"


def resolve_template(name_or_text: str) -> str:
    """A preset's text, ``chat``, or a template string that must contain ``{prompt}``."""
    if name_or_text in PRESETS:
        return PRESETS[name_or_text]
    if name_or_text == CHAT:
        return CHAT
    if PLACEHOLDER not in name_or_text:
        raise ValueError(
            f"must contain {PLACEHOLDER}, be one of the presets {', '.join(PRESETS)}, "
            f"or be '{CHAT}' (the tokenizer's chat template)"
        )
    return name_or_text


def apply_template(template: str, prompt: str) -> str:
    # Plain replacement: prompts (code!) and templates may contain other braces.
    return template.replace(PLACEHOLDER, prompt)


def format_prompts(template: str, prompts: List[str], tokenizer, where: str) -> List[str]:
    """Wrap every prompt in ``template`` (a preset name, ``chat``, or a template string)."""
    text = resolve_template(template)
    if text != CHAT:
        return [apply_template(text, p) for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise ProDistillError(
            f"{where}: template 'chat' needs a chat template, but the tokenizer has none; "
            "name a preset or write the template with {prompt}"
        )
    try:
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
    except Exception as exc:  # jinja2 errors raised by the model's own template
        raise ProDistillError(f"{where}: the tokenizer's chat template failed: {exc}") from None
