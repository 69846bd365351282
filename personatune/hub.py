"""Publish an adapter bundle to the Hugging Face Hub, and load an adapter back from a folder or a Hub repo.

ML-core side of the publish stage (no Prefect here): the evaluation gate, the model card, one commit with the
real `huggingface_hub` client, and `resolve_adapter` for anything that loads an adapter.

Errors from the Hub are turned into two exception types whose messages say what to fix and never hold the
token (they carry no reference to the failed HTTP request, whose headers do):

- `HubTransientError`: connection errors, 429 and 5xx. Worth retrying (the Prefect task does, with backoff).
- `HubPublishError`: everything else (401/403/404, bad repo id, offline mode, no token). Retrying won't help.

`HF_ENDPOINT` is read at call time, so a self-hosted Hub-compatible server (or the test server) works.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from personatune.config import EMBEDDED_MODEL
from personatune.prompt import TEMPLATE

# The embedded model is the Q4_1 GGUF of this Hub model, dequantized: on the Hub the adapter names the original.
EMBEDDED_BASE_ON_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"  # the project's and the embedded base's; PERSONATUNE_HUB_LICENSE overrides
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Bundle files that go to the Hub (the model card README.md is added); markers and dotfiles stay local.
SKIP_FILES = {".complete"}


class HubError(RuntimeError):
    """Publishing to or loading from the Hub failed. `status` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class HubTransientError(HubError):
    """Connection error, timeout, 429 or 5xx: the same call may succeed later."""


class HubPublishError(HubError):
    """A problem that retrying will not fix (bad token, no rights, missing repo, bad configuration)."""


# ------------------------------------------------------------------------------------------------------------
# Evaluation gate
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateDecision:
    passed: bool
    improvement: float  # relative drop of held-out loss: (base - tuned) / base
    reason: str


def gate_decision(eval_loss: dict, min_improvement: float = 0.0, force: bool = False) -> GateDecision:
    """Push only if the tuned held-out loss is below base by more than `min_improvement` (a fraction)."""
    base, tuned = float(eval_loss["base"]), float(eval_loss["tuned"])
    improvement = (base - tuned) / base if base > 0 else 0.0
    numbers = (f"held-out loss base {base:.4f} -> tuned {tuned:.4f} "
               f"({improvement:+.2%} improvement, gate requires > {min_improvement:.2%})")
    if improvement > min_improvement:
        return GateDecision(True, improvement, f"gate passed: {numbers}")
    if force:
        return GateDecision(True, improvement, f"gate failed but --force-push is set: {numbers}")
    return GateDecision(False, improvement, f"gate failed: {numbers}; nothing was pushed "
                                            "(lower --push-min-improvement, or --force-push to push anyway)")


# ------------------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------------------
def hub_base_model(base_model: str) -> str | None:
    """The base model as a Hub id for the card and adapter_config.json; None for a local folder."""
    if base_model == EMBEDDED_MODEL:
        return EMBEDDED_BASE_ON_HUB
    looks_local = base_model.startswith((".", "/", "~")) or Path(base_model).expanduser().exists()
    return None if looks_local or not REPO_ID_RE.match(base_model) else base_model


def usage_snippet(repo_id: str, base_id: str | None, revision: str | None = None) -> str:
    """The three lines that load the published adapter with peft."""
    base = base_id or "PATH/TO/BASE_MODEL"
    rev = f', revision="{revision}"' if revision else ""
    return ("from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM\n"
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{repo_id}"{rev})\n')


def render_model_card(bundle: str | Path, repo_id: str, license: str | None = None) -> str:
    """README.md with YAML metadata (base_model, library_name, pipeline_tag, tags, license, data hash, eval
    results) and a body with the eval table, the prompt template and the usage snippet."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    bundle = Path(bundle)
    ev = json.loads((bundle / "eval.json").read_text())
    tc = json.loads((bundle / "training_config.json").read_text())
    cfg, data_sha = tc["config"], tc["data_sha256"]
    base_id = hub_base_model(cfg["base_model"])
    license = license or os.environ.get("PERSONATUNE_HUB_LICENSE") or DEFAULT_LICENSE
    el, tl, ppl = ev["eval_loss"], ev["train_loss"], ev.get("eval_perplexity", {})
    run = bundle.name
    dataset_name = f"quotes.csv held-out split (sha256 {data_sha[:12]})"
    data = ModelCardData(
        base_model=base_id,
        library_name="peft",
        pipeline_tag="text-generation",
        license=license,
        tags=["peft", "lora", "qlora" if cfg.get("load_in_4bit") else "lora-fp", "persona", "personatune",
              "text-generation"] + ([f"base_model:adapter:{base_id}"] if base_id else []),
        model_name=repo_id.split("/")[-1],
        eval_results=[
            EvalResult(task_type="text-generation", dataset_type="personatune/quotes", dataset_name=dataset_name,
                       dataset_split="held-out", metric_type="loss", metric_name="held-out loss (per response token)",
                       metric_value=round(el["tuned"], 6)),
            EvalResult(task_type="text-generation", dataset_type="personatune/quotes", dataset_name=dataset_name,
                       dataset_split="held-out", metric_type="perplexity", metric_name="held-out perplexity",
                       metric_value=round(ppl.get("tuned", 0.0), 4)),
        ],
        dataset_sha256=data_sha,
        personatune={
            "run": run,
            "data_sha256": data_sha,
            "base_model": cfg["base_model"],
            "base_revision": cfg.get("base_revision"),
            "eval_loss": {"base": el["base"], "tuned": el["tuned"]},
            "train_loss": {"base": tl["base"], "tuned": tl["tuned"]},
            "eval_rows": ev.get("eval_rows"),
            "steps": ev.get("training", {}).get("steps"),
        },
    )
    base_note = (f"`{base_id}`" if base_id else f"the local folder `{cfg['base_model']}` (not on the Hub: "
                 "replace `PATH/TO/BASE_MODEL` below)")
    if cfg["base_model"] == EMBEDDED_MODEL:
        base_note += (". It was trained on that model's Q4_1 GGUF, dequantized (the embedded default of "
                      "personatune); load it on the original weights as shown below")
    elif base_id and cfg.get("base_revision") not in (None, "", "main"):
        base_note += f" at revision `{cfg['base_revision']}`"
    prompt = TEMPLATE.format(instruction="{instruction}", user="{user}")
    samples = "\n".join(f"- **User:** {s['user']}\n  **Reply:** {s['tuned']}" for s in ev.get("samples", []))
    body = f"""
# {repo_id.split('/')[-1]}

A persona LoRA adapter, fine-tuned {'with QLoRA ' if cfg.get('load_in_4bit') else ''}by personatune from a
curated CSV of persona lines. Base model: {base_note}.

Run `{run}`, data sha256 `{data_sha}`.

## Use it

```python
{usage_snippet(repo_id, base_id).rstrip()}
```

Private repos need a token (`HF_TOKEN` or `hf auth login`). Then prompt with the training template and stop
at the next `###`:

```python
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("{repo_id}")
prompt = {json.dumps(prompt)}.format(instruction="Respond as Wednesday Addams.", user="Do you like sunny days?")
out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=64, stop_strings=["###"], tokenizer=tok)
print(tok.decode(out[0], skip_special_tokens=True)[len(prompt):].split("###")[0].strip())
```

## Prompt template

```
{prompt}```

## Evaluation

Loss per response token (prompt tokens are masked), base model vs this adapter:

| split | base | tuned | change |
|---|---|---|---|
| held-out ({ev.get('eval_rows')} rows) | {el['base']:.4f} | {el['tuned']:.4f} | {el['tuned'] / el['base'] - 1:+.1%} |
| train (fixed sample of {ev.get('train_rows')} rows) | {tl['base']:.4f} | {tl['tuned']:.4f} | {tl['tuned'] / tl['base'] - 1:+.1%} |

Sample replies (greedy, held-out prompts):

{samples or '(none)'}

## Training

LoRA r={cfg['lora_r']}, alpha={cfg['lora_alpha']}, dropout={cfg['lora_dropout']} on `{cfg['lora_targets']}`;
{'4-bit NF4 base with double quantization' if cfg.get('load_in_4bit') else 'unquantized base'};
{ev.get('training', {}).get('steps')} optimizer steps, learning rate {cfg['learning_rate']}, batch
{cfg['micro_batch_size']} x {cfg['grad_accum']}, seed {cfg['seed']}. The full resolved configuration is in
`training_config.json`, the per-step loss in `history.json`, the evaluation in `eval.json`.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


# ------------------------------------------------------------------------------------------------------------
# Push
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushResult:
    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    endpoint: str


def hub_endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once at import; we read it per call)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _translate(exc: BaseException, what: str, repo_id: str, endpoint: str, token: str | None) -> HubError:
    """Map a client exception to HubTransientError / HubPublishError with a message that says what to fix."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return HubPublishError(f"{what}: HF_HUB_OFFLINE=1 is set; unset it (or set 0) to reach {endpoint}")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        detail = _scrub(str(exc).splitlines()[0] if str(exc) else "", token)
        server = _scrub((exc.server_message or "").strip(), token)
        hint = f" (server said: {server})" if server else ""
        if status == 401:
            return HubPublishError(
                f"{what}: the Hub at {endpoint} rejected the token (401 Unauthorized){hint}. Set HF_TOKEN (or the "
                "Prefect Secret block named by PERSONATUNE_HF_TOKEN_BLOCK, default 'hf-token') to a valid token "
                "with write access", status)
        if status == 403:
            return HubPublishError(
                f"{what}: the token may not write to {repo_id!r} (403 Forbidden){hint}. Use a token with write "
                f"access to the namespace {repo_id.split('/')[0]!r}, or change --hub-repo", status)
        if status == 404:
            return HubPublishError(
                f"{what}: {repo_id!r} (or that revision) was not found at {endpoint} (404){hint}. Check the repo "
                "id (--hub-repo / --adapter), the revision, HF_ENDPOINT, and that the token can see the repo", status)
        if status == 429 or status >= 500:
            return HubTransientError(f"{what}: the Hub at {endpoint} answered {status}{hint}; will retry", status)
        return HubPublishError(f"{what}: the Hub at {endpoint} answered {status}: {detail}{hint}", status)
    if _is_connection_error(exc):
        return HubTransientError(f"{what}: cannot reach {endpoint} ({type(exc).__name__}); will retry")
    if isinstance(exc, ValueError):  # e.g. the Hub rejected the model card metadata
        return HubPublishError(f"{what}: {_scrub(str(exc), token)}")
    return HubPublishError(f"{what}: {type(exc).__name__}: {_scrub(str(exc), token)}")


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        transport = getattr(mod, "TransportError", None) or getattr(getattr(mod, "exceptions", None),
                                                                    "ConnectionError", None)
        if transport is not None and isinstance(exc, transport):
            return True
    return False


def _call(fn, what: str, repo_id: str, endpoint: str, token: str | None):
    """Run one client call; re-raise its failure as a HubError *outside* the except block, so the new
    exception has no __context__ pointing at the request (whose headers hold the token)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - translated below
        error = _translate(e, what, repo_id, endpoint, token)
    raise error


def commit_message(bundle: str | Path) -> tuple[str, str]:
    bundle = Path(bundle)
    tc = json.loads((bundle / "training_config.json").read_text())
    ev = json.loads((bundle / "eval.json").read_text())
    el = ev["eval_loss"]
    title = f"personatune run {bundle.name}: data sha256 {tc['data_sha256'][:12]}"
    description = (f"Run: {bundle.name}\nData sha256: {tc['data_sha256']}\n"
                   f"Held-out loss: base {el['base']:.4f} -> tuned {el['tuned']:.4f}\n"
                   f"Code version: {tc.get('code_version', '?')}\n")
    return title, description


def push_bundle(bundle: str | Path, repo_id: str, token: str | None, *, private: bool = True,
                endpoint: str | None = None, run_label: str | None = None) -> PushResult:
    """Create `repo_id` if missing, then push the bundle and its model card in one commit.

    Raises HubTransientError (retry) or HubPublishError (fix something). A repeated push of the same files
    is a no-op commit on the Hub side (the client skips unchanged files).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    bundle = Path(bundle)
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    what = f"pushing {bundle.name} to {repo_id}"
    if not REPO_ID_RE.match(repo_id or ""):
        raise HubPublishError(f"{what}: --hub-repo must look like 'namespace/name', got {repo_id!r}")
    if constants.is_offline_mode():
        raise HubPublishError(f"{what}: HF_HUB_OFFLINE=1 is set; unset it (or set 0) to reach {endpoint}")
    if not token:
        raise HubPublishError(f"{what}: no Hugging Face token. Set HF_TOKEN, or save a Prefect Secret block "
                              "'hf-token' (PERSONATUNE_HF_TOKEN_BLOCK names another), or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token, library_name="personatune")

    # Fail fast on a bad token before uploading anything.
    _call(lambda: api.whoami(), what, repo_id, endpoint, token)
    repo_url = _call(lambda: api.create_repo(repo_id, private=private, exist_ok=True), what, repo_id, endpoint, token)

    title, description = commit_message(bundle)
    if run_label:
        description += f"Orchestrator run: {run_label}\n"
    with tempfile.TemporaryDirectory(prefix="personatune-hub-") as tmp:
        staged = _stage(bundle, Path(tmp), repo_id)
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sorted(staged.iterdir())]
        info = _call(lambda: api.create_commit(repo_id, operations, commit_message=title,
                                               commit_description=description),
                     what, repo_id, endpoint, token)
    return PushResult(repo_id=repo_id, repo_url=str(repo_url), commit_url=info.commit_url, commit_oid=info.oid,
                      endpoint=endpoint)


def _stage(bundle: Path, tmp: Path, repo_id: str) -> Path:
    """The files of the commit: the bundle, the model card, and adapter_config.json naming the Hub base."""
    import shutil

    staged = tmp / "commit"
    staged.mkdir()
    for path in bundle.iterdir():
        if path.is_file() and path.name not in SKIP_FILES and not path.name.startswith("."):
            shutil.copy2(path, staged / path.name)
    cfg = json.loads((bundle / "training_config.json").read_text())["config"]
    base_id = hub_base_model(cfg["base_model"])
    adapter_cfg = staged / "adapter_config.json"
    if base_id and adapter_cfg.is_file():  # not a path on the training machine: the id anyone can load
        data = json.loads(adapter_cfg.read_text())
        data["base_model_name_or_path"] = base_id
        if cfg["base_model"] != EMBEDDED_MODEL and cfg.get("base_revision") not in (None, "", "main"):
            data["revision"] = cfg["base_revision"]
        adapter_cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (staged / "README.md").write_text(render_model_card(bundle, repo_id), encoding="utf-8")
    return staged


# ------------------------------------------------------------------------------------------------------------
# Loading back
# ------------------------------------------------------------------------------------------------------------
def split_ref(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """`you/adapter@v1` -> ("you/adapter", "v1"); an explicit `revision` wins."""
    if "@" in ref and not Path(ref).expanduser().exists():
        ref, _, rev = ref.rpartition("@")
        revision = revision or rev or None
    return ref, revision


def resolve_adapter(ref: str, revision: str | None = None, *, cache_dir: str | Path | None = None,
                    token: str | None = None) -> str:
    """A local folder holding an adapter, for `--adapter REF` in chat, evaluation or anywhere else.

    `ref` is a local folder (returned as is) or a Hub repo id, optionally `repo@revision` (branch, tag or
    commit); a repo is fetched with `snapshot_download` (from the cache when offline) from HF_ENDPOINT.
    """
    from huggingface_hub import snapshot_download

    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise HubPublishError(f"adapter folder {path} has no adapter_config.json; is it a peft adapter?")
        return str(path.resolve())
    repo_id, revision = split_ref(ref, revision)
    if ref.startswith((".", "/", "~")) or not REPO_ID_RE.match(repo_id):
        raise HubPublishError(f"adapter {ref!r} is neither a local folder nor a Hub repo id ('namespace/name')")
    endpoint = hub_endpoint()
    token = token or None  # None: huggingface_hub uses HF_TOKEN or the saved login
    what = f"downloading adapter {repo_id}" + (f"@{revision}" if revision else "")
    folder = _call(lambda: snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                             token=token),
                   what, repo_id, endpoint, token)
    if not (Path(folder) / "adapter_config.json").is_file():
        raise HubPublishError(f"{what}: the repo has no adapter_config.json; is it a peft adapter?")
    return folder
