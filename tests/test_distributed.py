"""Multi-GPU launch (personatune.distributed), CPU only: torchrun starts real rank processes (fake training scripts,
or the gloo backend for collectives); the launcher's failure semantics, GPU pinning and what each rank is given."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from personatune.config import ConfigError, FinetuneConfig, add_config_arguments, config_from_args, from_mapping
from personatune.distributed import (EXIT_OUT_OF_MEMORY, NCCL_SAFE_ENV, RankFailed, RankHung, gpus_for, launch,
                                     pinned_devices, train_distributed, visible_device_ids)
from personatune.plan import TrainPlan
from personatune.train_rank import rank_config

ROOT = Path(__file__).resolve().parents[1]
PLAN = TrainPlan("gpu", 4, 2, True, 0, 2, "varlen", True, None, None, "test plan", logging_steps=10)


def script(tmp_path: Path, code: str, name: str = "rank.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


def by_rank(lines: list[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in lines:
        if line.startswith("[rank "):
            tag, _, text = line.partition("] ")
            out.setdefault(int(tag.removeprefix("[rank ")), []).append(text)
    return out


def test_ranks_get_the_torchrun_environment_exactly_the_pinned_gpus_and_their_lines_are_streamed(tmp_path):
    code = """
        import os, json
        print(json.dumps({k: os.environ.get(k) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT',
              'CUDA_VISIBLE_DEVICES', 'NCCL_NVLS_ENABLE', 'TORCH_SYMM_MEM_DISABLE_MULTICAST', 'NVSHMEM_DISABLE_NVLS')}))
    """
    lines: list[str] = []
    launch([script(tmp_path, code)], 2, log=lines.append, devices=["3", "5"])
    envs = {rank: json.loads(texts[-1]) for rank, texts in by_rank(lines).items()}
    assert sorted(envs) == [0, 1]
    for rank, env in envs.items():
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert env["CUDA_VISIBLE_DEVICES"] == "3,5"  # exactly the GPUs asked for; LOCAL_RANK picks one of them
        assert {k: env[k] for k in NCCL_SAFE_ENV} == NCCL_SAFE_ENV
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]


def test_one_gpu_of_several_is_pinned_and_never_shared_by_one_process():
    assert pinned_devices(1, ["0", "1"]) == ["0"]               # one GPU of two: a pinned torchrun rank, no DataParallel
    assert pinned_devices(1, ["0"]) is None                      # exactly one visible: this process
    assert pinned_devices(0, []) is None                         # no GPU: this process (CPU)
    assert pinned_devices(0, ["0", "1"]) == ["0", "1"]           # 0: all visible
    assert pinned_devices(2, ["4", "6", "7"]) == ["4", "6"]      # exactly N of them, in CUDA_VISIBLE_DEVICES order
    with pytest.raises(ConfigError, match="num_gpus=2 but 1 GPU"):
        pinned_devices(2, ["0"])
    assert visible_device_ids({"CUDA_VISIBLE_DEVICES": "4,6,7"}, count=3) == ["4", "6", "7"]
    assert visible_device_ids({}, count=2) == ["0", "1"] and visible_device_ids({}, count=0) == []


def test_what_the_trainer_sees_on_each_rank_and_in_this_process(tmp_path):
    """Under torchrun (gloo on CPU) each rank's TrainingArguments are one DDP process of N, never DataParallel
    (n_gpu is the GPUs of that process only), and log at the plan's interval like one GPU does (not every step)."""
    from personatune.train import training_arguments

    code = f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from personatune.config import FinetuneConfig
        from personatune.plan import TrainPlan
        from personatune.train import training_arguments
        from personatune.train_rank import setup_rank
        rank, world = setup_rank()
        plan = TrainPlan(**json.loads({json.dumps(json.dumps(PLAN.to_dict()))}))
        args = training_arguments(FinetuneConfig(), {str(tmp_path)!r} + "/out", 100, plan, ddp_timeout=30)
        print("ARGS " + json.dumps({{"rank": rank, "world": world, "world_size": args.world_size,
              "process_index": args.process_index, "n_gpu": args.n_gpu, "parallel_mode": args.parallel_mode.value,
              "logging_steps": args.logging_steps, "find_unused": args.ddp_find_unused_parameters,
              "broadcast_buffers": args.ddp_broadcast_buffers}}))
    """
    lines: list[str] = []
    launch([script(tmp_path, code)], 2, log=lines.append, devices=None)
    seen = {r: json.loads(next(t for t in texts if t.startswith("ARGS "))[5:]) for r, texts in by_rank(lines).items()}
    for rank in (0, 1):
        s = seen[rank]
        assert (s["rank"], s["world"], s["world_size"], s["process_index"]) == (rank, 2, 2, rank)
        assert s["parallel_mode"] == "distributed" and s["n_gpu"] == 0  # CPU here; on a GPU host: 1 per rank
        assert s["logging_steps"] == PLAN.logging_steps == 10      # no per-step log (and loss gather) on the ranks
        assert s["find_unused"] is False and s["broadcast_buffers"] is False
    here = training_arguments(FinetuneConfig(), tmp_path / "one", 100, PLAN)
    assert here.parallel_mode.value == "not_parallel" and here.n_gpu == 0 and here.logging_steps == 10


def test_a_crashing_rank_stops_the_others_and_fails_with_its_status_and_lines(tmp_path):
    # rank 1 dies after a few lines; rank 0 would wait "in a collective" for a minute: it must be stopped at once
    code = """
        import os, sys, time
        if os.environ['RANK'] == '1':
            print('loading base'); print('step 1 loss 8.1', flush=True)
            time.sleep(0.5); print('RuntimeError: CUDA error: an illegal memory access', file=sys.stderr); sys.exit(3)
        print('rank 0 waiting', flush=True); time.sleep(60)
    """
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(RankFailed) as err:
        launch([script(tmp_path, code)], 2, log=lines.append)
    assert time.monotonic() - start < 40
    e = err.value
    assert (e.rank, e.returncode, e.out_of_memory) == (1, 3, False)
    assert "training rank 1 of 2 exited with status 3; all ranks stopped" in str(e)
    assert "[rank 1] RuntimeError: CUDA error: an illegal memory access" in str(e)
    assert "[rank 1] step 1 loss 8.1" in lines and "[rank 0] rank 0 waiting" in lines


def test_a_rank_killed_by_a_signal_is_named(tmp_path):
    code = "import os, signal, time\nif os.environ['RANK'] == '0': os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(60)\n"
    with pytest.raises(RankFailed, match=r"rank 0 of 2 was killed by SIGKILL \(out of host memory\?\)"):
        launch([script(tmp_path, code)], 2, log=lambda _: None)


def test_a_hung_rank_ends_the_group_through_the_collective_timeout(tmp_path):
    """Rank 1 hangs (never reaches the all-reduce); rank 0's collective times out (gloo here, NCCL on GPUs: the
    Trainer's ddp_timeout, COLLECTIVE_TIMEOUT_S on the ranks), rank 0 exits with the error, torchrun stops rank 1."""
    code = """
        import datetime, os, time
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
        print('joined', flush=True)
        if dist.get_rank() == 1:
            time.sleep(120)  # hung: never reaches the collective
        dist.all_reduce(torch.ones(1))
    """
    start = time.monotonic()
    with pytest.raises(RankFailed) as err:
        launch([script(tmp_path, code)], 2, log=lambda _: None)
    assert time.monotonic() - start < 60
    assert err.value.rank == 0 and err.value.returncode == 1
    assert "timed out" in str(err.value).lower() or "timeout" in str(err.value).lower()


def test_a_silent_group_is_stopped_as_hung(tmp_path):
    code = "import os, time\nprint('loaded', flush=True)\ntime.sleep(120)\n"
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(RankHung, match=r"no output from any of the 2 training ranks for 4 s") as err:
        launch([script(tmp_path, code)], 2, log=lines.append, silence_timeout_s=4, grace_s=2)
    assert time.monotonic() - start < 40 and "[rank 1] loaded" in str(err.value)


FAKE_RANK = """
    import json, os, sys, time, pathlib
    sys.path.insert(0, {root!r})
    spec = json.loads(pathlib.Path(sys.argv[-1]).read_text())
    rank, plan = int(os.environ['RANK']), spec['plan']
    ckpt, adapter = pathlib.Path(spec['checkpoints_dir']), pathlib.Path(spec['adapter_dir'])
    print('plan', plan['micro_batch_size'], 'x', plan['grad_accum'], 'resume', sorted(p.name for p in ckpt.glob('checkpoint-*')), flush=True)
    if plan['micro_batch_size'] > 2:      # this card fits 2 examples per pass: the rank runs out of memory
        sys.exit({oom})
    if rank == 1:                         # waits "in collectives" until rank 0 has written the adapter
        for _ in range(600):
            if (adapter / '.complete').exists():
                sys.exit(0)
            time.sleep(0.1)
        sys.exit(9)
    if not (ckpt / 'checkpoint-2').exists():  # first attempt that fits: a checkpoint, then rank 0 dies
        (ckpt / 'checkpoint-2').mkdir(parents=True)
        sys.exit(1)
    from personatune.files import atomic_dir
    with atomic_dir(adapter) as tmp:
        (tmp / 'history.json').write_text(json.dumps({{'resumed_from': 'checkpoint-2', 'plan': plan}}))
"""


def test_out_of_memory_backs_off_and_a_retry_resumes_from_the_failed_groups_checkpoints(tmp_path):
    """The multi-GPU path end to end with fake ranks: a rank out of memory -> the group relaunched with the next
    layout (same examples per step); a rank dying after a checkpoint -> RankFailed, the checkpoints kept; the
    retry (the task's) resumes from them and only rank 0 writes the adapter."""
    from personatune.train import train_with_oom_backoff

    rank_py = script(tmp_path, FAKE_RANK.format(root=str(ROOT), oom=EXIT_OUT_OF_MEMORY))
    cfg = FinetuneConfig(num_gpus=2)
    adapter = tmp_path / "adapter"
    lines: list[str] = []
    messages: list[str] = []

    def attempt(plan):
        return train_distributed(cfg, plan, "base", tmp_path / "init", tmp_path / "tok", adapter, devices=["0", "1"],
                                 log=lines.append, rank_command=[rank_py])

    with pytest.raises(RankFailed, match="rank 0 of 2 exited with status 1") as err:
        train_with_oom_backoff(PLAN, attempt, log=messages.append, free_memory=lambda: None)
    assert not err.value.out_of_memory
    assert messages == ["CUDA out of memory with 4 x 2, checkpointing 0/2; retrying with 4 x 2, checkpointing 2/2 "
                        "(effective batch 8 kept)",
                        "CUDA out of memory with 4 x 2, checkpointing 2/2; retrying with 2 x 4, checkpointing 2/2 "
                        "(effective batch 8 kept)"]
    assert (tmp_path / "adapter.checkpoints" / "checkpoint-2").is_dir() and not adapter.exists()

    lines.clear()
    train_with_oom_backoff(PLAN, attempt, log=messages.append, free_memory=lambda: None)  # the task's retry
    history = json.loads((adapter / "history.json").read_text())
    assert history["resumed_from"] == "checkpoint-2" and history["plan"]["micro_batch_size"] == 2
    assert "[rank 0] plan 2 x 4 resume ['checkpoint-2']" in lines and "[rank 1] plan 2 x 4 resume ['checkpoint-2']" in lines
    assert "2x the examples" in lines[0]
    # ranks that exit 0 without an adapter: a clear error, not a silent empty result
    with pytest.raises(RuntimeError, match="rank 0 wrote no adapter"):
        train_distributed(cfg, PLAN, "base", tmp_path / "init", tmp_path / "tok", tmp_path / "other",
                          devices=["0", "1"], log=lambda _: None, rank_command=[script(tmp_path, "pass\n", "noop.py")])


def test_num_gpus_flag_config_and_resolution():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert config_from_args(parser.parse_args(["--num-gpus", "2"])).num_gpus == 2
    assert FinetuneConfig().num_gpus == 0
    assert from_mapping({"num_gpus": "4"}).num_gpus == 4  # UI / event parameters arrive as strings
    with pytest.raises(ConfigError, match="num_gpus must be >= 0"):
        FinetuneConfig(num_gpus=-1)
    assert gpus_for(FinetuneConfig(), visible=0) == 0      # CPU: the in-process path
    assert gpus_for(FinetuneConfig(), visible=1) == 1      # one GPU: in-process, unchanged
    assert gpus_for(FinetuneConfig(), visible=2) == 2      # all visible by default
    assert gpus_for(FinetuneConfig(num_gpus=1), visible=2) == 1
    with pytest.raises(ConfigError, match="num_gpus=2 but 1 GPU"):
        gpus_for(FinetuneConfig(num_gpus=2), visible=1)


def test_num_gpus_is_part_of_the_train_cache_key():
    from tasks.caching import STAGE_FIELDS

    assert "num_gpus" in STAGE_FIELDS["train"] and "num_gpus" not in STAGE_FIELDS["tokenize"]


def test_rank_config_keeps_the_warmup_share_of_the_steps_taken():
    cfg = FinetuneConfig(warmup_ratio=0.1)
    assert rank_config(cfg, 1) == cfg
    assert rank_config(cfg, 2).warmup_ratio == pytest.approx(0.05)
    assert rank_config(cfg.replace(max_steps=20), 2).warmup_ratio == 0.1  # max_steps: same steps on any count


def test_balanced_sampler_keeps_each_steps_examples_and_evens_the_ranks_tokens():
    """A DDP variant measured and not adopted (bench/ddp_variants.py), still correct for the benchmark sweep."""
    import torch
    from torch.utils.data import RandomSampler

    sys.path.insert(0, str(ROOT / "bench"))
    from ddp_variants import BalancedSampler, arguments, trainer_class

    assert arguments({}) == {} and trainer_class({}) is None  # all off: the recipe as the flow runs it
    lengths = [(i * 37) % 90 + 5 for i in range(100)]
    inner = RandomSampler(range(100), generator=torch.Generator().manual_seed(0))
    sampler = BalancedSampler(inner, lengths, micro=4, accum=2, world=2)  # a step: 2 ranks x 2 micro-batches x 4
    assert sampler.generator is inner.generator and len(sampler) == 100
    inner.generator.manual_seed(0)
    plain = list(inner)
    inner.generator.manual_seed(0)
    balanced = list(sampler)
    assert sorted(balanced) == list(range(100))
    for s in range(0, 96, 16):
        assert set(balanced[s:s + 16]) == set(plain[s:s + 16])  # the same examples in each optimizer step
        tokens = [sum(lengths[i] for i in balanced[s + 4 * b:s + 4 * b + 4]) for b in range(4)]
        before = [sum(lengths[i] for i in plain[s + 4 * b:s + 4 * b + 4]) for b in range(4)]
        assert max(tokens) - min(tokens) <= max(before) - min(before)
    assert balanced[96:] == plain[96:]  # the short last step as it was
