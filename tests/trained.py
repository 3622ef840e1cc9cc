"""Train tiny runs and read their logits: what the tests compare a reloaded, merged or exported model with."""

from __future__ import annotations

import tiny
import torch
from transformers import TrainerCallback

from peftune.inference import load_target
from peftune.recipe import load_recipe
from peftune.train import train

PROBE = [
    "The battery easily lasts two days.",
    "The waiter was rude and impatient, and the soup was bland.",
    "Setup took five minutes.",
]


class Recorder(TrainerCallback):
    """Keeps what the trained model in memory looks like: trainable tensors at start, logits at the end."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start: dict[str, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.moved = {n for n, p in model.named_parameters() if n in self.start and not torch.equal(p, self.start[n])}
        model.eval()
        with torch.no_grad():
            self.logits = model(**batch(self.tokenizer)).logits.float()
        model.train()


def batch(tokenizer):
    return tokenizer(PROBE, padding=True, truncation=True, max_length=32, return_tensors="pt")


def train_tiny(tmp_path, model_dir, reviews, *overrides):
    from transformers import AutoTokenizer

    recipe_file = tiny.write_recipe(tmp_path / "recipe.yaml", model_dir, *reviews)
    recorder = Recorder(AutoTokenizer.from_pretrained(model_dir))
    overrides = ("data.max_train_samples=24", "train.eval_strategy=no", "train.save_strategy=no", *overrides)
    run = train(load_recipe(str(recipe_file), overrides), output_dir=tmp_path / "run", callbacks=[recorder])
    return run, recorder


def reloaded_logits(run) -> torch.Tensor:
    loaded = load_target(run.path)
    model, tokenizer = loaded.model, loaded.tokenizer
    with torch.no_grad():
        return model(**batch(tokenizer)).logits.float()
