"""The baseline peftune is measured against: the Trainer script the Hugging Face tutorials teach, written plainly.

It follows the "Text classification" task guide of transformers and the LoRA guide of peft: load the data with
`datasets`, tokenize with `map` (truncation, no padding), pad per batch with `DataCollatorWithPadding`,
`AutoModelForSequenceClassification`, optionally `get_peft_model` with a `LoraConfig`, `TrainingArguments`,
`Trainer.train()`, then `Trainer.evaluate()`. Accuracy is computed with numpy, as `evaluate.load("accuracy")`
needs the Hub. It prints one JSON line with its timings, for scripts/bench_speed.py.

    python scripts/tutorial_baseline.py --model MODEL --train train.tsv --dev dev.tsv --method lora
"""

import argparse
import json
import resource
import time

import numpy as np
from datasets import load_dataset
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

started = time.perf_counter()
parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--train", required=True)
parser.add_argument("--dev", required=True)
parser.add_argument("--method", choices=["lora", "full"], default="lora")
parser.add_argument("--max-train-samples", type=int)
parser.add_argument("--epochs", type=float, default=1)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--learning-rate", type=float)
parser.add_argument("--max-length", type=int, default=128)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output-dir", default="baseline-output")
args = parser.parse_args()

# SST-2 as distributed: tab-separated, no quoting (the text has bare quotes).
dataset = load_dataset(
    "csv", data_files={"train": args.train, "validation": args.dev}, delimiter="\t", quoting=3, keep_default_na=False
)
if args.max_train_samples:
    dataset["train"] = dataset["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))

tokenizer = AutoTokenizer.from_pretrained(args.model)


def preprocess(examples):
    return tokenizer(examples["sentence"], truncation=True, max_length=args.max_length)


tokenize_started = time.perf_counter()
tokenized = dataset.map(preprocess, batched=True)
tokenize_seconds = time.perf_counter() - tokenize_started
data_collator = DataCollatorWithPadding(tokenizer=tokenizer)

id2label = {0: "negative", 1: "positive"}
label2id = {"negative": 0, "positive": 1}
model = AutoModelForSequenceClassification.from_pretrained(
    args.model, num_labels=2, id2label=id2label, label2id=label2id
)
if args.method == "lora":
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"
    )
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()


def compute_metrics(eval_pred):
    predictions, labels = eval_pred
    predictions = np.argmax(predictions, axis=1)
    return {"accuracy": float((predictions == labels).mean())}


training_args = TrainingArguments(
    output_dir=args.output_dir,
    learning_rate=args.learning_rate or (2e-3 if args.method == "lora" else 5e-5),
    per_device_train_batch_size=args.batch_size,
    per_device_eval_batch_size=args.batch_size,
    num_train_epochs=args.epochs,
    weight_decay=0.01,
    warmup_steps=0.06,
    eval_strategy="epoch",
    save_strategy="epoch",
    logging_steps=50,
    seed=args.seed,
    report_to="none",
)
trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=tokenized["train"],
    eval_dataset=tokenized["validation"],
    processing_class=tokenizer,
    data_collator=data_collator,
    compute_metrics=compute_metrics,
)
train_started = time.perf_counter()
result = trainer.train()
train_seconds = time.perf_counter() - train_started
# As peftune's metrics.json: throughput leaves out the evaluations during training.
step_seconds = train_seconds - sum(entry.get("eval_runtime", 0.0) for entry in trainer.state.log_history)
metrics = trainer.evaluate()
trainer.save_model(f"{args.output_dir}/final")

tokens = sum(len(ids) for ids in tokenized["train"]["input_ids"]) * args.epochs
print(
    "RESULT "
    + json.dumps(
        {
            "tokenize_seconds": round(tokenize_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "train_samples_per_second": round(len(tokenized["train"]) * args.epochs / step_seconds, 3),
            "train_tokens_per_second": round(tokens / step_seconds, 1),
            "accuracy": metrics["eval_accuracy"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "wall_seconds_inside": round(time.perf_counter() - started, 3),
        }
    )
)
