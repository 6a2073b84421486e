"""Dense stories260K perplexity under the window conventions of docs/models.md; prints one JSON object.

First 150 stories: 256/512-token windows, disjoint and contiguous (fp32), the 256-token disjoint figure in bf16
and fp16 (relative change), and tinyshakespeare's first 2,048 predicted tokens (4 contiguous 512-token windows).

    python benchmarks/perplexity.py [--out benchmarks/results/perplexity.json]
"""

import argparse
import math

import torch

from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint
from pl_actsparse.demos.tinystories import TokenWindows, load_stories, load_text
from pl_actsparse.tuning.objectives import mean_nll

from _common import add_out_argument, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(parser, "perplexity")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok, stories = load_llama2c_checkpoint(), Llama2cTokenizer.from_file(), load_stories(stop=150)
    rows, exact = [], {}
    for seq_len in (256, 512):
        for mode in ("disjoint", "contiguous"):
            windows = TokenWindows(stories, tok, seq_len, mode=mode)
            nll, count = mean_nll(model, windows)
            exact[seq_len, mode] = nll
            rows.append({"seq_len": seq_len, "mode": mode, "windows": len(windows), "predicted_tokens": count,
                         "mean_nll": round(nll, 4), "perplexity": round(math.exp(nll), 4)})
    w256 = TokenWindows(stories, tok, 256)
    dtype_change = {}
    for dtype in (torch.bfloat16, torch.float16):
        nll, _ = mean_nll(load_llama2c_checkpoint().to(dtype), w256)
        dtype_change[str(dtype).removeprefix("torch.")] = round(100 * (math.exp(nll - exact[256, "disjoint"]) - 1), 4)
    shakespeare = TokenWindows([load_text("tinyshakespeare")], tok, 512, mode="contiguous", max_windows=4)
    nll, count = mean_nll(model, shakespeare)
    emit({"benchmark": "perplexity", "model": "stories260K", "torch": torch.__version__, "dtype": "float32",
          "stories": [0, 150], "rows": rows, "disjoint_256_change_pct": dtype_change,
          "tinyshakespeare": {"windows": len(shakespeare), "predicted_tokens": count, "perplexity": round(math.exp(nll), 2)}},
         args.out)


if __name__ == "__main__":
    main()
