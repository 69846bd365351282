"""Data-parallel training over the GPUs of one host: one process ("rank") per GPU, each with its own 4-bit base.

`train_distributed` starts `python -m personatune.train_rank <spec.json>` once per GPU with the environment
`torchrun` would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the HF Trainer runs PyTorch
DDP over NCCL; `torchrun --standalone --nproc-per-node N -m personatune.train_rank spec.json` does the same by hand.
`launch_ranks` supervises the ranks: every output line is passed to `log` as `[rank i] ...`, and as soon as one
rank exits non-zero (or is killed) the others are stopped - instead of waiting in a collective for NCCL's
timeout - and `RankFailed` is raised with that rank's exit status and its last lines.

Semantics (README, "Multi-GPU"): each GPU runs the micro-batch x accumulation that the profile chooses for one
card, so one optimizer step takes `num_gpus` times the examples of a one-GPU step (the gradients of the ranks are
averaged). An epoch therefore has 1/num_gpus of the steps; `max_steps` counts optimizer steps; the warmup share
(`warmup_ratio`) is of the steps actually taken; the learning rate is used as given (no scaling).
Only rank 0 writes the adapter (atomically, as `train_adapter` does). Plain Python: no Prefect here.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
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


class RankFailed(RuntimeError):
    """A rank exited non-zero or was killed; the other ranks have been stopped."""

    def __init__(self, rank: int, returncode: int, tail: Sequence[str], world_size: int):
        self.rank, self.returncode, self.tail = rank, returncode, list(tail)
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
            if returncode == -signal.SIGKILL:
                how += " (out of host memory?)"
        else:
            how = f"exited with status {returncode}"
        last = "\n".join(f"  [rank {rank}] {line}" for line in self.tail) or "  (no output)"
        super().__init__(f"training rank {rank} of {world_size} {how}; all ranks stopped. Its last lines:\n{last}")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, extra: dict | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {}), **NCCL_SAFE_ENV}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1")  # progress bars redraw with \r: rank 0 prints one line a step instead
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each still-running rank's process group, then SIGKILL what is left after `grace_s`."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def launch_ranks(argv: Sequence[str], world_size: int, log: Callable[[str], object] = print,
                 env: dict | None = None, cwd: str | Path | None = None, grace_s: float = 10.0,
                 tail_lines: int = 30) -> None:
    """Run `argv` once per rank (torchrun's environment), stream their output to `log` as `[rank i] line`,
    and return when all exit 0. If one fails, stop the others and raise `RankFailed` (the first to fail)."""
    port = free_port()
    lines: queue.Queue = queue.Queue()
    tails = [deque(maxlen=tail_lines) for _ in range(world_size)]
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []

    def read(rank: int, stream) -> None:
        for line in stream:
            lines.put((rank, line.rstrip("\r\n")))
        stream.close()

    def drain(timeout: float) -> None:
        try:
            rank, line = lines.get(timeout=timeout)
            while True:
                tails[rank].append(line)
                log(f"[rank {rank}] {line}")
                rank, line = lines.get_nowait()
        except queue.Empty:
            pass

    failed: tuple[int, int] | None = None
    try:
        for rank in range(world_size):
            p = subprocess.Popen(list(argv), env=rank_env(rank, world_size, port, env), cwd=cwd,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 text=True, errors="replace", bufsize=1, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=read, args=(rank, p.stdout), daemon=True)
            t.start()
            readers.append(t)
        while True:
            drain(0.2)
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
    finally:
        _stop(procs, grace_s)  # on failure, or if we are interrupted (task cancelled): no orphaned ranks
        for t in readers:
            t.join(timeout=5)
        drain(0.0)
    if failed:
        raise RankFailed(failed[0], failed[1], tails[failed[0]], world_size)


def train_distributed(cfg: FinetuneConfig, resolved: str, init_adapter: str | Path, tokenized_dir: str | Path,
                      adapter_dir: str | Path, checkpoints_dir: str | Path | None = None, num_gpus: int | None = None,
                      log: Callable[[str], object] = print, rank_command: Sequence[str] | None = None) -> Path:
    """`train_adapter` over `num_gpus` GPUs of this host (default: `gpus_for(cfg)`). Returns `adapter_dir`.

    A re-run with the same folders resumes from the last checkpoint (all ranks load it), as on one GPU."""
    from personatune.files import is_complete

    adapter_dir = Path(adapter_dir)
    if is_complete(adapter_dir):
        return adapter_dir
    n = gpus_for(cfg) if num_gpus is None else num_gpus
    checkpoints = Path(checkpoints_dir) if checkpoints_dir else adapter_dir.with_name(adapter_dir.name + ".checkpoints")
    checkpoints.parent.mkdir(parents=True, exist_ok=True)
    spec = checkpoints.with_name(checkpoints.name + ".launch.json")
    spec.write_text(json.dumps({"config": cfg.to_dict(), "resolved": str(resolved), "init_adapter": str(init_adapter),
                                "tokenized_dir": str(tokenized_dir), "adapter_dir": str(adapter_dir),
                                "checkpoints_dir": str(checkpoints)}, indent=2))
    log(f"training data-parallel on {n} GPUs: each GPU runs the profile's micro-batch x accumulation, so an "
        f"optimizer step takes {n}x the examples of a one-GPU step; learning rate {cfg.learning_rate} as given")
    argv = list(rank_command or [sys.executable, "-m", "personatune.train_rank"]) + [str(spec)]
    launch_ranks(argv, n, log=log)
    spec.unlink(missing_ok=True)
    if not is_complete(adapter_dir):
        raise RuntimeError(f"all {n} ranks exited 0 but rank 0 wrote no adapter to {adapter_dir}")
    return adapter_dir
