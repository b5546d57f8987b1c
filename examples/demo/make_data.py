"""Generate the demo task: rewrite a date written in words as an ISO 8601 date.

A 135M chat model knows what dates are but does not reliably answer with *only* the ISO form for
the many ways people write dates (weekday names, ordinal suffixes, two-digit days first, ...),
so exact-match accuracy before fine-tuning is low, and a short LoRA run can raise it a lot.

The split is by date, so no held-out date is ever seen in training. Deterministic for a seed;
run `python examples/demo/make_data.py` to regenerate the committed files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

MONTHS = [dt.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
WEEKDAYS = [dt.date(2024, 1, d).strftime("%A") for d in range(1, 8)]  # 2024-01-01 is a Monday
PROMPT = "Rewrite this date in ISO format (YYYY-MM-DD). Answer with the date only.\n{date}"


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spell(day: dt.date, style: int) -> str:
    month = MONTHS[day.month - 1]
    weekday = WEEKDAYS[day.weekday()]
    styles = [
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
        f"{weekday}, {month} {ordinal(day.day)}, {day.year}",
        f"the {ordinal(day.day)} of {month}, {day.year}",
        f"{month[:3]}. {day.day} {day.year}",
        f"{weekday} {day.day} {month} {day.year}",
    ]
    return styles[style % len(styles)]


def make_rows(days: list[dt.date], rng: random.Random) -> list[dict]:
    rows = []
    for day in days:
        text = spell(day, rng.randrange(6))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": PROMPT.format(date=text)},
                    {"role": "assistant", "content": day.isoformat()},
                ]
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    start = dt.date(1950, 1, 1)
    span = (dt.date(2049, 12, 31) - start).days
    picked = rng.sample(range(span), args.train + args.heldout)
    days = [start + dt.timedelta(days=d) for d in picked]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, subset in (("train", days[: args.train]), ("heldout", days[args.train :])):
        with (args.out / f"{name}.jsonl").open("w") as fh:
            for row in make_rows(subset, rng):
                fh.write(json.dumps(row) + "\n")
    print(f"wrote {args.train} training and {args.heldout} held-out rows to {args.out}")


if __name__ == "__main__":
    main()
