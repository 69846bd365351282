"""Talk to a trained persona adapter.

    python -m flows.chat --prompt "Do you like birthdays?"        # one answer from outputs/latest
    python -m flows.chat                                         # interactive, streamed
    python -m flows.chat --adapter you/wednesday-adapter --compare --prompt "Hi!"

Prompts in the format the adapter was trained with (`prompt_format` in its training_config.json): the scaffold
with `### Response:` left open, stopping at EOS or the next `###` marker during generation, or the base
tokenizer's chat template, stopping at its end-of-turn token. Decodes with the adapter's generation_config.json (what its evaluation measured); `--temperature`,
`--top-p`, `--repetition-penalty` and `--no-repeat-ngram-size` override it (`--temperature 0` = greedy).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "0")

DEFAULT_INSTRUCTION = "Respond as Wednesday Addams: deadpan and morbid."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from personatune.inference import add_adapter_arguments

    p = argparse.ArgumentParser(prog="python -m flows.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(p)
    p.add_argument("--prompt", help="Answer this once and exit; without it, chat interactively.")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                   help=f"The ### Instruction line, or the system message of a chat-format adapter (default: {DEFAULT_INSTRUCTION!r}).")
    p.add_argument("--temperature", type=float, default=None,
                   help="Override the bundle's generation_config.json: 0 = greedy, > 0 samples at this temperature.")
    p.add_argument("--top-p", type=float, default=None, help="Override the bundle's nucleus sampling mass.")
    p.add_argument("--max-new-tokens", type=int, default=96, help="Reply length limit in tokens (default: 96).")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="Override the bundle's generation_config.json (the decoding its evaluation measured).")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="Override the bundle's generation_config.json.")
    p.add_argument("--base-contrast", type=float, default=None,
                   help="Override the bundle's contrast with the base (0 = off; QUALITY.md, \"Base contrast\").")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed (default: 0).")
    p.add_argument("--compare", action="store_true", help="Also answer with the base model (adapter disabled), side by side.")
    return p.parse_args(argv)


def reply_streamer(tok, prompt_format: str = "scaffold"):
    """Print the reply as it is generated, but never the `###` marker that stops a scaffold reply (a chat reply
    ends at its end-of-turn token, a special token the streamer skips)."""
    marker = "###" if prompt_format == "scaffold" else None
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        stopped = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.stopped and marker and marker in text:
                text, self.stopped = text[:text.index(marker)].rstrip() + "\n", True
            elif self.stopped:
                text = ""
            print(text, flush=True, end="" if not stream_end else None)

    return ReplyStreamer(tok, skip_prompt=True, skip_special_tokens=True)


def decoding_for(args, adapter_dir):
    """The adapter's own decoding (generation_config.json: the sampling and repetition controls its evaluation used), with the
    reply limit and any override from the command line."""
    import dataclasses

    from personatune.decoding import load_decoding

    stored = load_decoding(adapter_dir)
    changes = {"max_new_tokens": args.max_new_tokens}
    for name in ("repetition_penalty", "no_repeat_ngram_size", "temperature", "top_p", "base_contrast"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return dataclasses.replace(stored, **changes)


def answer(model, tok, args, user: str, stream: bool, decoding=None, prompt_format: str = "scaffold") -> dict:
    from personatune.evaluate import generate_reply

    streamer = reply_streamer(tok, prompt_format) if stream else None
    return generate_reply(model, tok, args.instruction, user, decoding, seed=args.seed, streamer=streamer,
                          prompt_format=prompt_format)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    from personatune.inference import load_for_inference
    from personatune.prompt import prompt_format_of

    transformers.utils.logging.disable_progress_bar()
    try:
        model, tok, adapter_dir = load_for_inference(args.adapter, args.revision, args.base_model, args.outputs)
    except (FileNotFoundError, ValueError) as e:
        print(f"chat: {e}", file=sys.stderr)
        return 2
    decoding = decoding_for(args, adapter_dir)
    prompt_format = prompt_format_of(adapter_dir)
    print(f"[adapter: {adapter_dir}; prompt format: {prompt_format}; decoding: {decoding.to_dict()}]", file=sys.stderr)

    def respond(user: str, stream: bool) -> None:
        tuned = answer(model, tok, args, user, stream=stream and not args.compare, decoding=decoding,
                       prompt_format=prompt_format)
        if args.compare:
            with model.disable_adapter():
                base = answer(model, tok, args, user, stream=False, decoding=decoding.without_contrast(),
                              prompt_format=prompt_format)
            print(f"tuned: {tuned['reply']}\nbase:  {base['reply']}")
        elif not stream:
            print(tuned["reply"])

    if args.prompt is not None:
        respond(args.prompt, stream=False)
        return 0
    print("Talk to her. Empty line or Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        respond(user, stream=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
