"""Does `torch.compile` pay on a CPU? Steady-state training steps, eager against compiled, full against LoRA.

    python scripts/bench_compile.py            # prints a markdown table (about five minutes on two cores)

The step is BENCHMARKS.md's (all-MiniLM-L6-v2, batches of 32, forward, backward, gradient clipping, fused AdamW) on
random token ids of three lengths, which the length-bucketed batches of a real job would pad to (multiples of
16). Each method and mode runs in its own process with an empty compile cache: the first step at each length
compiles (the second length compiles again with dynamic shapes), then the median of 12 steps per length. The model is
built as `peftune train quickstart` builds it (MiniLM; LoRA at its defaults: query and value, rank 8, no dropout,
pooler and classifier trained in full).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LENGTHS = (16, 32, 48)
BATCH = 32
STEPS = 12


def measure(method: str, compiled: bool) -> dict[str, float]:
    """Seconds of the warm-up steps (compiling) and samples/s per length, in this process."""
    import torch
    from transformers.utils import logging

    from peftune import modeling
    from peftune.data import Labels
    from peftune.recipe import load_recipe

    logging.set_verbosity_error()
    torch.manual_seed(0)
    recipe = load_recipe("quickstart", [f"method={method}"])  # MiniLM, each method at peftune's defaults
    base, fresh = modeling.load_base_model(recipe.model, Labels(names=("negative", "positive")))
    model = modeling.attach_method(base, recipe, fresh)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=True)  # as Trainer's default optimizer, adamw_torch_fused
    forward = torch.compile(model) if compiled else model

    def step(length: int) -> None:
        ids = torch.randint(1000, 20000, (BATCH, length))
        loss = forward(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 2, (BATCH,))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    started = time.perf_counter()
    for length in LENGTHS:
        step(length)
    result = {"warmup_s": time.perf_counter() - started}
    for length in LENGTHS:
        times = []
        for _ in range(STEPS):
            began = time.perf_counter()
            step(length)
            times.append(time.perf_counter() - began)
        result[str(length)] = BATCH / statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1] == "compiled")))
        return
    found = {}
    for method in ("full", "lora"):
        for mode in ("eager", "compiled"):
            with tempfile.TemporaryDirectory() as cache:  # compiled from nothing, as on a user's first run
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                command = [sys.executable, __file__, "--one", method, mode]
                out = subprocess.run(command, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{method} {mode} failed:\n{out.stderr[-3000:]}")
            found[method, mode] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; samples/s, median of {STEPS} steps\n")
    print("| method | mode | first steps (s) | " + " | ".join(f"32 x {n}" for n in LENGTHS) + " |")
    print("|---|---|---|" + "---|" * len(LENGTHS))
    for (method, mode), r in found.items():
        speeds = " | ".join(f"{r[str(n)]:.0f}" for n in LENGTHS)
        print(f"| {method} | {mode} | {r['warmup_s']:.1f} | {speeds} |")
    for mode in ("eager", "compiled"):
        ratios = ", ".join(f"{found['lora', mode][str(n)] / found['full', mode][str(n)]:.2f}x" for n in LENGTHS)
        print(f"\nLoRA / full, {mode}: {ratios}", end="")
    print()


if __name__ == "__main__":
    main()
