"""The llama.cpp anchor: dense BF16 and Q8_0 decode (and prefill) tokens/s at TinyLlama-1.1B shapes on this CPU.

What a CPU user runs today, on the same machine and thread counts as ``benchmarks/decode.py --end-to-end``.
Writes a GGUF with TinyLlama-1.1B's shapes (22 blocks by default, dim 2048, hidden 5632, 32/4 heads, vocab
32000) and random weights with the ``gguf`` package, runs llama.cpp's ``llama-bench`` on it (``-p`` prompt
tokens, ``-n`` generated tokens, ``-r`` repetitions, ``-t`` threads) and prints ONE JSON object: tokens/s per
type and thread count, the weight bytes each decoded token reads (every matrix except the embedding, of which
one row is read) and the fraction of this machine's read bandwidth that is, measured in the same run
(``read_probe`` of the C++ kernel, as ``decode.py`` does) before and after llama.cpp.

Optional dependencies, never a test dependency: ``gguf`` (PyPI, or ``gguf-py`` of llama.cpp's sources on
``PYTHONPATH``) and a ``llama-bench`` binary (``--llama-bench`` or ``$LLAMA_BENCH``), e.g. built from PyPI's
``llama-cpp-python`` sdist: ``pip download --no-deps --no-binary :all: llama-cpp-python``, unpack, then
``cmake -B build vendor/llama.cpp -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-bench``.

    python benchmarks/llamacpp_anchor.py --llama-bench /path/to/llama-bench --threads 1,2 --out anchor.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import add_out_argument, emit

SHAPES = {"dim": 2048, "hidden": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000, "ctx": 2048}


def _tensors(layers: int) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """(GGUF name, PyTorch shape [out, in]) of every tensor, in file order."""
    d, h, v = SHAPES["dim"], SHAPES["hidden"], SHAPES["vocab"]
    kv = d // SHAPES["heads"] * SHAPES["kv_heads"]
    out = [("token_embd.weight", (v, d))]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (d,)), (b + "attn_q.weight", (d, d)), (b + "attn_k.weight", (kv, d)),
                (b + "attn_v.weight", (kv, d)), (b + "attn_output.weight", (d, d)), (b + "ffn_norm.weight", (d,)),
                (b + "ffn_gate.weight", (h, d)), (b + "ffn_up.weight", (h, d)), (b + "ffn_down.weight", (d, h))]
    return out + [("output_norm.weight", (d,)), ("output.weight", (v, d))]


def _data(shape: tuple, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random weights: fp32 (norms), bf16 bits (uint16) or Q8_0 blocks (uint8 [..., in / 32 * 34])."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    if kind == "bf16":
        return ((rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    rows, cols = shape  # Q8_0: per 32 values one fp16 scale and 32 int8
    blocks = np.empty((rows, cols // 32, 34), dtype=np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(0.02 / 127).tobytes(), dtype=np.uint8)
    blocks[..., 2:] = rng.integers(-127, 128, (rows, cols // 32, 32), dtype=np.int8).view(np.uint8)
    return blocks.reshape(rows, cols // 32 * 34)


def write_gguf(path: Path, layers: int, kind: str, seed: int = 0) -> int:
    """Write the model as ``kind`` ("bf16" or "q8_0"; norms fp32) to ``path``; returns the tensor bytes."""
    import gguf

    raw = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tinyllama-shapes-random-{kind}")
    w.add_context_length(SHAPES["ctx"])
    w.add_embedding_length(SHAPES["dim"])
    w.add_block_count(layers)
    w.add_feed_forward_length(SHAPES["hidden"])
    w.add_head_count(SHAPES["heads"])
    w.add_head_count_kv(SHAPES["kv_heads"])
    w.add_rope_dimension_count(SHAPES["dim"] // SHAPES["heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type({"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    # a SentencePiece-style vocabulary of the right size (llama-bench feeds random token ids)
    n = SHAPES["vocab"]
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581t{i}" for i in range(n - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * n)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(seed)
    specs = _tensors(layers)
    total = 0
    for name, shape in specs:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        elif kind == "bf16":
            w.add_tensor_info(name, shape, np.dtype(np.uint16), shape[0] * shape[1] * 2, raw_dtype=raw)
        else:
            nbytes = shape[0] * shape[1] // 32 * 34
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * 34), np.dtype(np.uint8), nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in specs:
        arr = _data(shape, kind, rng)
        total += arr.nbytes
        w.write_tensor_data(arr)
    w.close()
    return total


def bytes_per_token(layers: int, kind: str) -> int:
    """Weight bytes one decoded token reads: every matrix but the embedding (one row of it), plus the norms."""
    per = {"bf16": 2.0, "q8_0": 34 / 32}[kind]
    total = 0
    for name, shape in _tensors(layers):
        if len(shape) == 1:
            total += shape[0] * 4
        elif name == "token_embd.weight":
            total += int(shape[1] * per)
        else:
            total += int(shape[0] * shape[1] * per)
    return total


def read_bandwidth(threads: int) -> dict | None:
    """This machine's read bandwidth now (``benchmarks/decode.py``'s probe), or None without torch/the kernel."""
    try:
        import torch

        sys.path.insert(0, str(Path(__file__).parent))
        import decode

        torch.set_num_threads(threads)
        return decode.read_bandwidth()
    except Exception as exc:  # optional: the anchor stands without it
        print(f"[anchor] no bandwidth probe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def llama_bench(binary: str, model: Path, threads: int, gen: int, prompt: int, reps: int) -> dict:
    cmd = [binary, "-m", str(model), "-t", str(threads), "-n", str(gen), "-p", str(prompt), "-r", str(reps), "-o", "json"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr[-2000:]}")
    rows = json.loads(run.stdout)
    out = {}
    for r in rows:
        key = "decode" if r.get("n_gen", 0) > 0 else "prefill"
        out[key] = {"tokens_per_s": round(r["avg_ts"], 3), "stdev": round(r.get("stddev_ts", 0.0), 3),
                    "tokens": r.get("n_gen") or r.get("n_prompt"), "samples_ts": r.get("samples_ts")}
    out["build"] = {k: rows[0].get(k) for k in ("build_commit", "cpu_info", "backends", "type_k")} if rows else {}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"), help="path of llama-bench ($LLAMA_BENCH)")
    p.add_argument("--layers", type=int, default=22, help="decoder blocks (TinyLlama: 22)")
    p.add_argument("--types", default="bf16,q8_0")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--gen-tokens", type=int, default=32, help="llama-bench -n")
    p.add_argument("--prompt-tokens", type=int, default=128, help="llama-bench -p (0: no prefill figure)")
    p.add_argument("--reps", type=int, default=3, help="llama-bench -r")
    p.add_argument("--gguf-dir", default="/tmp/pl_actsparse_anchor", help="where the GGUF files are written (kept)")
    p.add_argument("--interleave-ours", type=int, default=0, metavar="ROUNDS",
                   help="also alternate, ROUNDS times, one llama-bench decode run per type with this repository's dense, 50%%-sparse and "
                        "int8 + 50%%-sparse decode (benchmarks/decode.py's models) and report per-round ratios")
    p.add_argument("--interleave-threads", type=int, default=1, help="threads of both sides in --interleave-ours")
    add_out_argument(p, "llamacpp_anchor")
    args = p.parse_args(argv)
    if not args.llama_bench or not Path(args.llama_bench).is_file():
        p.error(f"--llama-bench must name the llama-bench binary, got {args.llama_bench!r}")
    Path(args.gguf_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"command": "python benchmarks/llamacpp_anchor.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "shapes": dict(SHAPES, layers=args.layers), "runs": {}}
    for kind in args.types.split(","):
        path = Path(args.gguf_dir) / f"tinyllama_shapes_{args.layers}l_{kind}.gguf"
        if not path.is_file():
            nbytes = write_gguf(path.with_suffix(".tmp"), args.layers, kind)
            path.with_suffix(".tmp").rename(path)
            print(f"[anchor] wrote {path} ({nbytes / 1e9:.2f} GB of tensors)", file=sys.stderr, flush=True)
        bpt = bytes_per_token(args.layers, kind)
        for threads in map(int, args.threads.split(",")):
            before = read_bandwidth(threads)
            try:
                run = llama_bench(args.llama_bench, path, threads, args.gen_tokens, args.prompt_tokens, args.reps)
            except RuntimeError as exc:  # e.g. this build's Q8_0 prompt path crashed (SIGSEGV) on an AMX Xeon: decode alone
                if not args.prompt_tokens:
                    raise
                run = llama_bench(args.llama_bench, path, threads, args.gen_tokens, 0, args.reps)
                run["prefill_error"] = str(exc).splitlines()[0][-300:]
            after = read_bandwidth(threads)
            run["weight_bytes_per_token"] = bpt
            bws = [b["gb_per_s"] for b in (before, after) if b]
            if bws and "decode" in run:
                bw = max(bws) * 1e9  # the better of the two probes: the fraction is then a lower bound
                run["read_bandwidth_gb_per_s"] = {"before": bws[0], "after": bws[-1]}
                run["fraction_of_bandwidth"] = round(bpt * run["decode"]["tokens_per_s"] / bw, 3)
            result["runs"][f"{kind}_t{threads}"] = run
            print(f"[anchor] {kind} t{threads}: {json.dumps(run)}", file=sys.stderr, flush=True)
    if args.interleave_ours:
        result["interleaved"] = interleave_ours(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit(result, args.out)


def interleave_ours(args: argparse.Namespace) -> dict:
    """Rounds of: llama-bench decode of ``--gen-tokens`` for each type (one repetition, ``--interleave-threads``), then
    ours (same threads), dense, all seven projections at 50% and int8 + 50%, the same number of tokens (``decode.py``'s models and decode loop): on a shared
    machine, slow drifts hit both sides of a round alike, so the median of per-round ratios is the figure."""
    import statistics

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import decode

    threads = args.interleave_threads
    torch.set_num_threads(threads)
    ns = argparse.Namespace(e2e_layers=args.layers, seed=0, e2e_dtype="bfloat16", calib_tokens=32, calib_prompts=4,
                            e2e_sparsity=0.5, prompt_tokens=8)
    from pl_actsparse import TargetScope, export_for_inference, quantize_weights_int8, sparsify_activations

    runs: dict = {}
    for variant in ("dense", "all", "int8"):
        model, _ = decode._build_e2e_model(ns, "dense" if variant == "int8" else variant)
        if variant == "int8":  # every Linear int8 (the LM head too, as the Q8_0 GGUF), then 50% on the seven projections
            quantize_weights_int8(model)
            calib = [torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))]
            sparsify_activations(model, calib, {TargetScope(patterns=[r".*_proj"]): 0.5}, calibration={"progress": False})
            export_for_inference(model)
        runs[variant] = decode._decoder(model, decode._prompt(ns, model.config.vocab_size), args.gen_tokens, 8 + 4 * args.gen_tokens)
        runs[variant](0)  # warm-up
    tps: dict = {k: [] for k in [f"llamacpp_{t}" for t in args.types.split(",")] + ["ours_dense", "ours_sparse", "ours_int8_sparse"]}
    for r in range(args.interleave_ours):
        for kind in args.types.split(","):
            path = Path(args.gguf_dir) / f"tinyllama_shapes_{args.layers}l_{kind}.gguf"
            tps[f"llamacpp_{kind}"].append(llama_bench(args.llama_bench, path, threads, args.gen_tokens, 0, 1)["decode"]["tokens_per_s"])
        for variant, key in (("dense", "ours_dense"), ("all", "ours_sparse"), ("int8", "ours_int8_sparse")):
            t = time.perf_counter()
            runs[variant](r)
            tps[key].append(args.gen_tokens / (time.perf_counter() - t))
        print(f"[anchor] round {r}: " + json.dumps({k: round(v[-1], 3) for k, v in tps.items()}), file=sys.stderr, flush=True)
    ratio = lambda a, b: round(statistics.median(x / y for x, y in zip(tps[a], tps[b])), 3)  # noqa: E731
    out = {"threads": threads, "tokens_per_round": args.gen_tokens, "rounds": args.interleave_ours,
           "tokens_per_s_median": {k: round(statistics.median(v), 3) for k, v in tps.items()},
           "tokens_per_s": {k: [round(x, 3) for x in v] for k, v in tps.items()}}
    out["ours_sparse_vs"] = {k: ratio("ours_sparse", k) for k in tps if k != "ours_sparse"}
    out["ours_int8_sparse_vs"] = {k: ratio("ours_int8_sparse", k) for k in tps if k != "ours_int8_sparse"}
    return out


if __name__ == "__main__":
    main()
