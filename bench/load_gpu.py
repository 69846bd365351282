#!/usr/bin/env python3
"""Where the evaluation base's load goes on a GPU (issue 18 item 5: "evaluation stage <= 10 s"), and what a faster
load of the same weights costs.

    # on the GPU machine, after the install of bench/flow_gpu.py's docstring:
    python3 bench/load_gpu.py [--dir /tmp/personatune-flow-gpu] [--repeats 2]

On the Llama-2-7B-shaped random-weight model of bench/bench.py (bf16 safetensors, 12.6 GiB, in the page cache),
times (CUDA synchronized), each `--repeats` times:
- `4bit+dequant`: `load_base_model` from the base's own files (4-bit NF4, double quantization), then `fast_inference`
  (the frozen 4-bit weights dequantized once): the evaluation's load before the kept copy;
- `4bit+dequant, writing the copy`: the same with `keep_quantized_base` and an empty cache: the first load, which
  also saves the 4-bit copy;
- `copy+dequant`: the same once the copy exists: every later load;
- `bf16+roundtrip`: the bf16 weights loaded straight onto the card and each weight the 4-bit load would quantize
  sent through NF4 and back there (`personatune.model.load_inference_base`), after reading the checkpoint's size
  from its headers (`checkpoint_elements`).
Checks (first repeat) that every way gives the weights of the first, tensor for tensor and bit for bit; records
each one's peak memory and the copy's size. Prints the numbers and writes the raw JSON to bench/results/ and $OUT.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def release() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    import bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    args, model_dir, built = bench.gpu_bench_setup(ap)
    work = model_dir.parent

    import torch

    from personatune.config import FinetuneConfig
    from personatune.evaluate import fast_inference
    from personatune.model import checkpoint_elements, load_base_model, load_inference_base

    record = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": dt.date.today().isoformat(),
              "model": "Llama-2-7B-shaped, random weights (bench/bench.py build_shaped_model)", "built": built,
              "safetensors_gib": round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30, 2),
              "runs": []}
    name = f"load_gpu_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    torch.ones(1, device="cuda")  # the CUDA context, outside every timing

    os.environ["PERSONATUNE_CACHE"] = str(work / "load-cache")  # where load_base_model keeps its 4-bit copy
    keep, no_copy = FinetuneConfig(base_model=str(model_dir)), FinetuneConfig(base_model=str(model_dir),
                                                                             keep_quantized_base=False)

    def four_bit(config, fresh: bool = False):
        def load():
            if fresh:
                shutil.rmtree(work / "load-cache", ignore_errors=True)
            model, t_load = bench.cuda_timed(lambda: load_base_model(str(model_dir), config))
            dequantized, t_deq = bench.cuda_timed(lambda: fast_inference(model))
            return model, {"load_s": t_load, "dequantize_s": t_deq, "dequantized": dequantized}
        return load

    def direct():
        elements, t_size = bench.cuda_timed(lambda: checkpoint_elements(str(model_dir)))
        model, t = bench.cuda_timed(lambda: load_inference_base(str(model_dir), no_copy))
        return model, {"checkpoint_elements_s": t_size, "load_s": t, "elements": elements}

    variants = (("4bit+dequant", four_bit(no_copy)), ("4bit+dequant, writing the copy", four_bit(keep, fresh=True)),
                ("copy+dequant", four_bit(keep)), ("bf16+roundtrip", direct))
    for repeat in range(args.repeats):
        row = {"repeat": repeat + 1}
        for label, fn in variants:
            model, times = fn()
            times["total_s"] = round(sum(v for k, v in times.items() if k.endswith("_s")), 3)
            times["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row[label] = times
            if label.startswith("4bit+dequant, writing"):
                times["copy_gib"] = round(sum(f.stat().st_size for f in (work / "load-cache").rglob("*.safetensors"))
                                          / 2**30, 2)
            if repeat == 0:  # bitwise equality of every tensor the loads hold
                state = {k: v.detach() for k, v in model.state_dict().items()}
                if label == "4bit+dequant":
                    reference = {k: v.cpu() for k, v in state.items()}
                else:
                    row.setdefault("same_as_4bit+dequant", {})[label] = sorted(reference) == sorted(state) and all(
                        torch.equal(reference[k], state[k].cpu()) for k in reference)
                del state
            del model
            release()
        reference = None
        record["runs"].append(row)
        print(row, flush=True)
        bench.save_result(record, name, args.results, args.out)
    for path in bench.save_result(record, name, args.results, args.out):
        print(f"raw results: {path}")


if __name__ == "__main__":
    main()
