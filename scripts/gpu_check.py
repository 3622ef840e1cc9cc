"""GPU check: LoRA on a float32, an 8-bit and a 4-bit BERT-base-shaped model, on CUDA; writes reports/gpu.md.

A BERT-base-sized model with random weights (from its config: the timings and memory of trained weights are the
same) is saved once, then for each base peftune loads it as `peftune train` does (`load_base_model`, the head and
pooler kept in float, placed on this process's GPU), attaches LoRA at its defaults and trains a few hundred steps
of synthetic data with AdamW (the label is a function of the second token). It records steps/s
after a warm-up, `torch.cuda.max_memory_allocated`, whether every tensor sits on the model's device, then folds
the adapter into the float32 base as `peftune merge` does and compares the logits of the merged model with the
adapter model's on held-out batches.

    python scripts/gpu_check.py                      # 300 steps, batch 32 x 128, reports/gpu.md
    python scripts/gpu_check.py --steps 50 --out /tmp/gpu.md

Needs CUDA and bitsandbytes; it exits with status 2 on a machine without them.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing peftune

BASES = ("none", "8bit", "4bit")


def save_random_bert_base(folder: Path, small: bool = False) -> Path:
    """BERT-base (12 layers, hidden 768) with random weights, saved as a bare encoder, like a Hub checkpoint."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = (
        BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=256)
        if small
        else BertConfig()
    )
    BertModel(config).save_pretrained(folder)
    return folder


def batches(steps: int, batch: int, length: int, seed: int, device: Any) -> list[tuple[Any, Any]]:
    """Synthetic examples: random tokens, labelled by which half of the vocabulary the second token is from."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(steps):
        ids = torch.randint(1000, 30000, (batch, length), generator=generator)
        made.append((ids.to(device), (ids[:, 1] >= 15500).long().to(device)))
    return made


def check_base(folder: Path, quantization: str, steps: int, batch: int, length: int) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    from peftune.data import Labels
    from peftune.merge import _keep_trained_copies
    from peftune.modeling import attach_method, load_base_model, process_device
    from peftune.recipe import ModelSpec, Recipe

    labels = Labels(names=("low", "high"))
    spec = ModelSpec(name_or_path=str(folder), quantization=quantization)
    recipe = Recipe(name="gpu-check", model=spec, data={"files": {"train": "unused.csv"}}, method="lora")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    device = process_device()
    base, fresh = load_base_model(spec, labels, compute_dtype="float32")
    if not spec.quantized:
        base.to(device)  # a quantized base is placed while loading; a float one is moved, as Trainer would
    model = attach_method(base, recipe, fresh)
    tensors = [*model.parameters(), *model.buffers()]
    placed = all(t.device == device for t in tensors)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lora["learning_rate"])
    train = batches(steps, batch, length, seed=0, device=device)
    warmup = min(20, steps // 5)
    losses = []
    model.train()
    for number, (ids, target) in enumerate(train):
        if number == warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = model(input_ids=ids, labels=target).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if cuda:
        torch.cuda.synchronize()
    steps_per_second = (steps - warmup) / (time.perf_counter() - started)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")

    held_out = batches(4, batch, length, seed=1, device=device)
    model.eval()
    with torch.no_grad():
        adapter_logits = torch.cat([model(input_ids=ids).logits.float() for ids, _ in held_out])
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        del model, base, optimizer
        if cuda:
            torch.cuda.empty_cache()
        float_base, _ = load_base_model(spec.model_copy(update={"quantization": "none"}), labels)
        adapted = PeftModel.from_pretrained(float_base.to(device), saved)
        _keep_trained_copies(adapted)
        merged = adapted.merge_and_unload().eval()
        with torch.no_grad():
            merged_logits = torch.cat([merged(input_ids=ids).logits.float() for ids, _ in held_out])
    del merged, adapted, float_base
    accuracy = float((adapter_logits.argmax(-1).cpu() == torch.cat([t for _, t in held_out]).cpu()).float().mean())
    return {
        "base": quantization,
        "steps_per_second": steps_per_second,
        "peak_mb": peak_mb,
        "placed": placed,
        "device": str(device),
        "loss_first": sum(losses[:20]) / len(losses[:20]),
        "loss_last": sum(losses[-20:]) / len(losses[-20:]),
        "held_out_accuracy": accuracy,
        "merge_max_abs_logit_difference": float((adapter_logits - merged_logits).abs().max()),
        "merge_label_agreement": float((adapter_logits.argmax(-1) == merged_logits.argmax(-1)).float().mean()),
    }


def report(rows: list[dict[str, Any]], steps: int, batch: int, length: int) -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (a smoke test, not a GPU figure)"
    lines = [
        "# GPU check: LoRA on float32, 8-bit and 4-bit bases",
        "",
        "Generated by `python scripts/gpu_check.py`; do not edit by hand "
        f"(written {datetime.now(timezone.utc).isoformat(timespec='minutes')}).",
        "",
        f"Device: {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, Python {platform.python_version()}.",
        f"Model: BERT-base shape (110M parameters, random weights), LoRA at peftune's defaults, {steps} steps of "
        f"batch {batch} x {length} synthetic tokens, AdamW; steps/s after a warm-up; peak is "
        "`torch.cuda.max_memory_allocated` over loading and training. The merge folds the adapter into the "
        "float32 base (as `peftune merge` does) and compares logits with the adapter model on 128 held-out rows.",
        "",
        "| base | steps/s | peak memory (MB) | all tensors on the model's device | loss, first 20 steps -> last 20 "
        "| merge: max logit difference | merge: label agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['base']} | {r['steps_per_second']:.2f} | {r['peak_mb']:,.0f} | {'yes' if r['placed'] else '**no**'} "
            f"({r['device']}) | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
            f"{r['merge_max_abs_logit_difference']:.2e} | {r['merge_label_agreement']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated subset of " + ",".join(BASES))
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu.md")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU anyway (a smoke test of this script)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_check needs a CUDA device; this machine has none (reports/gpu.md is left as it is)", file=sys.stderr)
        return 2
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("gpu_check needs bitsandbytes: pip install bitsandbytes", file=sys.stderr)
        return 2
    import transformers

    transformers.logging.set_verbosity_error()  # load reports of a random model are expected
    rows = []
    with tempfile.TemporaryDirectory() as models:
        folder = save_random_bert_base(Path(models) / "bert-base", small=args.cpu)
        for base in args.bases.split(","):
            rows.append(check_base(folder, base, args.steps, args.batch, args.length))
            print(rows[-1], flush=True)
    args.out.write_text(report(rows, args.steps, args.batch, args.length), encoding="utf-8")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
