"""Times PEER-pytorch forward+backward for `cargo xtask bench pytorch`; prints one JSON line.

Arguments: d_model num_experts heads top_k dim_key(per half) tokens repeats
"""
import json
import os
import sys
import time

import torch
from PEER_pytorch import PEER

d_model, num_experts, heads, top_k, dim_key, tokens, repeats = map(int, sys.argv[1:8])
torch.set_num_threads(os.cpu_count() or 1)
layer = PEER(dim=d_model, heads=heads, num_experts=num_experts, num_experts_per_head=top_k,
             dim_key=dim_key, non_competing_scores=False)
x = torch.randn(1, tokens, d_model)


def step():
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()


step()  # warm-up
samples = []
for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    step()
    samples.append(time.perf_counter() - start)
samples.sort()
print(json.dumps({"median_s": samples[len(samples) // 2], "min_s": samples[0], "max_s": samples[-1],
                  "runs": len(samples), "torch": torch.__version__, "threads": torch.get_num_threads()}))
