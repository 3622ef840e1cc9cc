"""Write the quickstart data set: short reviews labelled positive or negative.

Every clause below was written for peftune. A review joins one to three clauses of the same polarity
about one thing. The clauses are split between train and validation before any review is built, so
validation reviews share no clause with training reviews and the score measures generalisation.

    python scripts/make_quickstart_data.py        # rewrites peftune/quickstart/{train,validation}.csv
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "peftune" / "quickstart"
SEED = 7
TRAIN_SIZE, VALIDATION_SIZE = 800, 240

# subject -> (positive clauses, negative clauses); "{it}" is replaced by the subject.
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "the phone": (
        [
            "the battery easily lasts two days",
            "the screen stays readable in bright sun",
            "{it} feels solid and well built",
            "photos come out sharp even at night",
            "{it} never lags when I switch apps",
            "setup took five minutes",
            "the fingerprint reader works every time",
            "calls sound clear on both ends",
            "{it} charges to full in under an hour",
            "the updates keep making it better",
            "it fits nicely in one hand",
            "the speakers are surprisingly loud",
        ],
        [
            "the battery is dead by lunchtime",
            "the screen cracked after one small drop",
            "{it} gets hot while charging",
            "the camera makes every photo look blurry",
            "{it} freezes several times a day",
            "the buttons already feel loose",
            "the face unlock fails in normal light",
            "calls drop for no reason",
            "the charger stopped working within a week",
            "the latest update made everything slower",
            "it is far too heavy to hold for long",
            "the speaker crackles at any volume",
        ],
    ),
    "the hotel": (
        [
            "the room was spotless",
            "the staff went out of their way to help",
            "the bed was wonderfully comfortable",
            "breakfast had plenty of fresh choices",
            "the view from the balcony was stunning",
            "check-in took two minutes",
            "it was quiet enough to sleep with the window open",
            "the location is perfect for exploring the old town",
            "the shower had strong hot water",
            "they upgraded our room without being asked",
            "the pool was clean and never crowded",
            "we would happily stay there again",
        ],
        [
            "the room smelled of smoke",
            "the staff ignored our complaints",
            "the mattress was lumpy and sagging",
            "breakfast was cold and overpriced",
            "the window faced a noisy construction site",
            "we waited an hour to check in",
            "the walls are so thin we heard every word next door",
            "the wifi dropped every few minutes",
            "the bathroom had mould around the tub",
            "they charged us twice for the same night",
            "the air conditioning rattled all night",
            "we will never book there again",
        ],
    ),
    "the restaurant": (
        [
            "every dish arrived hot and full of flavour",
            "the waiter gave great recommendations",
            "the portions were generous",
            "the desserts were the best we have had in years",
            "prices are fair for the quality",
            "the bread is baked fresh every morning",
            "the vegetarian options are creative",
            "our table was ready right on time",
            "the soup tasted homemade",
            "the staff remembered us from our last visit",
            "the wine list is short but excellent",
            "we left full and happy",
        ],
        [
            "the food arrived cold",
            "the waiter was rude and impatient",
            "the portions were tiny for the price",
            "the dessert tasted stale",
            "the bill included items we never ordered",
            "the fish was badly overcooked",
            "the salad was limp and soggy",
            "we waited forty minutes for a table we had booked",
            "the soup was bland and watery",
            "the kitchen forgot half of our order",
            "the place was dirty and sticky",
            "two of us felt sick afterwards",
        ],
    ),
    "the film": (
        [
            "the story kept me guessing until the end",
            "the acting is superb",
            "the soundtrack gave me chills",
            "every scene looks beautiful",
            "the jokes actually land",
            "the ending is moving without being sentimental",
            "the characters feel like real people",
            "it earns every minute of its running time",
            "the director handles the tension brilliantly",
            "I want to watch it again right away",
            "the dialogue is sharp and witty",
            "the lead gives a career best performance",
        ],
        [
            "the plot makes no sense",
            "the acting is wooden",
            "the music is loud and annoying",
            "the special effects look cheap",
            "the jokes fall completely flat",
            "the ending is lazy and rushed",
            "the characters are dull and forgettable",
            "it drags on for far too long",
            "the twist is obvious from the first scene",
            "I almost walked out halfway through",
            "the dialogue is clumsy and awkward",
            "the lead seems bored in every scene",
        ],
    ),
    "the headphones": (
        [
            "the sound is rich and detailed",
            "the noise cancelling blocks out the whole train",
            "{it} stay comfortable for hours",
            "pairing with my laptop was instant",
            "the battery lasts a full week of commuting",
            "the bass is deep without drowning the vocals",
            "the case is small and sturdy",
            "the microphone sounds clear on video calls",
            "{it} fold flat for travel",
            "the controls are easy to find by touch",
            "they are worth every penny",
            "the app lets me tune the sound just right",
        ],
        [
            "the sound is thin and tinny",
            "the noise cancelling barely does anything",
            "{it} hurt my ears after twenty minutes",
            "the connection keeps cutting out",
            "the battery dies after a couple of hours",
            "the bass is muddy and distorted",
            "the hinge snapped within a month",
            "people on calls cannot hear me",
            "the left side stopped working",
            "the touch controls trigger by accident",
            "they are a waste of money",
            "the app crashes every time I open it",
        ],
    ),
    "the course": (
        [
            "the lessons are clear and well paced",
            "the teacher explains hard ideas simply",
            "the exercises really helped me learn",
            "I finally understand statistics",
            "the feedback on assignments was thoughtful",
            "the videos are short and to the point",
            "the community forum is friendly and helpful",
            "I landed a new job thanks to it",
            "the projects feel like real work",
            "every module builds nicely on the last",
            "the notes are a great reference",
            "it was the best money I spent this year",
        ],
        [
            "the lessons are confusing and rushed",
            "the teacher reads slides in a monotone",
            "the exercises have nothing to do with the lectures",
            "I learned almost nothing",
            "nobody ever answered my questions",
            "the videos are full of mistakes",
            "the forum is empty and abandoned",
            "the certificate is worthless",
            "the projects are trivial busywork",
            "half of the links are broken",
            "the material is years out of date",
            "I asked for a refund after a week",
        ],
    ),
    "the delivery": (
        [
            "the parcel arrived a day early",
            "everything was packed carefully",
            "the driver was friendly and careful",
            "tracking was accurate the whole way",
            "the courier called ahead to check I was home",
            "nothing was missing from the order",
            "returns were quick and free",
            "support sorted out my question in minutes",
            "the items were exactly as described",
            "it came in recyclable packaging",
            "the box was left somewhere safe and dry",
            "I will order from them again",
        ],
        [
            "the parcel arrived two weeks late",
            "the box was crushed and the contents broken",
            "the driver threw the parcel over the fence",
            "tracking said delivered when nothing came",
            "the courier never showed up",
            "half of the order was missing",
            "they refused to accept the return",
            "support kept sending the same useless reply",
            "the item looks nothing like the photos",
            "it came wrapped in a mountain of plastic",
            "the parcel was left out in the rain",
            "I will never order from them again",
        ],
    ),
    "the app": (
        [
            "{it} is fast and easy to use",
            "the design is clean and calm",
            "syncing between my devices just works",
            "it has saved me hours every week",
            "the free version is genuinely useful",
            "new features arrive every month",
            "it works perfectly offline",
            "the reminders keep me on track",
            "the developers answer feedback quickly",
            "my data exports in one click",
            "it runs smoothly on my old tablet",
            "I recommend it to everyone",
        ],
        [
            "{it} is slow and confusing",
            "the screen is cluttered with adverts",
            "syncing loses my notes",
            "it drains my battery in the background",
            "every useful feature is behind a paywall",
            "each update breaks something new",
            "it is useless without a connection",
            "the notifications never stop",
            "the developers ignore bug reports",
            "there is no way to export my data",
            "it crashes on start up",
            "I deleted it after a day",
        ],
    ),
}

# Neutral context a review may open with: it says what is reviewed, never how it was.
INTROS: dict[str, list[str]] = {
    "the phone": [
        "I have had this phone for a month.",
        "Bought it to replace my old phone.",
        "My second phone from them.",
    ],
    "the hotel": ["We stayed three nights in May.", "Booked it for a work trip.", "Our first time in the city."],
    "the restaurant": ["We went for my sister's birthday.", "Lunch on a Tuesday.", "Tried it after a friend's tip."],
    "the film": ["Saw it on opening night.", "Watched it with my kids.", "I knew nothing about it going in."],
    "the headphones": ["I use them on my daily commute.", "Bought them for the gym.", "A gift from my partner."],
    "the course": ["I took it over eight weeks.", "My employer paid for it.", "I signed up in January."],
    "the delivery": [
        "I ordered a desk and two chairs.",
        "Ordered a birthday present online.",
        "A large order for the office.",
    ],
    "the app": ["I use it every day for work.", "Switched to it from a rival.", "Installed it on phone and laptop."],
}

OPENERS = ["", "Honestly, ", "Overall, ", "In short, ", "To be fair, ", "Well, ", "I have to say "]
JOINERS = [" and ", ", and ", "; ", ", plus "]
ENDINGS = [".", ".", ".", "!", " - really.", " for sure."]


def review(rng: random.Random, subject: str, clauses: list[str]) -> str:
    """One review: an opener, one to three clauses about `subject`, an ending."""
    chosen = rng.sample(clauses, k=min(len(clauses), rng.choice([1, 1, 2, 2, 3])))
    parts = [clause.replace("{it}", subject) for clause in chosen]
    body = parts[0]
    for part in parts[1:]:
        body += rng.choice(JOINERS) + part
    text = rng.choice(OPENERS) + body + rng.choice(ENDINGS)
    text = text[0].upper() + text[1:]
    return f"{rng.choice(INTROS[subject])} {text}" if rng.random() < 0.4 else text


def build(rng: random.Random, pools: dict[tuple[str, str], list[str]], size: int) -> list[tuple[str, str]]:
    rows: dict[str, str] = {}
    keys = sorted(pools)
    while len(rows) < size:
        subject, label = keys[len(rows) % len(keys)]
        rows.setdefault(review(rng, subject, pools[(subject, label)]), label)
    items = list(rows.items())
    rng.shuffle(items)
    return items


def main() -> None:
    rng = random.Random(SEED)
    train_pools: dict[tuple[str, str], list[str]] = {}
    validation_pools: dict[tuple[str, str], list[str]] = {}
    for subject, (positive, negative) in TOPICS.items():
        for label, clauses in (("positive", positive), ("negative", negative)):
            shuffled = clauses[:]
            rng.shuffle(shuffled)
            validation_pools[(subject, label)] = shuffled[:4]  # clauses no training review uses
            train_pools[(subject, label)] = shuffled[4:]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, pools, size in (
        ("train", train_pools, TRAIN_SIZE),
        ("validation", validation_pools, VALIDATION_SIZE),
    ):
        with open(OUT / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(build(rng, pools, size))
        print(f"wrote {size} rows to {OUT / f'{name}.csv'}")


if __name__ == "__main__":
    main()
