"""Greedy decoding, dense vs exported sparse model: the decode demo ``python -m pl_actsparse.demos generate``.

The demo answers two questions a user has before trusting sparse decoding: does the exported model say the
same thing (at sparsity 0 it must produce the dense text token for token; at the recipe's sparsity the text
drifts, and the demo shows how), and how fast is it (tokens/s of both models, measured in interleaved runs
of the same prompt, with the sparsity actually achieved on the decoded tokens).

The models must offer ``generate(input_ids, max_new_tokens, stop_ids=...)`` as
:class:`~pl_actsparse.demos.llama2c.Llama2cModel` does.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from pl_actsparse.measure.metric import DecodeSparsity  # the one counter of |x| <= t, on decode steps

__all__ = ["DecodeRun", "DecodeComparison", "compare_decoding", "generate_from_recipe"]


@dataclass
class DecodeRun:
    """One model's greedy continuation of the prompt and its speed."""

    label: str
    text: str
    token_ids: list[int]
    new_tokens: int
    seconds: list[float] = field(default_factory=list)  # one entry per timed repeat
    decode_sparsity: Optional[float] = None

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, from the median repeat (prefill included: the prompt is a few tokens)."""
        if not self.seconds or self.new_tokens == 0:
            return float("nan")
        return self.new_tokens / statistics.median(self.seconds)


@dataclass
class DecodeComparison:
    """Dense and sparse greedy decoding of one prompt; ``str()`` gives the printed demo."""

    prompt: str
    dense: DecodeRun
    sparse: DecodeRun
    exported_layers: int
    threads: int

    @property
    def identical(self) -> bool:
        return self.dense.token_ids == self.sparse.token_ids

    @property
    def first_difference(self) -> Optional[int]:
        """Index (in new tokens) of the first token where the two continuations differ, ``None`` if none."""
        a, b = self.dense.token_ids, self.sparse.token_ids
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))

    @property
    def speedup(self) -> float:
        return self.sparse.tokens_per_s / self.dense.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        def run(r: DecodeRun) -> dict[str, Any]:
            return {
                "text": r.text, "new_tokens": r.new_tokens, "tokens_per_s": round(r.tokens_per_s, 2),
                "seconds": [round(s, 4) for s in r.seconds], "decode_sparsity": r.decode_sparsity,
            }

        return {
            "prompt": self.prompt, "dense": run(self.dense), "sparse": run(self.sparse), "identical": self.identical,
            "first_difference": self.first_difference, "speedup": round(self.speedup, 3),
            "exported_layers": self.exported_layers, "threads": self.threads,
        }

    def __str__(self) -> str:
        lines = [f"prompt: {self.prompt!r}"]
        for r in (self.dense, self.sparse):
            sp = "" if r.decode_sparsity is None else f", {r.decode_sparsity:.1%} of sparse-layer inputs zero"
            lines += [
                f"--- {r.label}: {r.new_tokens} new tokens, {r.tokens_per_s:.1f} tokens/s "
                f"(median of {len(r.seconds)}){sp}",
                r.text,
            ]
        verdict = "identical to the dense text" if self.identical else f"differs from the dense text from new token {self.first_difference} on"
        lines.append(
            f"--- sparse {verdict}; speed {self.speedup:.2f}x dense ({self.exported_layers} exported layers, "
            f"{self.threads} thread{'s' if self.threads != 1 else ''})"
        )
        return "\n".join(lines)


def _generate(model: nn.Module, ids: Tensor, max_new_tokens: int, stop_ids: Sequence[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens, stop_ids=stop_ids)[0].tolist()
    while len(out) > ids.shape[1] and out[-1] in stop_ids:
        out.pop()
    return out[ids.shape[1] :]


def compare_decoding(
    dense_model: nn.Module, sparse_model: nn.Module, tokenizer: Any, prompt: str = "Once upon a time",
    max_new_tokens: int = 100, *, repeats: int = 3,
) -> DecodeComparison:
    """Greedy-decode ``prompt`` with both models; time ``repeats`` interleaved runs of each.

    ``tokenizer`` needs ``encode(text, bos=True)``, ``decode(ids)``, ``bos_id`` and ``eos_id`` (as
    :class:`~pl_actsparse.demos.llama2c.Llama2cTokenizer`). Decoding stops at BOS/EOS or after ``max_new_tokens``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__qualname__}")
    for name, value in (("max_new_tokens", max_new_tokens), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, m in (("dense_model", dense_model), ("sparse_model", sparse_model)):
        if not callable(getattr(m, "generate", None)):
            raise TypeError(f"{name} ({type(m).__qualname__}) has no generate(input_ids, max_new_tokens, stop_ids=...)")
    device = next(dense_model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt, bos=True)], dtype=torch.long, device=device)
    stops = (tokenizer.bos_id, tokenizer.eos_id)
    runs: dict[str, DecodeRun] = {}
    for label, model in (("dense", dense_model), ("sparse", sparse_model)):
        with DecodeSparsity(model) as probe:  # also the warm-up run
            new = _generate(model, ids, max_new_tokens, stops)
        runs[label] = DecodeRun(
            label=label, text=tokenizer.decode(ids[0].tolist() + new), token_ids=new, new_tokens=len(new),
            decode_sparsity=probe.fraction if label == "sparse" else None,
        )
    for _ in range(repeats):
        for label, model in (("dense", dense_model), ("sparse", sparse_model)):
            t0 = time.perf_counter()
            _generate(model, ids, max_new_tokens, stops)
            runs[label].seconds.append(time.perf_counter() - t0)
    from pl_actsparse.export.convert import exported_layers

    return DecodeComparison(
        prompt=prompt, dense=runs["dense"], sparse=runs["sparse"], exported_layers=len(exported_layers(sparse_model)),
        threads=torch.get_num_threads(),
    )


def generate_from_recipe(args: list[str] | None = None, prog: str = "python -m pl_actsparse.demos generate") -> DecodeComparison:
    """The decode demo: the recipe's sparsified, exported llama2.c model vs the dense one.

    Builds the recipe's model, data and :class:`~pl_actsparse.lightning.callback.ActivationSparsityCallback`
    (without running a Trainer) and calibrates with the callback's scopes, data source and
    :class:`~pl_actsparse.config.CalibrationConfig` (the same ``calibration`` options as ``pl-actsparse validate``
    on that recipe: batches, token mask, method, offload), exports the model for sparse decoding and prints
    both greedy continuations with their speeds. ``--sparsity 0`` must give back the dense text.
    Returns the :class:`DecodeComparison`; exits with status 2 on bad arguments.
    """
    import argparse
    import copy
    import json
    import sys

    from pl_actsparse.api import sparsify_activations
    from pl_actsparse.demos.llama2c import Llama2cModel, Llama2cTokenizer
    from pl_actsparse.export.convert import export_for_inference
    from pl_actsparse.lightning.callback import ActivationSparsityCallback
    from pl_actsparse.lightning.cli import run

    p = argparse.ArgumentParser(
        prog=prog,
        description="Greedy decoding with the recipe's sparsified and exported model vs the dense model. Further "
        "key=value or --key=value arguments override the recipe (e.g. data.init_args.calibration_stories=[500,520]).",
    )
    p.add_argument("--config", required=True, help="a recipe (YAML) with an ActivationSparsityCallback and a llama2.c model")
    p.add_argument("--prompt", default="Once upon a time", help="text after BOS (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=None, help="replace every scope's target (0: the dense text must come back)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each model, interleaved (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    ns, overrides = p.parse_known_args(args if args is not None else sys.argv[1:])
    if ns.sparsity is not None and not 0.0 <= ns.sparsity <= 1.0:
        p.error(f"--sparsity must be in [0, 1], got {ns.sparsity}")
    if ns.max_new_tokens < 1 or ns.repeats < 1:
        p.error(f"--max-new-tokens and --repeats must be >= 1, got {ns.max_new_tokens} and {ns.repeats}")
    if ns.threads:
        torch.set_num_threads(ns.threads)

    cli = run(["--config", ns.config, *overrides], subcommand=False)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, ActivationSparsityCallback)]
    if len(callbacks) != 1:
        raise SystemExit(f"{prog}: {ns.config} must configure one ActivationSparsityCallback, found {len(callbacks)}")
    callback = callbacks[0]
    module = cli.model
    target = callback.sparsified_module(module)
    net = getattr(module, "model", None)
    if not isinstance(net, Llama2cModel):
        raise SystemExit(
            f"{prog}: needs a LightningModule whose .model is a llama2.c model (e.g. TinyStoriesLM), "
            f"got {type(module).__name__} with .model {type(net).__name__}"
        )
    targets = dict(callback.targets)
    if ns.sparsity is not None:
        targets = {scope: ns.sparsity for scope in targets}
    dense = copy.deepcopy(net).eval()
    data = callback.calibration_data
    batches, _ = data.resolve(cli.datamodule, module)
    module.eval()
    config = data.config.replace(transform_fn=data.inputs_fn(module, target), progress=data.config.progress and not ns.json)
    sparsify_activations(target, batches, targets, callback.ignored_scope, calibration=config)
    export_for_inference(net)
    tokenizer = getattr(cli.datamodule, "tokenizer", None) or Llama2cTokenizer.from_file()  # the data directory's tok512.bin
    result = compare_decoding(dense, net, tokenizer, ns.prompt, ns.max_new_tokens, repeats=ns.repeats)
    print(json.dumps(result.to_dict(), indent=1) if ns.json else str(result))  # the demo's output is its stdout
    return result
