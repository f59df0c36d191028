"""Prompt templates: each expert sees its calibration prompts in its own format."""

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


def resolve_template(name_or_text: str) -> str:
    """A preset's text, or a template string that must contain ``{prompt}``."""
    if name_or_text in PRESETS:
        return PRESETS[name_or_text]
    if PLACEHOLDER not in name_or_text:
        raise ValueError(
            f"must contain {PLACEHOLDER} or be one of the presets: {', '.join(PRESETS)}"
        )
    return name_or_text


def apply_template(template: str, prompt: str) -> str:
    # Plain replacement: prompts (code!) and templates may contain other braces.
    return template.replace(PLACEHOLDER, prompt)
