#!/usr/bin/env python3
"""The GPU plans' chunked loss, with and without picking the labelled positions first, on one CUDA card in bf16
autocast (random hidden states, a 49,152 x 4,096 head, 55% of positions unlabelled): loss and gradient norm of each.

    PYTHONPATH=$PWD python3 bench/chunked_loss_check.py      # on the GPU machine
"""
import torch
from personatune.speedups import chunked_causal_lm_loss, _chunk_ce
torch.manual_seed(0)
dev = "cuda"
hidden = torch.randn(1, 1100, 4096, device=dev, requires_grad=True)
weight = (torch.randn(49152, 4096, device=dev) * 0.02).to(torch.bfloat16)
labels = torch.randint(0, 49152, (1, 1100), device=dev)
labels[0, torch.rand(1100, device=dev) < 0.55] = -100
n = (labels[0, 1:] != -100).sum()
def sel(h):  # the selection path as it was in 75c83b5 for chunk > 0
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    keep = shift != -100
    flat, shift = h.reshape(-1, h.shape[-1])[keep], shift[keep]
    from torch.utils.checkpoint import checkpoint
    total = flat.new_zeros((), dtype=torch.float32)
    for s in range(0, flat.shape[0], 1024):
        total = total + checkpoint(_chunk_ce, flat[s:s + 1024], weight, shift[s:s + 1024], use_reentrant=False)
    return total / n
for name, f in [("all positions", lambda h: chunked_causal_lm_loss(h, labels, weight, n, chunk=1024)),
                ("selected, chunked", sel),
                ("selected, chunk 0", lambda h: chunked_causal_lm_loss(h, labels, weight, n, chunk=0))]:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = f(hidden)
    g, = torch.autograd.grad(loss, hidden)
    print(name, float(loss), float(g.norm()))
