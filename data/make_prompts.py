"""Write the instruction-following prompt sets: data/prompts/train.jsonl, heldout.jsonl, dev.jsonl, train_multi.jsonl.

    python data/make_prompts.py [--out DIR]

Each prompt is a short everyday task plus one or two verifiable constraints
(rewards/constraints.py), e.g. "Write a short poem about rainy days. Answer in at most
40 words." The held-out set uses topics that never appear in training, so evaluation
measures following the constraints rather than remembering the prompts. The dev set
(for choosing settings, never for reporting) has topics of its own too, drawn from a
second seed after the other sets, so adding it left train and held-out byte for byte
as they were. train_multi (the default config's training pool) has the training
topics with two or three constraints per prompt, from a third seed.

Deterministic: a fixed seed and stdlib only, so re-running it reproduces the files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# Run as a file, Python puts data/ (not the repo root) on sys.path; add the root for `rewards`.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from rewards.constraints import CONSTRAINTS, compatible, describe_all  # noqa: E402

SEED = 20240611
TWO_CONSTRAINT_FRACTION = 0.4
NUM_HELDOUT_TOPICS = 16

# Tasks a 135M chat model can answer in about 100 tokens, and that stay sensible
# under any constraint (no fixed counts that would fight bullet_points or num_paragraphs).
TASK_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Write a short poem about {topic}.",
    "Give some practical tips about {topic}.",
    "Describe {topic} to someone who has never heard of it.",
    "Summarize why people care about {topic}.",
    "Write a short message to a friend about {topic}.",
    "Tell a short story about {topic}.",
    "Explain what a beginner should know about {topic}.",
    "Write a short encouraging note about {topic}.",
    "Describe a good day that involves {topic}.",
    "Share an interesting fact about {topic}.",
    "Explain how {topic} can make everyday life better.",
)

TOPICS = (
    "drinking water", "morning routines", "houseplants", "riding a bicycle", "making tea",
    "recycling", "public libraries", "rainy days", "learning a new language", "cooking rice",
    "walking a dog", "saving money", "keeping a journal", "baking bread", "gardening",
    "visiting a museum", "taking a nap", "board games", "cleaning the kitchen", "grocery shopping",
    "writing letters", "playing the guitar", "watching sunsets", "camping", "swimming",
    "packing for a trip", "making friends", "listening to music", "drawing", "reading novels",
    "birdwatching", "fixing a flat tire", "composting", "taking the bus", "using a map",
    "planting tomatoes", "making soup", "stretching", "going for a run", "caring for a cat",
    "visiting grandparents", "sharing a meal", "doing laundry", "the weekend", "snowy mornings",
    "picnics", "farmers markets", "learning to swim", "painting a room", "keeping bees",
    "making coffee", "organizing a desk", "taking photos", "flying a kite", "the night sky",
    "autumn leaves", "the beach", "hiking", "knitting", "fishing", "learning to cook",
    "volunteering", "saying thank you", "getting enough sleep", "eating breakfast",
    "going to the dentist", "moving to a new city", "the first day of school", "birthdays",
    "thunderstorms", "summer holidays", "making pancakes", "riding a train", "playing chess",
    "writing a shopping list", "sorting old photos", "feeding birds", "building a snowman",
    "telling jokes", "saving energy at home",
)

# Topics of the dev set only: settings are chosen on these, never on the held-out set.
DEV_TOPICS = (
    "wearing sunscreen", "making a sandwich", "repairing a chair", "writing a poem", "visiting a zoo",
    "planning a party", "learning to juggle", "raising chickens", "taking a bath", "watching clouds",
    "building a birdhouse", "ice skating", "sewing a button", "brushing your teeth", "lighting a candle",
    "mailing a package",
)
DEV_SEED = SEED + 1
MULTI_SEED = SEED + 2


def split_topics(rng: random.Random) -> tuple[list[str], list[str]]:
    """Hold out whole topics, so no held-out prompt shares its subject with a training prompt."""
    topics = sorted(TOPICS)
    rng.shuffle(topics)
    return topics[NUM_HELDOUT_TOPICS:], topics[:NUM_HELDOUT_TOPICS]


def sample_constraints(first_kind: str, count: int, rng: random.Random) -> list[dict]:
    """`count` constraints, the first of `first_kind`, each further one compatible with all before it."""
    kinds = [first_kind]
    while len(kinds) < count:
        partners = [k for k in CONSTRAINTS if compatible([*kinds, k])]
        kinds.append(rng.choice(partners))
    return [{"kind": kind, **CONSTRAINTS[kind].sample_args(rng)} for kind in kinds]


def make_split(name: str, topics: list[str], rng: random.Random) -> list[dict]:
    tasks = [template.format(topic=topic) for topic in topics for template in TASK_TEMPLATES]
    rng.shuffle(tasks)
    # The first constraint walks through every kind in turn, so each kind appears
    # about equally often in every split, however small.
    kinds = list(CONSTRAINTS)
    # An exact share of two-constraint prompts, rather than a coin flip per prompt,
    # keeps the mix the same in the small held-out set as in training.
    num_two = round(TWO_CONSTRAINT_FRACTION * len(tasks))
    two_flags = [True] * num_two + [False] * (len(tasks) - num_two)
    rng.shuffle(two_flags)
    rows = []
    for index, task in enumerate(tasks):
        if index % len(kinds) == 0:
            rng.shuffle(kinds)
        constraints = sample_constraints(kinds[index % len(kinds)], 2 if two_flags[index] else 1, rng)
        rows.append({
            "prompt_id": f"{name}-{index + 1:05d}",
            "messages": [{"role": "user", "content": f"{task} {describe_all(constraints)}"}],
            "constraints": constraints,
        })
    return rows


def make_multi_split(name: str, topics: list[str], rng: random.Random) -> list[dict]:
    """Training prompts with two or three constraints each (half and half), for the default's pool.

    With one constraint, a prompt's four samples often all meet it or all miss it,
    and a round learns nothing from such a prompt; with two or three they rarely
    tie, and every kind is still trained on. Evaluation stays on the held-out set
    of one or two constraints.
    """
    tasks = [template.format(topic=topic) for topic in topics for template in TASK_TEMPLATES]
    rng.shuffle(tasks)
    kinds = list(CONSTRAINTS)
    counts = [2, 3] * (len(tasks) // 2) + [2] * (len(tasks) % 2)
    rng.shuffle(counts)
    rows = []
    for index, task in enumerate(tasks):
        if index % len(kinds) == 0:
            rng.shuffle(kinds)
        constraints = sample_constraints(kinds[index % len(kinds)], counts[index], rng)
        rows.append({"prompt_id": f"{name}-{index + 1:05d}",
                     "messages": [{"role": "user", "content": f"{task} {describe_all(constraints)}"}],
                     "constraints": constraints})
    return rows


def make_smoke_split(name: str, topics: list[str], count: int) -> list[dict]:
    """Prompts for the smoke config's tiny random-weight model.

    Its 24-token answers are noise of 10 to 20 words, so a word limit inside that
    band splits its samples between pass and fail: smoke rounds get real rankings
    to train on instead of all-tied lists.
    """
    constraints = [{"kind": "max_words", "limit": 16}]
    tasks = [template.format(topic=topic) for topic in topics for template in TASK_TEMPLATES][:count]
    return [{"prompt_id": f"{name}-{index + 1:05d}",
             "messages": [{"role": "user", "content": f"{task} {describe_all(constraints)}"}],
             "constraints": constraints}
            for index, task in enumerate(tasks)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # newline="\n" keeps the bytes identical on every platform.
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "prompts",
                        help="directory to write the prompt sets into")
    args = parser.parse_args(argv)

    rng = random.Random(SEED)
    train_topics, heldout_topics = split_topics(rng)
    splits = {"train": make_split("train", train_topics, rng),
              "heldout": make_split("heldout", heldout_topics, rng),
              "smoke_train": make_smoke_split("smoke-train", train_topics, 48),
              "smoke_heldout": make_smoke_split("smoke-heldout", heldout_topics, 8),
              "dev": make_split("dev", list(DEV_TOPICS), random.Random(DEV_SEED)),
              "train_multi": make_multi_split("train-multi", train_topics, random.Random(MULTI_SEED))}

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(args.out / f"{name}.jsonl", rows)
        print(f"wrote {len(rows)} prompts to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
