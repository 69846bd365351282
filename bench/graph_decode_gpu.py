"""Greedy decoding on a GPU: personatune's static-cache + CUDA-graph loop (`static_greedy_decode`) against
generate(), on the Llama-2-7B-shaped random-weight model of bench/bench.py with a random LoRA adapter (B nonzero),
the flow's default decoding and its 136 evaluation prompts in one batch; twice or three times each, CUDA
synchronized; and whether the replies are the same text.

    # on the GPU machine, after the install of bench/flow_gpu.py's docstring:
    python3 bench/graph_decode_gpu.py          # SKIP_GENERATE=1: the graph loop alone

Writes graph_decode_gpu.json to $OUT (or /tmp).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))


def main():
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import StopStringCriteria
    import bench
    from personatune.config import FinetuneConfig
    from personatune.decoding import Decoding, static_greedy_decode
    from personatune.evaluate import eval_sets, fast_inference, generate_replies
    from personatune.model import load_base_model, lora_config
    from personatune.tokenization import encode_prompt, load_tokenizer, stop_token_ids

    work = Path("/tmp/personatune-flow-gpu"); work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "llama2-7b-shaped"
    bench.build_shaped_model(model_dir)
    cfg = FinetuneConfig(base_model=str(model_dir))
    tok = load_tokenizer(str(model_dir), cfg.base_revision)
    model = load_base_model(str(model_dir), cfg)
    print("dequantized", fast_inference(model), flush=True)
    torch.manual_seed(0)
    peft = get_peft_model(model, lora_config(cfg, model))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    peft.eval()
    sets = eval_sets(cfg)
    prompts = [(r["instruction"], r["user"]) for v in sets.values() for r in v]
    dec = Decoding.from_config(cfg)
    rec = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "model": "Llama-2-7B-shaped, random weights, 4-bit "
           "base dequantized (fast_inference), random LoRA q,v adapter", "prompts": len(prompts)}
    tok.padding_side = "left"
    b = tok.pad({"input_ids": [encode_prompt(tok, i, u) for i, u in prompts]}, return_tensors="pt").to("cuda")
    crit = StopStringCriteria(tok, ["###"])
    for label, d in (("contrast", dec), ("base", dec.without_contrast())):
        ctx = peft.disable_adapter() if label == "base" else torch.no_grad()
        with ctx:
            for attempt in range(0 if os.environ.get("SKIP_GENERATE") else 2):
                ref, t = bench.cuda_timed(lambda: generate_replies(peft, tok, prompts, d))
                rec[f"generate_{label}_{attempt}"] = t
                print(label, "generate()", attempt, t, flush=True)
            nog, t = bench.cuda_timed(lambda: static_greedy_decode(peft, b["input_ids"], b["attention_mask"], d,
                                                 stop_token_ids(tok), tok.pad_token_id, crit, graphs=False))
            rec[f"static_eager_{label}"] = t
            print(label, "static eager", t, flush=True)
            for attempt in range(3):
                try:
                    out, t = bench.cuda_timed(lambda: static_greedy_decode(peft, b["input_ids"], b["attention_mask"], d,
                                                         stop_token_ids(tok), tok.pad_token_id, crit, graphs=True))
                except Exception as e:
                    import traceback; traceback.print_exc(); rec[f"graph_{label}_error"] = repr(e); break
                rec[f"graph_{label}_{attempt}"] = t
                texts = [tok.decode(row[(row != tok.pad_token_id)].tolist(), skip_special_tokens=True) for row in out.cpu()]
                same = sum(x["raw"] == y for x, y in zip(ref, texts)) if not os.environ.get("SKIP_GENERATE") else -1
                rec[f"graph_{label}_same_raw_{attempt}"] = same
                print(label, "graphs", attempt, t, "same raw", same, "/", len(prompts), flush=True)
    out = Path(os.environ.get("OUT", "/tmp")) / "graph_decode_gpu.json"
    out.write_text(json.dumps(rec, indent=1)); print(json.dumps(rec))


if __name__ == "__main__":
    main()
