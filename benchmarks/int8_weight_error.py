"""Relative weight error ||W - deq(q(W))||_F / ||W||_F of pl-actsparse int8 vs torchao Int8WeightOnlyConfig."""
import json, torch
from torch import nn
from torchao.quantization import quantize_, Int8WeightOnlyConfig
from pl_actsparse.demos.llama2c import load_llama2c_checkpoint
from pl_actsparse.kernels.int8_cpu import quantize_weight_t, dequantize_weight_t
model = load_llama2c_checkpoint("/work/shared/data/stories260K.bin")
res = {"asym_output": [], "sym_output": [], "asym_input": [], "torchao": []}
for name, m in model.named_modules():
    if type(m) is not nn.Linear: continue
    w = m.weight.detach().float()
    for mode, gran in (("asym","output"),("sym","output"),("asym","input")):
        q,s,z = quantize_weight_t(w, mode, gran)
        res[f"{mode}_{gran}"].append(float((dequantize_weight_t(q,s,z).t()-w).norm()/w.norm()))
    l = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False)); l[0].weight.data.copy_(w)
    quantize_(l, Int8WeightOnlyConfig())
    res["torchao"].append(float((l[0].weight.dequantize().float()-w).norm()/w.norm()))
print(json.dumps({k: {"mean": sum(v)/len(v), "max": max(v), "layers": len(v)} for k, v in res.items()}, indent=1))
