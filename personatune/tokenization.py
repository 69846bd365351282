"""Render rows into the prompt format (personatune.prompt) and tokenize them into input_ids / attention_mask / labels.

Loss is taken on the response only: prompt positions get label -100 (an improvement on the seed, which
trained on the whole text and so spent capacity learning to echo the scaffold). EOS closes every example so
the model learns where a reply ends; pad = EOS as in the seed (Llama has no pad token).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from personatune.data import COLUMNS, DataValidationError, Problem
from personatune.files import atomic_dir, code_version, is_complete, sha256_bytes, stable_hash
from personatune.prompt import chat_messages, format_prompt

IGNORE_INDEX = -100


def load_tokenizer(tokenizer_dir: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, revision=revision)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {tokenizer_dir} has no EOS token; cannot mark the end of a reply")
    tok.pad_token = tok.eos_token  # Llama ships without a pad token: pad with EOS (masked out of the loss)
    tok.padding_side = "right"
    return tok


def special_token_strings(tok) -> list[str]:
    """Every string the tokenizer reads as a control token unless told not to: its named special tokens (BOS, EOS,
    pad...) and the added tokens marked special (`<|im_start|>`, `<|endoftext|>`, `<repo_name>`... for SmolLM2)."""
    added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special]
    return sorted(set(tok.all_special_tokens) | set(added))


def special_token_problems(dsd, tok, quotes_csv: str) -> list[Problem]:
    """A cell holding a special-token string would be trained as that control token (a reply containing the EOS
    string teaches the model to stop mid-reply; a user cell could open a new turn): one problem per such cell."""
    specials = special_token_strings(tok)
    problems = []
    for ds in dsd.values():
        for column in COLUMNS:
            for line, cell in zip(ds["line"], ds[column]):
                found = [s for s in specials if s in cell]
                if found:
                    tokens = ", ".join(f"'{s}'" for s in found)
                    problems.append(Problem(quotes_csv, line, column, f"contains the tokenizer's special token {tokens}, "
                                                                      "which would be trained as a control token; remove it"))
    return sorted(problems, key=lambda p: (p.line, COLUMNS.index(p.column)))


def encode_example(tok, instruction: str, user: str, response: str,
                   prompt_format: str = "scaffold") -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one row; labels are -100 on the prompt. BOS comes from the tokenizer.

    The text is tokenized with `split_special_tokens=True`: a special-token string in a cell stays text, so the
    one EOS appended here is the only control token an example holds (the tokenize stage rejects such cells
    anyway; evaluation sets reach this without that check). `chat`: the prompt of `encode_prompt`, then the reply
    and the template's end-of-turn token, the only labelled positions (what follows that token is never learned)."""
    prompt_ids = encode_prompt(tok, instruction, user, prompt_format)
    response_ids = encode_response(tok, response, prompt_format)
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def encode_response(tok, response: str, prompt_format: str = "scaffold") -> list[int]:
    """The labelled ids of a reply, as `encode_example` puts them after the prompt: its text, then EOS (scaffold) or
    the template's end-of-turn token (chat; the reply stripped, as the template renders it)."""
    if prompt_format == "chat":
        reply_ids = tok(response.strip(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return reply_ids + [end_of_turn_id(tok, prompt_format)]
    return tok(response, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]


def encode_prompt(tok, instruction: str, user: str, prompt_format: str = "scaffold") -> list[int]:
    """The token ids a reply is generated after: the scaffold up to `### Response:\n`, or the chat template with
    its generation prompt (`<|im_start|>assistant\n` for SmolLM2)."""
    if prompt_format == "chat":
        return _chat_ids(tok, chat_messages(instruction, user), add_generation_prompt=True)[0]
    return tok(format_prompt(instruction, user), add_special_tokens=True, split_special_tokens=True)["input_ids"]


_SLOT = re.compile("\ue000(\\d+)\ue001")  # a message's place in the rendered template (private-use characters)


def _chat_ids(tok, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """The chat template's rendering of `messages` as token ids, and each message's (start, end) token span.

    The template's own text is tokenized as the template means it (`<|im_start|>` is the control token), each
    message's content with `split_special_tokens=True` (a user's `<|im_end|>` stays text). For content without
    special-token strings the ids equal `tok.apply_chat_template(messages)` (tests/test_chat_format.py)."""
    if not tok.chat_template:
        raise ValueError(f"prompt_format=chat: the tokenizer of {tok.name_or_path} has no chat template; "
                         "use prompt_format=scaffold")
    slots = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    text = tok.apply_chat_template(slots, tokenize=False, add_generation_prompt=add_generation_prompt)
    pieces = _SLOT.split(text)  # template text, slot index, template text, slot index, ...
    found = [int(i) for i in pieces[1::2]]
    if sorted(found) != list(range(len(messages))):
        raise ValueError(f"prompt_format=chat: the chat template of {tok.name_or_path} does not render each message "
                         f"once (roles {[m['role'] for m in messages]}); use prompt_format=scaffold")
    ids: list[int] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(messages)
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            ids += tok(piece, add_special_tokens=False)["input_ids"] if piece else []
        else:
            start = len(ids)
            ids += tok(messages[int(piece)]["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            spans[int(piece)] = (start, len(ids))
    return ids, spans


def end_of_turn_id(tok, prompt_format: str = "scaffold") -> int:
    """The token that ends a reply: EOS for the scaffold; for chat, the first token the template writes after the
    assistant's content (`<|im_end|>` in ChatML)."""
    if prompt_format != "chat":
        return tok.eos_token_id
    ids, spans = _chat_ids(tok, chat_messages("s", "u", "a"), add_generation_prompt=False)
    end = spans[2][1]
    if end >= len(ids):
        raise ValueError(f"prompt_format=chat: the chat template of {tok.name_or_path} writes no end-of-turn token "
                         "after the assistant's reply; use prompt_format=scaffold")
    return ids[end]


def stop_token_ids(tok, prompt_format: str = "scaffold") -> list[int]:
    """Token ids that end generation: EOS and the format's end-of-turn token (one id when they coincide)."""
    return sorted({tok.eos_token_id, end_of_turn_id(tok, prompt_format)})


def generation_eos(tok, prompt_format: str = "scaffold") -> int | list[int]:
    """`eos_token_id` for `generate()` and generation_config.json: one id, or the list when EOS and end-of-turn differ."""
    ids = stop_token_ids(tok, prompt_format)
    return ids[0] if len(ids) == 1 else ids


def encode_batch(batch: dict, tok, max_seq_len: int, on_long_row: str, prompt_format: str = "scaffold") -> dict:
    """The `datasets.map` function of `tokenize_dataset`: every input arrives as a parameter (no closure, no
    module state), and the map's fingerprint is given explicitly (`map_fingerprint`)."""
    out = {"input_ids": [], "attention_mask": [], "labels": [], "truncated": []}
    for ins, usr, resp in zip(batch["instruction"], batch["user"], batch["response"]):
        ids, labels = encode_example(tok, ins, usr, resp, prompt_format)
        truncated = len(ids) > max_seq_len
        if truncated and on_long_row == "truncate":
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["truncated"].append(truncated)
    return out


def tokenizer_fingerprint(tok) -> str:
    """What the tokenizer contributes to the tokens: its whole definition (vocabulary, merges, normalizer, added
    tokens) and the EOS that closes every example."""
    backend = getattr(tok, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else stable_hash(tok.get_vocab(), special_token_strings(tok))
    return stable_hash(sha256_bytes(definition.encode("utf-8")), tok.eos_token_id)


def map_fingerprint(split_fingerprint: str, tok, max_seq_len: int, on_long_row: str, prompt_format: str = "scaffold") -> str:
    """The tokenized split's `datasets` fingerprint, from everything its content depends on: the input split, the
    tokenization code (this module and what it imports, e.g. the prompt template), the tokenizer, the limits and the
    prompt format (with the tokenizer's chat template when that is the format).
    Given explicitly, `datasets` does not fingerprint `encode_batch` itself: that hashing pickles the function with
    dill, which disassembles its bytecode into a captured `sys.stdout` (under Prefect's `log_prints` those lines
    land in the task log instead, and the globals they name drop out of the fingerprint)."""
    chat = (prompt_format, tok.chat_template) if prompt_format == "chat" else ()
    return stable_hash(split_fingerprint, code_version("personatune.tokenization"), tokenizer_fingerprint(tok),
                       max_seq_len, on_long_row, *chat)


def tokenize_dataset(dataset_dir: str | Path, tok, max_seq_len: int, on_long_row: str, out_dir: str | Path,
                     quotes_csv: str = "quotes.csv", prompt_format: str = "scaffold") -> Path:
    """Tokenize both splits with `datasets.map` (batched) and save them as Arrow to `out_dir`.

    Cells holding one of the tokenizer's special-token strings are rejected with their CSV line and column. Rows
    longer than `max_seq_len` tokens are rejected with their CSV line, or (on_long_row='truncate') cut at the end of
    the response, counted in stats.json. Never silently. Nothing is written on a rejection, and nothing is cached
    by `datasets` (no cache files beside the input split): `out_dir`, content-addressed by the caller, is the cache.
    """
    from datasets import DatasetDict, load_from_disk

    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    dsd = load_from_disk(str(dataset_dir))
    problems = special_token_problems(dsd, tok, quotes_csv)
    if problems:
        raise DataValidationError(problems)

    tokenized = DatasetDict({
        split: ds.map(encode_batch, batched=True, fn_kwargs={"tok": tok, "max_seq_len": max_seq_len,
                                                             "on_long_row": on_long_row, "prompt_format": prompt_format},
                      remove_columns=list(COLUMNS), keep_in_memory=True, load_from_cache_file=False,
                      new_fingerprint=map_fingerprint(ds._fingerprint, tok, max_seq_len, on_long_row, prompt_format),
                      desc="tokenize")
        for split, ds in dsd.items()
    })
    stats = {}
    for split, ds in tokenized.items():
        long_rows = [line for line, t in zip(ds["line"], ds["truncated"]) if t]
        if long_rows and on_long_row == "reject":
            raise DataValidationError([
                Problem(quotes_csv, line, "response", f"row is longer than max_seq_len={max_seq_len} tokens; shorten it or set on_long_row=truncate")
                for line in sorted(long_rows)
            ])
        lengths = [len(x) for x in ds["input_ids"]]
        stats[split] = {
            "rows": len(ds),
            "tokens": sum(lengths),
            "response_tokens": sum(sum(1 for v in lab if v != IGNORE_INDEX) for lab in ds["labels"]),
            "max_len": max(lengths),
            "truncated_lines": sorted(long_rows),
        }
    tokenized = tokenized.remove_columns(["truncated", "line"])
    with atomic_dir(out_dir) as tmp:
        tokenized.save_to_disk(str(tmp / "dataset"))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return out_dir


def load_tokenized(tokenized_dir: str | Path):
    from datasets import load_from_disk

    return load_from_disk(str(Path(tokenized_dir) / "dataset"))
