"""Write the feedback data set: messages customers send an online shop, tagged with every topic they raise
(multi-label) and whether they need an answer today (a rare class: skewed labels).

Every clause below was written for peftune. A message joins one to three clauses, each about another topic;
about one message in ten also carries an urgent clause. The clauses are split between train and validation
before any message is built, so validation messages share no clause with training messages.

    python scripts/make_feedback_data.py     # rewrites peftune/feedback/{train,validation}.jsonl

Each row: {"text": ..., "topics": ["billing", "delivery"], "urgent": "no"}. The recipes `feedback-topics`
(multi-label on `topics`) and `feedback-urgent` (the skewed yes/no on `urgent`) train on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "peftune" / "feedback"
SEED = 11
TRAIN_SIZE, VALIDATION_SIZE = 1200, 400
URGENT_SHARE = 0.1

TOPICS: dict[str, list[str]] = {
    "delivery": [
        "the parcel arrived four days after the promised date",
        "the courier left the box in the rain outside my door",
        "tracking has said 'out for delivery' since Monday",
        "my order went to the wrong address",
        "the delivery driver never rang the bell",
        "only one of the three boxes turned up",
        "the package came crushed on one side",
        "I was charged for express shipping but it came by standard post",
        "the pickup point you chose is closed at weekends",
        "delivery was quick and the box was well packed",
        "the courier called ahead, which was handy",
        "the parcel is stuck at the depot according to tracking",
        "the delivery slot I booked was ignored",
        "the box arrived a day early",
    ],
    "billing": [
        "I was charged twice for the same order",
        "the invoice shows the wrong VAT number",
        "my card was billed before the order shipped",
        "the discount code was not applied at checkout",
        "I need an invoice with my company's name on it",
        "the price went up between the basket and the payment",
        "my bank statement shows a charge I do not recognise",
        "the payment failed but the money left my account",
        "the receipt lists an item I never ordered",
        "I would like to pay by bank transfer instead",
        "the instalment plan took the full amount at once",
        "the gift card balance is wrong",
        "the total on the invoice does not match the order page",
        "I was billed in dollars instead of euros",
    ],
    "product": [
        "the blender stopped working after a week",
        "the jacket is a size smaller than the chart says",
        "the colour looks nothing like the photos",
        "one of the chair legs was missing its screws",
        "the kettle leaks from the bottom",
        "the lamp flickers when it is switched on",
        "the fabric started to pill after one wash",
        "the instructions are missing from the box",
        "the headphones only play on the left side",
        "the mattress smells strongly of chemicals",
        "the table scratches very easily",
        "the shoes are really comfortable and well made",
        "the battery of the vacuum lasts ten minutes",
        "the pan's coating is already peeling",
    ],
    "account": [
        "I cannot log in since I changed my email address",
        "the password reset link never arrives",
        "please delete my account and my data",
        "my order history has disappeared from my account",
        "I would like to change the name on my account",
        "the app logs me out every few minutes",
        "someone else's address shows up in my profile",
        "I keep getting newsletters after unsubscribing",
        "two-factor codes come through an hour late",
        "my loyalty points vanished from my account",
        "I cannot add a second delivery address to my profile",
        "the website says my email is already registered",
        "I want to merge my two accounts",
        "my saved card cannot be removed from my profile",
    ],
    "returns": [
        "I sent the item back three weeks ago and have no refund yet",
        "the returns label in the box does not scan",
        "how do I return a gift without the receipt",
        "you refused my return although it is within thirty days",
        "the refund came back short by the shipping cost",
        "I was told to pay for the return myself",
        "the return portal does not list my order",
        "I would like to exchange this for a larger size",
        "the courier never collected the return",
        "my refund went to a card that has expired",
        "the store would not take back an online order",
        "the returned item was marked as not received",
        "I need a return label for a heavy item",
        "the exchange arrived but the refund for the difference did not",
    ],
}

URGENT: list[str] = [
    "I need this sorted today",
    "please answer before the weekend or I will dispute the charge",
    "this is the third time I have written about this",
    "it was meant for a wedding on Saturday",
    "I am going abroad tomorrow and need it before then",
    "please call me back as soon as you can",
    "my landlord needs the payment proof by tonight",
    "nobody has replied to my last two emails",
    "I will cancel everything if this is not fixed today",
    "the event is tomorrow morning",
    "I have a deadline at noon",
    "this has now cost me a day off work",
]

OPENERS = ["", "Hello, ", "Hi, ", "Hi there, ", "Good morning, ", "Dear team, "]
JOINERS = [". Also, ", ". On top of that, ", ", and ", ". Another thing: ", "; also "]
CLOSERS = ["", "", " Thanks.", " Thank you.", " Regards, Sam.", " Kind regards."]


def split_pools(rng: random.Random) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each topic's clauses (and the urgent ones) split in two: train and validation never share one."""
    train, validation = {}, {}
    for name, clauses in [*TOPICS.items(), ("urgent", URGENT)]:
        shuffled = rng.sample(clauses, len(clauses))
        cut = len(shuffled) * 2 // 3
        train[name], validation[name] = shuffled[:cut], shuffled[cut:]
    return train, validation


def message(rng: random.Random, pools: dict[str, list[str]]) -> dict[str, object]:
    """One message: one to three topics, a clause about each, sometimes an urgent clause."""
    topics = sorted(rng.sample(sorted(TOPICS), k=rng.choice([1, 1, 1, 2, 2, 3])))
    parts = [rng.choice(pools[topic]) for topic in rng.sample(topics, len(topics))]
    urgent = rng.random() < URGENT_SHARE
    if urgent:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(pools["urgent"]))
    body = parts[0]
    for part in parts[1:]:
        body += rng.choice(JOINERS) + part
    text = rng.choice(OPENERS) + body
    text = text[0].upper() + text[1:] + "." + rng.choice(CLOSERS)
    return {"text": text, "topics": topics, "urgent": "yes" if urgent else "no"}


def main() -> None:
    rng = random.Random(SEED)
    train_pools, validation_pools = split_pools(rng)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, pools, size in (("train", train_pools, TRAIN_SIZE), ("validation", validation_pools, VALIDATION_SIZE)):
        rows = [message(rng, pools) for _ in range(size)]
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (OUT / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        urgent = sum(row["urgent"] == "yes" for row in rows)
        print(f"{name}: {size} messages, {urgent} urgent ({100 * urgent / size:.1f}%)")


if __name__ == "__main__":
    main()
