"""Relative weight error ||W - deq(q(W))||_F / ||W||_F of pl-actsparse int8 vs torchao Int8WeightOnlyConfig,
over the 36 Linear layers of stories260K (lm_head included); prints one JSON object (and writes it with --out).

    python benchmarks/int8_weight_error.py [--out benchmarks/results/int8_weight_error.json]
"""

import argparse

import torch
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from pl_actsparse.demos.llama2c import load_llama2c_checkpoint
from pl_actsparse.kernels.int8_cpu import dequantize_weight_t, quantize_weight_t

from _common import add_out_argument, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(parser, "int8_weight_error")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_llama2c_checkpoint()
    res: dict[str, list[float]] = {"asym_output": [], "sym_output": [], "asym_input": [], "torchao": []}
    for m in model.modules():
        if type(m) is not nn.Linear:
            continue
        w = m.weight.detach().float()
        for mode, gran in (("asym", "output"), ("sym", "output"), ("asym", "input")):
            q, s, z = quantize_weight_t(w, mode, gran)
            res[f"{mode}_{gran}"].append(float((dequantize_weight_t(q, s, z).t() - w).norm() / w.norm()))
        lin = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
        lin[0].weight.data.copy_(w)
        quantize_(lin, Int8WeightOnlyConfig())
        res["torchao"].append(float((lin[0].weight.dequantize().float() - w).norm() / w.norm()))
    emit({"benchmark": "int8_weight_error", "model": "stories260K", "torch": torch.__version__,
          **{k: {"mean": round(sum(v) / len(v), 6), "max": round(max(v), 6), "layers": len(v)} for k, v in res.items()}},
         args.out)


if __name__ == "__main__":
    main()
