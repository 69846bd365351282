"""Publish an adapter bundle to the Hugging Face Hub, and load an adapter back from a folder or a Hub repo.

ML-core side of the publish stage (no Prefect here): the evaluation gate, the model card, commits with the
real `huggingface_hub` client, and `resolve_adapter` for anything that loads an adapter.

Releases: every pushed run lands on its own branch `release/<run>` (`push_release`); `main` moves only when a
release is promoted, and then its files equal that release's exactly; `rollback_hub` makes an earlier release
(or any branch, tag or commit) `main` again in one commit; `list_hub_releases` says which release main holds.
A download of `main` is therefore always some release, byte for byte. `push_bundle` (one commit to main) stays
for callers that do not use releases.

Errors from the Hub are turned into two exception types whose messages say what to fix and never hold the
token (they carry no reference to the failed HTTP request, whose headers do):

- `HubTransientError`: connection errors, 429 and 5xx. Worth retrying: `with_retries` does, with exponential
  backoff, waiting at least as long as the Hub's `Retry-After` asks.
- `HubPublishError`: everything else (401/403/404, bad repo id, offline mode, no token). Retrying won't help.

`HF_ENDPOINT` is read at call time, so a self-hosted Hub-compatible server (or the test server) works.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from personatune.config import EMBEDDED_MODEL
from personatune.decoding import Decoding
from personatune.prompt import TEMPLATE

# The embedded model is the Q4_1 GGUF of this Hub model, dequantized: on the Hub the adapter names the original.
EMBEDDED_BASE_ON_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"  # the project's and the embedded base's; PERSONATUNE_HUB_LICENSE overrides
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Bundle files that go to the Hub (the model card README.md is added); markers and dotfiles stay local.
SKIP_FILES = {".complete"}
EXPORT_FOLDERS = ("merged", "gguf")  # personatune.export writes them into the bundle; the commit carries them
RELEASE_PREFIX = "release/"
# One git ref component: what a run name must be to name a branch (run names are "20261129-001234-70af8535").
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_OID_RE = re.compile(r"^[0-9a-f]{7,64}$")
# Written by the Hub when it creates a repo (LFS rules). A release branch keeps it; it is no bundle file.
HUB_HOUSEKEEPING = {".gitattributes"}
# The first commit of a repo whose main has none (some self-hosted servers): a branch needs a commit to start from.
EMPTY_MAIN_README = """---
library_name: peft
---
# {name}

No release has been promoted yet. Every personatune run is pushed to its own branch `release/<run>`; `main`
holds the promoted release.
"""


class HubError(RuntimeError):
    """Publishing to or loading from the Hub failed. `status` is the HTTP status, if any; `retry_after` the
    seconds the Hub asked to wait (its `Retry-After` header), if it did."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class HubTransientError(HubError):
    """Connection error, timeout, 429 or 5xx: the same call may succeed later."""


class HubPublishError(HubError):
    """A problem that retrying will not fix (bad token, no rights, missing repo, bad configuration)."""


# ------------------------------------------------------------------------------------------------------------
# Evaluation gate
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


def render_model_card(bundle: str | Path, repo_id: str, license: str | None = None,
                      releases: list[dict] | None = None) -> str:
    """README.md with YAML metadata (base_model, library_name, pipeline_tag, tags, license, data hash, eval
    results) and a body with the eval table, the prompt template and the usage snippet; with `releases`, a
    "Release history" table too (see `release_history_table`)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from personatune.evaluate import metric_table

    bundle = Path(bundle)
    ev = json.loads((bundle / "eval.json").read_text())
    tc = json.loads((bundle / "training_config.json").read_text())
    cfg, data_sha = tc["config"], tc["data_sha256"]
    base_id = hub_base_model(cfg["base_model"])
    license = license or os.environ.get("PERSONATUNE_HUB_LICENSE") or DEFAULT_LICENSE
    el, tl = ev["eval_loss"], ev["train_loss"]
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
            EvalResult(task_type="text-generation", dataset_type="personatune/golden", dataset_name="golden.csv",
                       dataset_split="test", metric_type="loss", metric_name="golden loss (per reply token)",
                       metric_value=round(ev["metrics"]["challenger"]["golden_loss"], 6)),
            *([EvalResult(task_type="text-generation", dataset_type="personatune/golden+probes",
                          dataset_name="golden.csv + unseen-topic probes", dataset_split="test", metric_type="cosine",
                          metric_name="persona similarity",
                          metric_value=round(ev["metrics"]["challenger"]["persona_similarity"], 4))]
              if ev["metrics"]["challenger"]["persona_similarity"] is not None else []),
            EvalResult(task_type="text-generation", dataset_type="personatune/quotes", dataset_name=dataset_name,
                       dataset_split="held-out", metric_type="loss", metric_name="held-out loss (per response token)",
                       metric_value=round(el["tuned"], 6)),
        ],
        dataset_sha256=data_sha,
        **({"datasets": datasets} if (datasets := data_repos(tc)) else {}),
        personatune={
            "run": run,
            "data_sha256": data_sha,
            **({"data_source": tc["data_sources"]["quotes_csv"]["pinned"]}
               if "quotes_csv" in tc.get("data_sources", {}) else {}),
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
    samples = "\n".join(f"- **User:** {s['user']}\n  **Reply:** {s['tuned']}" for s in ev.get("samples", []))
    verdict_text = ""
    if (bundle / "release.json").is_file():
        release = json.loads((bundle / "release.json").read_text())
        d = release.get("diff")
        verdict_text = (f"**Release verdict:** {release['verdict']['reason']}.\n" + (
            f"Data since the champion: {d['added']} rows added, {d['removed']} removed, {d['edited']} edited.\n"
            if d else ""))
    body = f"""
# {repo_id.split('/')[-1]}

A persona LoRA adapter, fine-tuned {'with QLoRA ' if cfg.get('load_in_4bit') else ''}by personatune from a
curated CSV of persona lines. Base model: {base_note}.

Run `{run}`, data sha256 `{data_sha}`{data_line(tc)}.

## Use it

```python
{usage_snippet(repo_id, base_id).rstrip()}
```

Private repos need a token (`HF_TOKEN` or `hf auth login`). {prompt_usage(repo_id, cfg.get("prompt_format", "scaffold"))}
## Evaluation

Base model, the champion this release was judged against (when there was one) and this adapter, on fixed sets
that an edit to the training CSV cannot move: `golden.csv` ({ev.get('golden_rows')} rows written for evaluation,
never trained on) and {ev.get('probe_prompts')} unseen-topic probes (everyday topics absent from the training data),
replies decoded with this repo's `generation_config.json` ({Decoding(**ev['decoding']).describe() if ev.get('decoding') else 'n/a'}):
{contrast_note(repo_id, ev.get('decoding') or {})}

{chr(10).join(metric_table(ev))}

{verdict_text}
Sample replies (unseen-topic probes):

{samples or '(none)'}

## Training

LoRA r={cfg['lora_r']}, alpha={cfg['lora_alpha']}, dropout={cfg['lora_dropout']} on `{lora_targets_of(bundle, cfg)}`;
{'4-bit NF4 base with double quantization' if cfg.get('load_in_4bit') else 'unquantized base'};
{ev.get('training', {}).get('steps')} optimizer steps, learning rate {cfg['learning_rate']}, batch
{cfg['micro_batch_size']} x {cfg['grad_accum']}, seed {cfg['seed']}. The full resolved configuration is in
`training_config.json`, the per-step loss in `history.json`, the evaluation in `eval.json`.
"""
    if releases is not None:
        body += f"""
## Release history

Every run is pushed to its own branch `{RELEASE_PREFIX}<run>`; `main` holds the promoted release (or the one a
rollback restored). This is `{RELEASE_PREFIX}{run}`; load exactly one release with
`revision="{RELEASE_PREFIX}<run>"` in `PeftModel.from_pretrained`.

{release_history_table(releases)}"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def contrast_note(repo_id: str, decoding: dict) -> str:
    """What a reader must know when the evaluation decoded with the contrast with the base: plain `generate()`
    ignores `base_contrast`, and personatune's chat applies it."""
    beta = decoding.get("base_contrast") or 0
    if not beta:
        return ""
    return f"""
The replies were contrasted with the base (`base_contrast` {beta:g} in `generation_config.json`): at each step the
adapter's log-probabilities count {1 + beta:g}x and the base's -{beta:g}x, over the tokens the adapter finds plausible.
Plain `model.generate()` ignores that setting and decodes without it (more of the base's stock phrasing); personatune
decodes as measured: `python -m flows.chat --adapter {repo_id}`.
"""


def lora_targets_of(bundle: Path, cfg: dict) -> str:
    """The adapted modules as configured, with what 'auto' resolved to for this base (adapter_config.json)."""
    adapter_config = bundle / "adapter_config.json"
    if cfg["lora_targets"] != "auto" or not adapter_config.is_file():
        return cfg["lora_targets"]
    targets = json.loads(adapter_config.read_text()).get("target_modules")
    return f"auto: {','.join(sorted(targets))}" if isinstance(targets, list) else f"auto: {targets}"


def prompt_usage(repo_id: str, prompt_format: str) -> str:
    """The card's "how to prompt it" text and snippet, in the format the adapter was trained with (`prompt_format` of
    training_config.json). Either way this repo's chat_template.jinja renders that format, so `apply_chat_template`
    (and an OpenAI-style server that applies it) prompts the adapter as it was trained."""
    if prompt_format == "chat":
        return f"""It was trained on the base tokenizer's chat template (`prompt_format: chat`; this repo's
`chat_template.jinja`): the instruction is the system message, the user's line the user turn, and the reply ends
with the template's end-of-turn token, where generation stops:

```python
from transformers import AutoTokenizer, GenerationConfig
tok = AutoTokenizer.from_pretrained("{repo_id}")
messages = [{{"role": "system", "content": "Respond as Wednesday Addams."}},
            {{"role": "user", "content": "Do you like sunny days?"}}]
inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
# generation_config.json (in this repo) holds the decoding the evaluation used: the end-of-turn token as EOS,
# the repetition penalty, and sampling if the run set a temperature
gen = GenerationConfig.from_pretrained("{repo_id}")
out = model.generate(**inputs, generation_config=gen)
print(tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
```

## Prompt template

The base model's chat template (`chat_template.jinja`), with the instruction as the system message.
"""
    prompt = TEMPLATE.format(instruction="{instruction}", user="{user}")
    return f"""Then prompt with the training template and stop
at the next `###` (this repo's `chat_template.jinja` renders the same template from a system and a user message):

```python
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("{repo_id}")
prompt = {json.dumps(prompt)}.format(instruction="Respond as Wednesday Addams.", user="Do you like sunny days?")
# generation_config.json (in this repo) holds the decoding the evaluation used: EOS, the `###` stop string,
# the repetition penalty, and sampling if the run set a temperature
from transformers import GenerationConfig
gen = GenerationConfig.from_pretrained("{repo_id}")
out = model.generate(**tok(prompt, return_tensors="pt", split_special_tokens=True), generation_config=gen, tokenizer=tok)
print(tok.decode(out[0], skip_special_tokens=True)[len(prompt):].split("###")[0].strip())
```

## Prompt template

```
{prompt}```
"""


def release_history_table(releases: list[dict]) -> str:
    """Markdown table of releases, in the order given: run, data hash (8 chars), date, golden loss, persona
    similarity, verdict ("promoted", "rejected", "rolled back"). Missing numbers show as an em dash."""
    def number(value, digits: int) -> str:
        return "\u2014" if value is None else f"{float(value):.{digits}f}"

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| run | data | date | golden loss | persona similarity | verdict |", "|---|---|---|---|---|---|"]
    for r in releases:
        lines.append(f"| `{cell(r['run'])}` | `{cell((r.get('data_sha256') or '')[:8])}` | "
                     f"{cell(_release_date(r.get('created')))} | {number(r.get('golden_loss'), 4)} | "
                     f"{number(r.get('persona_similarity'), 3)} | {cell(r.get('verdict') or '')} |")
    return "\n".join(lines) + "\n"


def _release_date(created) -> str:
    """ISO time -> "2026-11-29 00:12 UTC" (minutes are enough to tell releases of one day apart)."""
    if not created:
        return "\u2014"
    try:
        when = dt.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return str(created)
    if when.tzinfo is None:
        return when.strftime("%Y-%m-%d %H:%M")
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


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
        if status == 412:  # create_commit(parent_commit=...) and the branch moved meanwhile: re-read and retry
            return HubTransientError(f"{what}: the branch moved while this commit was prepared (412){hint}; "
                                     "will retry", status)
        if status == 404:
            return HubPublishError(
                f"{what}: {repo_id!r} (or that revision) was not found at {endpoint} (404){hint}. Check the repo "
                "id (--hub-repo / --adapter), the revision, HF_ENDPOINT, and that the token can see the repo", status)
        if status == 429 or status >= 500:
            wait = retry_after_seconds(exc.response.headers.get("Retry-After"))
            asked = f", asking to wait {wait:g} s (Retry-After)" if wait is not None else ""
            return HubTransientError(f"{what}: the Hub at {endpoint} answered {status}{asked}{hint}; will retry",
                                     status, retry_after=wait)
        return HubPublishError(f"{what}: the Hub at {endpoint} answered {status}: {detail}{hint}", status)
    if _is_connection_error(exc):
        return HubTransientError(f"{what}: cannot reach {endpoint} ({type(exc).__name__}); will retry")
    if isinstance(exc, ValueError):  # e.g. the Hub rejected the model card metadata
        return HubPublishError(f"{what}: {_scrub(str(exc), token)}")
    return HubPublishError(f"{what}: {type(exc).__name__}: {_scrub(str(exc), token)}")


def retry_after_seconds(value: str | None, now: dt.datetime | None = None) -> float | None:
    """The `Retry-After` header as seconds from now: delay-seconds ("120") or an HTTP date (RFC 9110)."""
    from email.utils import parsedate_to_datetime

    value = (value or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - (now or dt.datetime.now(dt.timezone.utc))).total_seconds())


RETRY_DELAYS_S = (2, 4, 8, 16)  # exponential backoff between the attempts of a push
RETRY_JITTER = 0.2              # +-20%, so workers that failed together do not come back together
MAX_RETRY_AFTER_S = 300         # a longer wait asked by the Hub fails the push (run it again later) instead


def with_retries(call, *, delays=RETRY_DELAYS_S, jitter: float = RETRY_JITTER, sleep=time.sleep, log=None,
                 max_retry_after: float = MAX_RETRY_AFTER_S, rng: random.Random | None = None):
    """`call()`, again after each HubTransientError (connection refused or reset, timeout, 412, 429, 5xx), up to
    `len(delays)` more times. Before retry n it waits `delays[n]` seconds +- `jitter`, or the Hub's Retry-After
    if that is longer; a Retry-After above `max_retry_after` gives up at once. `sleep` and `log` are
    parameters so a caller (or a test) decides how to wait and where the lines go. HubPublishError (a bad token,
    no rights, a missing repo) is never retried."""
    rng = rng or random.Random()
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except HubTransientError as e:
            error = e
        if attempt == len(delays):
            raise error
        wait = delays[attempt] * (1 + jitter * (2 * rng.random() - 1))
        if error.retry_after is not None:
            if error.retry_after > max_retry_after:
                raise HubTransientError(f"{error}; the Hub asks to wait {error.retry_after:g} s, more than the "
                                        f"{max_retry_after:g} s a push waits: run it again later", error.status,
                                        retry_after=error.retry_after)
            wait = max(wait, error.retry_after)
        if log:
            log(f"{error} (attempt {attempt + 1} of {len(delays) + 1}); retrying in {wait:.1f} s")
        sleep(wait)


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


def data_repos(tc: dict) -> list[str]:
    """The Hub dataset repos the run read (model card `datasets:` metadata links the adapter to them)."""
    return sorted({s["dataset"] for s in tc.get("data_sources", {}).values() if s.get("dataset")})


def data_line(tc: dict) -> str:
    """', trained on <url> at revision <rev>' for a CSV read from a Hub dataset repo or a bucket, else ''."""
    source = tc.get("data_sources", {}).get("quotes_csv")
    if not source:
        return ""
    return f", trained on `{source['location']}` at revision `{source['revision'] or source['content_id']}`"


def commit_message(bundle: str | Path) -> tuple[str, str]:
    bundle = Path(bundle)
    tc = json.loads((bundle / "training_config.json").read_text())
    ev = json.loads((bundle / "eval.json").read_text())
    el = ev["eval_loss"]
    title = f"personatune run {bundle.name}: data sha256 {tc['data_sha256'][:12]}"
    sources = "".join(f"Data source ({k}): {s['pinned']}\n" for k, s in sorted(tc.get("data_sources", {}).items()))
    description = (f"Run: {bundle.name}\nData sha256: {tc['data_sha256']}\n{sources}"
                   f"Held-out loss: base {el['base']:.4f} -> tuned {el['tuned']:.4f}\n"
                   f"Code version: {tc.get('code_version', '?')}\n")
    return title, description


def push_bundle(bundle: str | Path, repo_id: str, token: str | None, *, private: bool = True,
                endpoint: str | None = None, run_label: str | None = None) -> PushResult:
    """Create `repo_id` if missing, then push the bundle and its model card in one commit.

    Raises HubTransientError (retry) or HubPublishError (fix something). A repeated push of the same files
    is a no-op commit on the Hub side (the client skips unchanged files).
    """
    from huggingface_hub import CommitOperationAdd

    bundle = Path(bundle)
    what = f"pushing {bundle.name} to {repo_id}"
    api, endpoint = _client(what, repo_id, token, endpoint)

    # Fail fast on a bad token before uploading anything.
    _call(lambda: api.whoami(), what, repo_id, endpoint, token)
    repo_url = _call(lambda: api.create_repo(repo_id, private=private, exist_ok=True), what, repo_id, endpoint, token)

    title, description = commit_message(bundle)
    if run_label:
        description += f"Orchestrator run: {run_label}\n"
    with tempfile.TemporaryDirectory(prefix="personatune-hub-") as tmp:
        staged = _stage(bundle, Path(tmp), repo_id)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staged / name))
                      for name in staged_files(staged)]
        info = _call(lambda: api.create_commit(repo_id, operations, commit_message=title,
                                               commit_description=description),
                     what, repo_id, endpoint, token)
    return PushResult(repo_id=repo_id, repo_url=str(repo_url), commit_url=info.commit_url, commit_oid=info.oid,
                      endpoint=endpoint)


def _client(what: str, repo_id: str, token: str | None, endpoint: str | None = None, *, need_token: bool = True):
    """(HfApi, endpoint) after the checks that need no network: repo id, offline mode, token."""
    from huggingface_hub import HfApi, constants

    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    if not REPO_ID_RE.match(repo_id or ""):
        raise HubPublishError(f"{what}: --hub-repo must look like 'namespace/name', got {repo_id!r}")
    if constants.is_offline_mode():
        raise HubPublishError(f"{what}: HF_HUB_OFFLINE=1 is set; unset it (or set 0) to reach {endpoint}")
    if need_token and not token:
        raise HubPublishError(f"{what}: no Hugging Face token. Set HF_TOKEN, or save a Prefect Secret block "
                              "'hf-token' (PERSONATUNE_HF_TOKEN_BLOCK names another), or run `hf auth login`")
    return HfApi(endpoint=endpoint, token=token or None, library_name="personatune"), endpoint


def _stage(bundle: Path, tmp: Path, repo_id: str, releases: list[dict] | None = None) -> Path:
    """The files of the commit: the bundle, the model card, and adapter_config.json naming the Hub base."""
    import shutil

    staged = tmp / "commit"
    staged.mkdir()
    for path in bundle.iterdir():
        if path.is_file() and path.name not in SKIP_FILES and not path.name.startswith("."):
            shutil.copy2(path, staged / path.name)
    for folder in EXPORT_FOLDERS:  # merged/ and gguf/ of an export: GBs on a 7B, so linked when the disk allows
        for path in sorted((bundle / folder).glob("*")) if (bundle / folder).is_dir() else []:
            if path.is_file() and not path.name.startswith("."):
                (staged / folder).mkdir(exist_ok=True)
                try:
                    os.link(path, staged / folder / path.name)
                except OSError:
                    shutil.copy2(path, staged / folder / path.name)
    cfg = json.loads((bundle / "training_config.json").read_text())["config"]
    base_id = hub_base_model(cfg["base_model"])
    adapter_cfg = staged / "adapter_config.json"
    if base_id and adapter_cfg.is_file():  # not a path on the training machine: the id anyone can load
        data = json.loads(adapter_cfg.read_text())
        data["base_model_name_or_path"] = base_id
        if cfg["base_model"] != EMBEDDED_MODEL and cfg.get("base_revision") not in (None, "", "main"):
            data["revision"] = cfg["base_revision"]
        adapter_cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (staged / "README.md").write_text(render_model_card(bundle, repo_id, releases=releases), encoding="utf-8")
    return staged


def staged_files(staged: Path) -> list[str]:
    """Repo paths of the commit: the bundle's files and those of its export folders (`gguf/model-f16.gguf`)."""
    return sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------------------
# Releases: a branch per run, main moves on promotion and rollback
# ------------------------------------------------------------------------------------------------------------
def release_branch(run_name: str) -> str:
    """The branch holding the release of `run_name`: `release/<run>`.

    The Hub takes slashes in branch names: `HfApi.create_branch` URL-encodes the whole name (`quote(branch,
    safe="")`) and rejects only names under `refs/`, the Hub itself keeps `refs/convert/parquet` branches, and
    huggingface.js fixed uploads "to a branch with a slash in it" (PR #1757). The prefix groups releases in the
    Hub's branch menu and keeps them apart from branches people make by hand.
    """
    if not RUN_NAME_RE.match(run_name or "") or ".." in run_name or run_name.endswith(".lock"):
        raise HubPublishError(f"run name {run_name!r} cannot name a release branch: use letters, digits, '.', "
                              "'_' and '-' (e.g. 20261129-001234-70af8535)")
    return RELEASE_PREFIX + run_name


@dataclass(frozen=True)
class ReleasePush:
    repo_id: str
    branch: str
    branch_commit_url: str
    branch_commit_oid: str
    main_commit_url: str | None  # None unless promoted
    main_commit_oid: str | None  # None unless promoted
    endpoint: str


def push_release(bundle: str | Path, repo_id: str, token: str | None, *, private: bool = True,
                 run_label: str | None = None, promote: bool, releases: list[dict] | None = None,
                 endpoint: str | None = None) -> ReleasePush:
    """Push the bundle as the release `release/<run>`; with `promote`, make main's files equal to it.

    Creates the repo if missing (private per flag) and the branch from main's head, then ONE commit on the
    branch: the staged bundle and its model card (with `releases` as its release history), deleting what the
    branch inherited from main that the bundle lacks (but `.gitattributes`). Promotion is a second commit, on
    main (see `_make_equal`). A repeated call (a task retry) commits nothing that is already there: the client
    skips files whose blob is identical on that revision, and a commit with nothing left is not made.
    """
    from huggingface_hub import CommitOperationAdd

    bundle = Path(bundle)
    run = bundle.name
    what = f"pushing release {run} to {repo_id}"
    branch = release_branch(run)
    api, endpoint = _client(what, repo_id, token, endpoint)
    call = lambda fn: _call(fn, what, repo_id, endpoint, token)  # noqa: E731

    call(lambda: api.whoami())  # fail fast on a bad token before uploading anything
    call(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    branches = {b.name for b in call(lambda: api.list_repo_refs(repo_id)).branches}
    if "main" not in branches:
        readme = EMPTY_MAIN_README.format(name=repo_id.split("/")[-1]).encode()
        call(lambda: api.create_commit(repo_id, [CommitOperationAdd("README.md", readme)], revision="main",
                                       commit_message="Start main: releases live on release/<run> branches"))
    if branch not in branches:
        call(lambda: api.create_branch(repo_id, branch=branch, revision="main", exist_ok=True))

    title, description = commit_message(bundle)
    if run_label:
        description += f"Orchestrator run: {run_label}\n"
    with tempfile.TemporaryDirectory(prefix="personatune-hub-") as tmp:
        staged = _stage(bundle, Path(tmp), repo_id, releases=releases)
        head = call(lambda: api.model_info(repo_id, revision=branch))
        files = staged_files(staged)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staged / name)) for name in files]
        operations += _deletions({s.rfilename for s in head.siblings or []} - set(files) - HUB_HOUSEKEEPING)
        info = call(lambda: api.create_commit(repo_id, operations, revision=branch, commit_message=title,
                                              commit_description=description, parent_commit=head.sha))
    main = None
    if promote:
        main = _make_equal(api, repo_id, "main", info.oid, f"Promote {branch} to main",
                           f"{title}\n\n{description}", what, endpoint, token)
    return ReleasePush(repo_id=repo_id, branch=branch, branch_commit_url=info.commit_url,
                       branch_commit_oid=info.oid, main_commit_url=main.commit_url if main else None,
                       main_commit_oid=main.oid if main else None, endpoint=endpoint)


def rollback_hub(repo_id: str, token: str | None, to: str, *, run_label: str | None = None,
                 endpoint: str | None = None) -> tuple[str, str]:
    """Make main's files identical to an earlier release, in one commit; returns (commit_url, commit_oid).

    `to` is a run name (its branch `release/<run>`) or any branch, tag or commit oid. An unknown name fails
    with the releases the repo has; a rollback to what main already holds makes no commit.
    """
    what = f"rolling back {repo_id} to {to}"
    api, endpoint = _client(what, repo_id, token, endpoint)
    call = lambda fn: _call(fn, what, repo_id, endpoint, token)  # noqa: E731

    call(lambda: api.whoami())
    refs = call(lambda: api.list_repo_refs(repo_id))
    names = {r.name for r in refs.branches} | {r.name for r in refs.tags}
    candidate = RELEASE_PREFIX + to if RUN_NAME_RE.match(to or "") else None
    if candidate in names:
        source = candidate
    elif to in names or COMMIT_OID_RE.match(to or ""):
        source = to  # a commit oid the server does not know fails below with a 404 naming it
    else:
        runs = sorted(r.name[len(RELEASE_PREFIX):] for r in refs.branches if r.name.startswith(RELEASE_PREFIX))
        shown = ", ".join(runs[-10:]) or "none"
        raise HubPublishError(f"{what}: {repo_id!r} at {endpoint} has no release {to!r} (no branch "
                              f"{candidate or RELEASE_PREFIX + '<run>'!r}) and no branch, tag or commit named "
                              f"{to!r}. Releases there: {shown}. Pass a run name from that list, a branch, a tag "
                              "or a commit oid")
    title = f"Roll back main to {to}" + (f" ({source})" if source != to else "")
    description = f"Restores the files of {source}.\n" + (f"Orchestrator run: {run_label}\n" if run_label else "")
    info = _make_equal(api, repo_id, "main", source, title, description, what, endpoint, token)
    return info.commit_url, info.oid


def list_hub_releases(repo_id: str, token: str | None, *, endpoint: str | None = None) -> list[dict]:
    """The release branches, oldest run first (run names start with their UTC time): branch, run, commit_oid
    and is_main, true where the branch's files equal main's (same paths, same blob shas)."""
    what = f"listing releases of {repo_id}"
    api, endpoint = _client(what, repo_id, token, endpoint, need_token=False)
    call = lambda fn: _call(fn, what, repo_id, endpoint, token)  # noqa: E731

    def tree(oid: str) -> dict[str, str]:
        from huggingface_hub.hf_api import RepoFile

        entries = call(lambda: list(api.list_repo_tree(repo_id, revision=oid, recursive=True)))
        return {e.path: e.blob_id for e in entries if isinstance(e, RepoFile)}

    refs = call(lambda: api.list_repo_refs(repo_id))
    heads = {b.name: b.target_commit for b in refs.branches}
    main_tree = tree(heads["main"]) if "main" in heads else None
    releases = []
    for name, oid in sorted(heads.items()):
        if name.startswith(RELEASE_PREFIX):
            is_main = main_tree is not None and (oid == heads["main"] or tree(oid) == main_tree)
            releases.append({"branch": name, "run": name[len(RELEASE_PREFIX):], "commit_oid": oid,
                             "is_main": is_main})
    return releases


def _deletions(paths) -> list:
    from huggingface_hub import CommitOperationDelete

    return [CommitOperationDelete(path_in_repo=p) for p in sorted(paths)]


def _make_equal(api, repo_id: str, target: str, source: str, title: str, description: str, what: str,
                endpoint: str, token: str | None):
    """One commit on branch `target` after which its files are exactly those of revision `source`.

    Every file of `source` is copied (regular files pass through the client, LFS files are copied on the Hub
    without a download), files of `target` absent from `source` are deleted. `parent_commit` pins the target
    head we compared against: if it moved meanwhile the Hub answers 412 and the caller retries. Files already
    identical are skipped by the client, and nothing to change means no commit (the head is returned).
    """
    from huggingface_hub import CommitOperationCopy

    call = lambda fn: _call(fn, what, repo_id, endpoint, token)  # noqa: E731
    src = call(lambda: api.model_info(repo_id, revision=source))
    dst = call(lambda: api.model_info(repo_id, revision=target))
    src_files = {s.rfilename for s in src.siblings or []}
    dst_files = {s.rfilename for s in dst.siblings or []}
    operations = [CommitOperationCopy(src_path_in_repo=p, path_in_repo=p, src_revision=src.sha)
                  for p in sorted(src_files)]
    operations += _deletions(dst_files - src_files)
    return call(lambda: api.create_commit(repo_id, operations, revision=target, commit_message=title,
                                          commit_description=description + f"Source commit: {src.sha}\n",
                                          parent_commit=dst.sha))


def push_exports(bundle: str | Path, repo_id: str, token: str | None, *, revision: str | None = None,
                 private: bool = True, endpoint: str | None = None) -> PushResult:
    """The export outputs of a bundle (Modelfile, merged/, gguf/) added to `repo_id` at `revision` (default
    main) in one commit, next to the adapter already there (`python -m flows.export --hub-repo`)."""
    from huggingface_hub import CommitOperationAdd

    bundle = Path(bundle)
    what = f"pushing the export of {bundle.name} to {repo_id}"
    api, endpoint = _client(what, repo_id, token, endpoint)
    call = lambda fn: _call(fn, what, repo_id, endpoint, token)  # noqa: E731
    call(lambda: api.whoami())
    repo_url = call(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    paths = [p for folder in EXPORT_FOLDERS if (bundle / folder).is_dir() for p in sorted((bundle / folder).iterdir())
             if p.is_file() and not p.name.startswith(".")]
    paths += [bundle / "Modelfile"] if (bundle / "Modelfile").is_file() else []
    if not paths:
        raise HubPublishError(f"{what}: {bundle} holds no export (merged/, gguf/ or Modelfile); export first")
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(bundle).as_posix(), path_or_fileobj=str(p))
                  for p in paths]
    formats = ", ".join(sorted({p.relative_to(bundle).parts[0] for p in paths}))
    info = call(lambda: api.create_commit(repo_id, operations, revision=revision, commit_message=f"Export {formats}",
                                          commit_description=f"Exported from bundle {bundle.name} by personatune\n"))
    return PushResult(repo_id=repo_id, repo_url=str(repo_url), commit_url=info.commit_url, commit_oid=info.oid,
                      endpoint=endpoint)


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
