"""Zero-shot multiple-choice task files -> items in lm-evaluation-harness's prompt formats.

Every item is scored as loglikelihood requests (context, continuation), one per choice:
    piqa           "Question: {goal}\\nAnswer:"                  + " {sol1|sol2}"            (validation, 1838)
    arc_easy       "Question: {stem}\\nAnswer:"                  + " {choice text}"          (test, 2376)
    arc_challenge  "Question: {stem}\\nAnswer:"                  + " {choice text}"          (test, 1172)
    openbookqa     "{question stem}"                            + " {choice text}"          (main/test, 500)
    boolq          "{passage}\\nQuestion: {question}?\\nAnswer:"  + " no" | " yes"            (validation, 3270)
    hellaswag      preprocess("{activity}: {ctx_a} {Ctx_b}")     + " {preprocess(ending)}"   (validation)
    winogrande     partial scoring (Trinh & Le 2018): context = sentence up to the blank with the
                   option filled in, continuation = " " + the rest of the sentence, the same for both options.
These are the harness's task definitions (lm_eval/tasks/{piqa,arc,openbookqa,super_glue/boolq,hellaswag,
winogrande}). `norm_lens` are the characters of each choice string (without the leading space), the
divisor of acc_norm; for WinoGrande both options share one continuation, so acc_norm equals acc.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

from machinery.errors import UserError

# task -> files under the data directory (the first existing one is used)
FILES = {
    "piqa": ["piqa/valid.jsonl"],
    "winogrande": ["winogrande/dev.jsonl"],
    "boolq": ["boolq/dev.jsonl"],
    "openbookqa": ["openbookqa/test.jsonl"],
    "arc_easy": ["arc/ARC-Easy-Test.jsonl", "arc/arc_easy.jsonl"],
    "arc_challenge": ["arc/ARC-Challenge-Test.jsonl"],
    "hellaswag": ["hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_small.jsonl"],
}
TASKS = list(FILES)
# the metric lm-eval-based papers quote for each task; retention is computed on it
PRIMARY = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
           "hellaswag": "acc_norm", "boolq": "acc", "winogrande": "acc"}
NOTES = {
    "arc/arc_easy.jsonl": "ARC-Easy is llm-foundry's conversion: about 2% of gold labels or choice sets are wrong "
                          "(arc/SOURCE.md); fine for dense-vs-pruned, not for parity with published numbers",
    "hellaswag/hellaswag_small.jsonl": "HellaSwag: only a 4-item smoke sample is available, not a benchmark",
}


@dataclass
class Item:
    contexts: list  # one context per choice (they differ only for WinoGrande)
    continuations: list  # one continuation per choice, with its leading space
    norm_lens: list  # characters of each choice string, the acc_norm divisor
    gold: int


class TaskFileError(UserError):
    pass


def read_jsonl(path):
    """[(line number, object)] of a .jsonl file; a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
    if not rows:
        raise TaskFileError(f"task file {path} is empty")
    return rows


def read_labels(path, n):
    """The lines of a .lst label file, which must have one label per item."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"label file {path} does not exist")
    labels = Path(path).read_text().split()
    if len(labels) != n:
        raise TaskFileError(f"{path}: {len(labels)} labels for {n} items")
    return labels


def mc_item(context, choices, gold):
    if not 0 <= gold < len(choices):
        raise UserError(f"gold index {gold} is outside the {len(choices)} choices")
    return Item([context] * len(choices), [" " + c for c in choices], [len(c) for c in choices], gold)


def hellaswag_preprocess(text):
    # brackets are WikiHow artifacts; the harness drops them and turns " [title]" into a sentence break
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def piqa(d, label):
    return mc_item(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(label))


def arc(d, _):
    if "query" in d:  # llm-foundry conversion: query already carries "Question: "
        return mc_item(d["query"] + "\nAnswer:", d["choices"], int(d["gold"]))
    q = d["question"]
    labels = [c["label"] for c in q["choices"]]
    return mc_item(f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]], labels.index(d["answerKey"]))


def openbookqa(d, _):
    q = d["question"]
    labels = [c["label"] for c in q["choices"]]
    return mc_item(q["stem"], [c["text"] for c in q["choices"]], labels.index(d["answerKey"].lstrip()))


def boolq(d, _):
    return mc_item(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(bool(d["answer"])))


def hellaswag(d, _):
    if "query" in d:  # llm-foundry conversion of the harness's own preprocessing
        query, endings, gold = d["query"], d["choices"], int(d["gold"])
    else:
        query = d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
        endings, gold = d["endings"], int(d["label"])
    return mc_item(hellaswag_preprocess(query), [hellaswag_preprocess(e) for e in endings], gold)


def winogrande(d, _):
    s = d["sentence"]
    i = s.index("_")
    target = " " + s[i + 1:].strip()
    options = [d["option1"], d["option2"]]
    return Item([s[:i] + o for o in options], [target, target], [len(target) - 1] * 2, {"1": 0, "2": 1}[d["answer"]])


BUILDERS = {"piqa": piqa, "winogrande": winogrande, "boolq": boolq, "openbookqa": openbookqa,
            "arc_easy": arc, "arc_challenge": arc, "hellaswag": hellaswag}


def task_file(name, data_dir):
    if name not in FILES:
        raise UserError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    for rel in FILES[name]:
        if (Path(data_dir) / rel).is_file():
            return Path(data_dir) / rel
    raise FileNotFoundError(f"no file for task {name} under {data_dir} (looked for {', '.join(FILES[name])})")


def load_task(name, data_dir):
    """(items, note) for a task; a bad row is an error naming file, line and the problem."""
    path = task_file(name, data_dir)
    rows = read_jsonl(path)
    labels = read_labels(path.parent / "valid-labels.lst", len(rows)) if name == "piqa" else [None] * len(rows)
    items = []
    for (n, d), label in zip(rows, labels):
        try:
            items.append(BUILDERS[name](d, label))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise TaskFileError(f"{path}:{n}: cannot read a {name} item ({type(e).__name__}: {e})") from None
    return items, NOTES.get(str(path.relative_to(data_dir)))
