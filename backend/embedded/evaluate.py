"""Measures how well a shapes model follows its captions: generate, read each image back, count.

    python -m backend.embedded.evaluate --model assets/tiny-shapes --n 200 [--quantization int8 ...]

Captions are drawn from the grammar with every part said (dataset.evaluation_captions); caption i is
generated with seed i at the model's default step count and guidance, with dpmpp_2m. Each image is
read by backend.embedded.analysis and each said part is checked: background color, object color,
position, shape. One table row per variant: fp32, fp16, then fp16 with each quantization asked for.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

import backend
from backend.embedded import analysis, dataset

FIELDS = ("background", "color", "position", "shape")
TARGETS = {"background": 0.95, "color": 0.90, "position": 0.85, "shape": 0.80}


def evaluate(pipe, captions: list[str], steps: Optional[int] = None, scheduler: str = "dpmpp_2m",
             progress=None, guidance: Optional[float] = None) -> dict:
    """{field: share correct, "all": share with every field right, "seconds": per image, "failures": [...]}."""
    correct = {f: 0 for f in FIELDS}
    all_right, failures = 0, []
    start = time.perf_counter()
    for seed, caption in enumerate(captions):
        result = pipe.generate(backend.GenerationRequest(prompt=caption, steps=steps, scheduler=scheduler, seed=seed,
                                                            guidance=guidance))
        expected = dataset.parse_caption(caption).said()
        checks = analysis.read_scene(result.image).matches(expected)
        for field, ok in checks.items():
            correct[field] += ok
        all_right += all(checks.values())
        if not all(checks.values()):
            failures.append({"seed": seed, "caption": caption, "wrong": [f for f, ok in checks.items() if not ok]})
        if progress:
            progress(seed + 1, len(captions))
    n = len(captions)
    return {**{f: correct[f] / n for f in FIELDS}, "all": all_right / n,
            "seconds": (time.perf_counter() - start) / n, "failures": failures}


def meets_targets(scores: dict) -> bool:
    return all(scores[f] >= target for f, target in TARGETS.items())


def table(rows: dict) -> str:
    """A markdown table, one row per variant."""
    head = "| variant | " + " | ".join(FIELDS) + " | all | s/image | targets |"
    lines = [head, "|" + "---|" * (len(FIELDS) + 4)]
    for name, s in rows.items():
        cells = " | ".join(f"{100 * s[f]:.1f}%" for f in (*FIELDS, "all"))
        lines.append(f"| {name} | {cells} | {s['seconds']:.2f} | {'met' if meets_targets(s) else 'MISSED'} |")
    target_cells = " | ".join(f">= {100 * TARGETS[f]:.0f}%" for f in FIELDS)
    lines.append(f"| target | {target_cells} | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.embedded.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/tiny-shapes")
    parser.add_argument("--n", type=int, default=200, help="captions to generate")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--precision", nargs="*", default=["fp32", "fp16"],
                        help="unquantized rows; none with a bare --precision (only the quantized rows)")
    parser.add_argument("--quantization", nargs="*", default=[], help="quantized variants (run in fp16)")
    parser.add_argument("--engine", default="mlx")
    parser.add_argument("--json", help="also write the scores and failures to this file")
    args = parser.parse_args(argv)

    captions = dataset.evaluation_captions(args.n)
    variants = [(p, None) for p in args.precision] + [("fp16", q) for q in args.quantization]
    if not variants:
        parser.error("nothing to evaluate: give --precision or --quantization")
    rows = {}
    for precision, quantization in variants:
        name = precision if quantization is None else f"{precision} + {quantization}"
        pipe = backend.load_pipeline(args.model, engine=args.engine, precision=precision, quantization=quantization)

        def show(done, total, name=name):
            print(f"\r{name}: {done}/{total}", end="", file=sys.stderr, flush=True)
        rows[name] = evaluate(pipe, captions, args.steps, args.scheduler, progress=show, guidance=args.guidance)
        print(file=sys.stderr)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(meets_targets(s) for s in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
