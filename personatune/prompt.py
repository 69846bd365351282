"""The prompt scaffold, shared by training, evaluation and chat.

Training text is exactly the seed notebook's scaffold with the reply and EOS appended; inference uses the
same text with `### Response:` left open. The model must stop before it writes the next `### ` turn, so
`STOP_STRINGS` is handed to `generate()` as a generation-time stop criterion.
"""
from __future__ import annotations

MARKER = "### "
STOP_STRINGS = ["###"]

TEMPLATE = "### Instruction:\n{instruction}\n\n### User:\n{user}\n\n### Response:\n"


def format_prompt(instruction: str, user: str) -> str:
    """The prompt up to and including the open `### Response:` line."""
    return TEMPLATE.format(instruction=instruction.strip(), user=user.strip())


def cut_reply(text: str) -> str:
    """Remove what generation may leave after the reply: the stop marker that ended it, whitespace."""
    cut = text.find("###")
    if cut != -1:
        text = text[:cut]
    return text.strip()
