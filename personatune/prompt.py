"""The prompt formats, shared by training, evaluation and chat.

`scaffold` (the default) is exactly the seed notebook's text with the reply and EOS appended; inference uses the
same text with `### Response:` left open. The model must stop before it writes the next `### ` turn, so
`STOP_STRINGS` is handed to `generate()` as a generation-time stop criterion.

`chat` renders the row with the base tokenizer's own chat template (instruction = system message, user = user
turn, reply = assistant turn), so a server that applies that template (vLLM, llama.cpp server, Ollama) sends the
adapter exactly what it was trained on. The reply ends at the template's end-of-turn token.

Either way the bundle's `chat_template.jinja` renders the format the adapter was trained on (`bundle_chat_template`).
"""
from __future__ import annotations

import json
from pathlib import Path

MARKER = "### "
STOP_STRINGS = ["###"]

TEMPLATE = "### Instruction:\n{instruction}\n\n### User:\n{user}\n\n### Response:\n"

# The scaffold as a chat template: `apply_chat_template([system, user], add_generation_prompt=True)` gives exactly
# `format_prompt(instruction, user)` (tests/test_chat_format.py), and an assistant message closes with EOS as in training.
SCAFFOLD_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '### Instruction:\\n' + (message['content'] | trim) + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + (message['content'] | trim) + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\\n' + (message['content'] | trim) + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)


def format_prompt(instruction: str, user: str) -> str:
    """The prompt up to and including the open `### Response:` line."""
    return TEMPLATE.format(instruction=instruction.strip(), user=user.strip())


def chat_messages(instruction: str, user: str, reply: str | None = None) -> list[dict]:
    """One row as chat messages: the instruction is the system message (stripped, like the scaffold's cells)."""
    messages = [{"role": "system", "content": instruction.strip()}, {"role": "user", "content": user.strip()}]
    if reply is not None:
        messages.append({"role": "assistant", "content": reply.strip()})
    return messages


def bundle_chat_template(tok, prompt_format: str) -> str:
    """The chat template an adapter ships with: the base tokenizer's own for `chat`; for the scaffold, the scaffold's,
    led by BOS when the tokenizer adds one to plain text (Llama-2's `<s>`; the scaffold is tokenized that way, while
    `apply_chat_template` adds no special tokens of its own)."""
    if prompt_format != "scaffold":
        return tok.chat_template
    adds_bos = tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
    return ("{{- bos_token -}}" if adds_bos else "") + SCAFFOLD_CHAT_TEMPLATE


def prompt_format_of(adapter_dir: str | Path, default: str = "scaffold") -> str:
    """The prompt format an adapter bundle was trained with: `prompt_format` of its training_config.json's config
    (what exporters read too). A bundle from before the option is the scaffold; a folder without the file (an
    adapter from elsewhere, or a stage folder) gets `default`."""
    training = Path(adapter_dir) / "training_config.json"
    if training.is_file():
        return json.loads(training.read_text())["config"].get("prompt_format", "scaffold")
    return default


def stop_strings(prompt_format: str) -> list[str]:
    """Generation-time stop strings: the scaffold's next-turn marker; chat stops on its end-of-turn token alone."""
    return list(STOP_STRINGS) if prompt_format == "scaffold" else []


def cut_reply(text: str, prompt_format: str = "scaffold") -> str:
    """Remove what generation may leave after the reply: the stop marker that ended it, whitespace."""
    cut = text.find("###") if prompt_format == "scaffold" else -1
    if cut != -1:
        text = text[:cut]
    return text.strip()
