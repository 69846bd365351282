"""Multi-GPU launcher (personatune.distributed), CPU only: fake rank scripts stand in for the training ranks."""
from __future__ import annotations

import argparse
import json
import sys
import time

import pytest

from personatune.config import ConfigError, FinetuneConfig, add_config_arguments, config_from_args, from_mapping
from personatune.distributed import NCCL_SAFE_ENV, RankFailed, gpus_for, launch_ranks, train_distributed
from personatune.train_rank import rank_config


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_ranks_get_the_torchrun_environment_and_their_lines_are_streamed():
    code = ("import os, json; print(json.dumps({k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', "
            "'MASTER_ADDR', 'MASTER_PORT', 'NCCL_NVLS_ENABLE', 'TORCH_SYMM_MEM_DISABLE_MULTICAST', 'NVSHMEM_DISABLE_NVLS')}))")
    lines: list[str] = []
    launch_ranks(py(code), 2, log=lines.append)
    envs = {}
    for line in lines:
        rank, _, text = line.partition("] ")
        envs[int(rank.removeprefix("[rank "))] = json.loads(text)
    assert sorted(envs) == [0, 1]
    for rank, env in envs.items():
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert {k: env[k] for k in NCCL_SAFE_ENV} == NCCL_SAFE_ENV
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]


def test_a_crashing_rank_stops_the_others_and_fails_with_its_lines():
    # rank 1 dies after a few lines; rank 0 would wait "in a collective" for a minute: it must be stopped at once
    code = ("import os, sys, time\nrank = int(os.environ['RANK'])\n"
            "if rank == 1:\n    print('loading base'); print('step 1 loss 8.1', flush=True)\n"
            "    time.sleep(0.5); print('RuntimeError: CUDA error: an illegal memory access', file=sys.stderr); sys.exit(3)\n"
            "print('rank 0 waiting', flush=True); time.sleep(60)\n")
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(RankFailed) as err:
        launch_ranks(py(code), 2, log=lines.append, grace_s=5)
    assert time.monotonic() - start < 20
    e = err.value
    assert (e.rank, e.returncode) == (1, 3)
    assert "training rank 1 of 2 exited with status 3; all ranks stopped" in str(e)
    assert "[rank 1] RuntimeError: CUDA error: an illegal memory access" in str(e)
    assert "[rank 1] step 1 loss 8.1" in lines and "[rank 0] rank 0 waiting" in lines


def test_a_rank_killed_by_a_signal_is_named():
    code = "import os, signal, time\nif os.environ['RANK'] == '0': os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(60)\n"
    with pytest.raises(RankFailed, match=r"rank 0 of 2 was killed by SIGKILL \(out of host memory\?\)"):
        launch_ranks(py(code), 2, log=lambda _: None, grace_s=5)


def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace_period():
    code = ("import os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "if os.environ['RANK'] == '1': sys.exit(1)\ntime.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 of 2 exited with status 1"):
        launch_ranks(py(code), 2, log=lambda _: None, grace_s=1)
    assert time.monotonic() - start < 15


def test_train_distributed_runs_the_rank_command_with_a_spec_and_needs_an_adapter(tmp_path):
    # a fake rank: rank 0 writes the adapter folder atomically-complete, as train_adapter does
    code = ("import json, os, sys, pathlib\nspec = json.loads(pathlib.Path(sys.argv[-1]).read_text())\n"
            "assert spec['config']['num_gpus'] == 2 and spec['checkpoints_dir'].endswith('.checkpoints')\n"
            "if os.environ['RANK'] == '0':\n"
            "    from personatune.files import atomic_dir\n"
            "    with atomic_dir(spec['adapter_dir']) as tmp: (tmp / 'history.json').write_text('{}')\n"
            "print('ok', os.environ['RANK'])\n")
    cfg = FinetuneConfig(num_gpus=2)
    lines: list[str] = []
    out = train_distributed(cfg, "base", tmp_path / "init", tmp_path / "tok", tmp_path / "adapter", num_gpus=2,
                            log=lines.append, rank_command=[sys.executable, "-c", code])
    assert (out / "history.json").is_file()
    assert "[rank 0] ok 0" in lines and "[rank 1] ok 1" in lines and "2x the examples" in lines[0]
    # ranks that exit 0 without an adapter: a clear error, not a silent empty result
    with pytest.raises(RuntimeError, match="rank 0 wrote no adapter"):
        train_distributed(cfg, "base", tmp_path / "init", tmp_path / "tok", tmp_path / "other", num_gpus=2,
                          log=lambda _: None, rank_command=py("pass"))


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
    import torch
    from torch.utils.data import RandomSampler

    from personatune.train_rank import DDP_SETTINGS, BalancedSampler

    assert DDP_SETTINGS == {"logging_steps": 1, "static_graph": False, "gradient_as_bucket_view": False,
                            "balance_tokens": False}  # measured: no setting beat the run-to-run spread
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
