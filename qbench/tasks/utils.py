"""Turn the original task files into the rows lm-eval's built-in prompts expect.

The built-in tasks read the Hugging Face copies of these sets, whose layout differs from the
original releases that ``<data dir>/tasks/`` holds (see its MANIFEST.md). Each function maps one
original layout to the hub's, field by field, so the built-in ``doc_to_text`` / ``doc_to_target``
/ ``doc_to_choice`` templates apply unchanged.
"""
from __future__ import annotations

import re


def arc_process_docs(dataset):
    """AI2's ARC jsonl (``question: {stem, choices: [{text, label}]}``) → allenai/ai2_arc's layout
    (``question`` text, ``choices: {text: [...], label: [...]}``). Labels stay as released: 22
    ARC-Challenge items use "1"–"4" with a numeric answerKey, as on the hub."""

    def to_hub(doc):
        choices = doc["question"]["choices"]
        return {
            "id": doc["id"],
            "question": doc["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": doc["answerKey"],
        }

    return dataset.map(to_hub, remove_columns=dataset.column_names)


def boolq_process_docs(dataset):
    """Google's BoolQ dev layout (question, title, answer: bool, passage) → super_glue/boolq's
    (question, passage = title + " -- " + passage, idx = line number, label = 0/1)."""

    def to_hub(doc, index):
        return {
            "question": doc["question"],
            "passage": doc["title"] + " -- " + doc["passage"],
            "idx": index,
            "label": int(bool(doc["answer"])),
        }

    return dataset.map(to_hub, with_indices=True, remove_columns=dataset.column_names)


# WinoGrande: the file's layout is the hub's; the prompt is partial evaluation — each option fills
# the blank and the model scores the rest of the sentence after it (lm-eval's built-in task).
def winogrande_doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1:].strip()


def winogrande_doc_to_choice(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _hellaswag_clean(text):
    # WikiHow items carry " [title]" and other bracketed markup; lm-eval strips them the same way.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    """HellaSwag rows (original jsonl or Rowan/hellaswag) → query, choices and gold as lm-eval
    builds them."""

    def build(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + context),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(build)
