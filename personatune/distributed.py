"""Data-parallel training over the GPUs of one host: one process ("rank") per GPU, each with its own 4-bit base,
started by PyTorch's own launcher, torchrun (`python -m torch.distributed.run`).

`train_distributed` writes a spec (config, plan, folders) and runs, as one supervised subprocess,

    python -m torch.distributed.run --standalone --nproc-per-node N --tee 3 -m personatune.train_rank spec.json

with CUDA_VISIBLE_DEVICES set to exactly the GPUs the run may use (`devices_for`). torchrun starts the ranks, gives
them their environment (RANK, LOCAL_RANK, WORLD_SIZE, a free rendezvous port) and, when one rank exits non-zero or
is killed, stops the others. `launch` streams every line to `log` as `[rank i] ...` and raises `RankFailed` with
the failing rank's exit status and last lines (from torchrun's "Root Cause" report). A hung rank: the others wait
in a collective until its timeout (`COLLECTIVE_TIMEOUT_S`, set on every rank) and exit with an error, which ends
the group the same way; a group that prints nothing at all for `silence_timeout_s` is stopped as hung (`RankHung`).

Semantics (README, "Multi-GPU"): each GPU runs the micro-batch x accumulation of the plan made for one card, so
one optimizer step takes `num_gpus` times the examples of a one-GPU step (the gradients of the ranks are
averaged). An epoch therefore has 1/num_gpus of the steps; `max_steps` counts optimizer steps; the warmup share
(`warmup_ratio`) is of the steps actually taken; the learning rate is used as given (no scaling).
Only rank 0 writes the adapter (atomically, as `train_adapter` does); a retry resumes from the shared checkpoints.
A rank that runs out of CUDA memory exits with `EXIT_OUT_OF_MEMORY`, so the caller can back off and relaunch
(personatune.train.train_with_oom_backoff). Plain Python: no Prefect here.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from personatune.config import ConfigError, FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
# NVLink multicast off (a program using it can take a shared host's GPUs out of service): kept in every rank.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
EXIT_OUT_OF_MEMORY = 75  # a rank's exit status after a CUDA out-of-memory error (EX_TEMPFAIL: retry, smaller)
# A collective that waits longer than this on a rank ends that rank with an error (and so the group): a hung rank
# is found in minutes, not in the 30 minutes of the Trainer's default. Loading a 7B base and compiling take < 2 min.
COLLECTIVE_TIMEOUT_S = 600
SILENCE_TIMEOUT_S = 1800  # no line at all from any rank for this long: the group is stopped as hung


class RankFailed(RuntimeError):
    """A rank exited non-zero or was killed; torchrun has stopped the other ranks."""

    def __init__(self, rank: int | None, returncode: int, tail: Sequence[str], world_size: int):
        self.rank, self.returncode, self.tail = rank, returncode, list(tail)
        self.out_of_memory = returncode == EXIT_OUT_OF_MEMORY
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
            if returncode == -signal.SIGKILL:
                how += " (out of host memory?)"
        elif self.out_of_memory:
            how = f"ran out of CUDA memory (exit status {returncode})"
        else:
            how = f"exited with status {returncode}"
        who = f"training rank {rank} of {world_size}" if rank is not None else f"torchrun ({world_size} ranks)"
        last = "\n".join(f"  [rank {rank}] {line}" for line in self.tail) or "  (no output)"
        super().__init__(f"{who} {how}; all ranks stopped. Its last lines:\n{last}")


class RankHung(RuntimeError):
    """No rank printed anything for the silence timeout; the group was stopped."""


def visible_gpus() -> int:
    """CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES respected); 0 without CUDA."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver means no GPU, not a crash here
        return 0


def gpus_for(cfg: FinetuneConfig | int, visible: int | None = None) -> int:
    """GPUs a run trains on: `num_gpus`, or every visible one for 0 (0 on a CPU-only machine)."""
    requested = cfg if isinstance(cfg, int) else cfg.num_gpus
    visible = visible_gpus() if visible is None else visible
    if requested == 0:
        return visible
    if requested > visible:
        raise ConfigError(f"invalid configuration: num_gpus={requested} but {visible} GPU(s) are visible"
                          + ("" if visible else " (no CUDA)") + "; use num_gpus=0 for all visible")
    return requested


def visible_device_ids(environ=None, count: int | None = None) -> list[str]:
    """The ids of the GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else 0..count-1."""
    environ = os.environ if environ is None else environ
    count = visible_gpus() if count is None else count
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()][:count] if count else []
    return [str(i) for i in range(count)]


def pinned_devices(num_gpus: int, visible: Sequence[str]) -> list[str] | None:
    """The GPUs a run of `num_gpus` (0: all visible) trains on, as CUDA_VISIBLE_DEVICES ids for the torchrun group;
    None when it trains in this process (no GPU, or exactly the one GPU this process sees). One GPU out of several
    also goes through torchrun, pinned: a Trainer that sees two GPUs in one process wraps the model in
    nn.DataParallel (twice the planned batch per step; NOTES.md)."""
    n = gpus_for(num_gpus, len(visible))
    if n == 0 or (n == 1 and len(visible) == 1):
        return None
    return list(visible[:n])


def devices_for(cfg: FinetuneConfig) -> list[str] | None:
    return pinned_devices(cfg.num_gpus, visible_device_ids())


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """torchrun for `argv` (a script and its arguments, or `-m module ...`) on one host; --tee 3 copies each rank's
    stdout and stderr to ours, prefixed `[default<rank>]:`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--tee=3",
            *argv]


def rank_env(devices: Sequence[str] | None, extra: dict | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {}), **NCCL_SAFE_ENV, "PYTHONUNBUFFERED": "1",
           "TQDM_DISABLE": "1"}  # progress bars redraw with \r: rank 0 prints one line a logged step instead
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, len(devices or [1])))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


RANK_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")
ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def failed_rank(output: str) -> tuple[int, int] | None:
    """(rank, exit status) of the first rank that failed, from torchrun's error report."""
    m = ROOT_CAUSE.search(output)
    return (int(m.group(1)), int(m.group(2))) if m else None


def launch(argv: Sequence[str], nproc: int, log: Callable[[str], object] = print, devices: Sequence[str] | None = None,
           env: dict | None = None, cwd: str | Path | None = None, silence_timeout_s: float | None = SILENCE_TIMEOUT_S,
           grace_s: float = 10.0, tail_lines: int = 30) -> None:
    """Run `argv` under torchrun on `nproc` ranks (pinned to `devices`), stream their lines to `log` as
    `[rank i] line` (torchrun's own lines as they are) and return when all exit 0. A failed rank: torchrun stops
    the others and `RankFailed` names the rank, its exit status and last lines. No output for `silence_timeout_s`:
    the group is stopped and `RankHung` raised. If we are interrupted (task cancelled) no rank is left behind."""
    tails = [deque(maxlen=tail_lines) for _ in range(nproc)]
    own: deque = deque(maxlen=200)
    last_line = [time.monotonic()]
    proc = subprocess.Popen(torchrun_command(argv, nproc), env=rank_env(devices, env), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            errors="replace", bufsize=1, start_new_session=True)

    def read() -> None:
        for raw in proc.stdout:
            last_line[0] = time.monotonic()
            line = raw.rstrip("\r\n")
            m = RANK_LINE.match(line)
            if m and int(m.group(1)) < nproc:
                tails[int(m.group(1))].append(m.group(2))
                log(f"[rank {m.group(1)}] {m.group(2)}")
            else:
                own.append(line)
                log(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    hung = False
    try:
        while proc.poll() is None:
            if silence_timeout_s and time.monotonic() - last_line[0] > silence_timeout_s:
                hung = True
                break
            time.sleep(0.2)
    finally:
        _stop(proc, grace_s)  # hung, or we were interrupted: the whole group, torchrun and its ranks
        reader.join(timeout=5)
    if hung:
        raise RankHung(f"no output from any of the {nproc} training ranks for {silence_timeout_s:.0f} s: stopped as "
                       "hung. Last lines:\n" + "\n".join(f"  [rank {r}] {l}" for r, t in enumerate(tails) for l in t))
    if proc.returncode != 0:
        found = failed_rank("\n".join(own))
        if found is None:
            raise RankFailed(None, proc.returncode, list(own)[-tail_lines:], nproc)
        raise RankFailed(found[0], found[1], tails[found[0]], nproc)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM torchrun's process group (torchrun and its ranks), SIGKILL what is left after `grace_s`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the group has exited
        proc.wait()
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap torchrun itself, so the group is gone once its ranks are
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def train_distributed(cfg: FinetuneConfig, plan, resolved: str, init_adapter: str | Path, tokenized_dir: str | Path,
                      adapter_dir: str | Path, checkpoints_dir: str | Path | None = None,
                      devices: Sequence[str] | None = None, log: Callable[[str], object] = print,
                      rank_command: Sequence[str] | None = None, silence_timeout_s: float | None = SILENCE_TIMEOUT_S) -> Path:
    """`train_adapter(cfg, plan, ...)` as one torchrun rank per GPU in `devices` (default: `devices_for(cfg)`).
    Returns `adapter_dir`. A re-run with the same folders resumes from the last checkpoint (all ranks load it)."""
    from personatune.files import is_complete

    adapter_dir = Path(adapter_dir)
    if is_complete(adapter_dir):
        return adapter_dir
    devices = list(devices if devices is not None else (devices_for(cfg) or []))
    if not devices:
        raise ConfigError("train_distributed needs at least one GPU (num_gpus, CUDA_VISIBLE_DEVICES)")
    n = len(devices)
    checkpoints = Path(checkpoints_dir) if checkpoints_dir else adapter_dir.with_name(adapter_dir.name + ".checkpoints")
    checkpoints.parent.mkdir(parents=True, exist_ok=True)
    spec = checkpoints.with_name(checkpoints.name + ".launch.json")
    spec.write_text(json.dumps({"config": cfg.to_dict(), "plan": plan.to_dict(), "resolved": str(resolved),
                                "init_adapter": str(init_adapter), "tokenized_dir": str(tokenized_dir),
                                "adapter_dir": str(adapter_dir), "checkpoints_dir": str(checkpoints)}, indent=2))
    log(f"training data-parallel on {n} GPU(s) ({','.join(devices)}) under torchrun: each GPU runs the plan's "
        f"micro-batch x accumulation, so an optimizer step takes {n}x the examples of a one-GPU step; learning rate "
        f"{cfg.learning_rate} as given")
    argv = list(rank_command or ["-m", "personatune.train_rank"]) + [str(spec)]
    launch(argv, n, log=log, devices=devices, silence_timeout_s=silence_timeout_s)
    spec.unlink(missing_ok=True)
    if not is_complete(adapter_dir):
        raise RuntimeError(f"all {n} ranks exited 0 but rank 0 wrote no adapter to {adapter_dir}")
    return adapter_dir
