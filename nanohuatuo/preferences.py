"""Preference files: what the reward model and DPO learn from, read in one place.

    records = read_records(path)                      # [{"id", "prompt": messages, "answers": [best, ..., worst],
                                                      #   "reference_index": int or None}]
    examples = read_preferences(path, tok, template)  # the same, rendered: {"id", "seqs", "answer_starts",
                                                      #   "reference_index"}
    policy_seqs(examples)                             # every answer the policy wrote (the doctor's reply left out)

Three row shapes are accepted, told apart by their keys (a file may mix them):

- ours (`python -m nanohuatuo.feedback rank`): {"prompt" or "question": str or messages,
  "answers": [best, ..., worst]} with at least 2 answers, and with mixed feedback
  "reference_index": where the doctor's reply sits among the ranked answers.
- TRL's preference format: {"prompt", "chosen", "rejected"}, either standard (strings) or
  conversational (messages lists: "prompt" the conversation so far, "chosen"/"rejected" a list
  ending with the assistant's answer); without "prompt" ("implicit prompt") chosen and rejected
  are whole conversations sharing everything but their last assistant turn. A string prompt is
  taken as the user's message and rendered in the chat template like every other record.
- MedicalGPT's reward/DPO format: {"question", "response_chosen", "response_rejected"} with
  optional "system" (str) and "history" ([[question, answer], ...], earlier turns).

Every answer is rendered after its prompt with the chat template and ended at its end token
(reward_model.scored_seq: what a template writes after it, such as Qwen's newline, is not the
answer's); the answer's tokens are the last run of learned tokens, `answer_starts` saying where
each begins, so a loss on "the answer" never touches an earlier assistant turn of a multi-turn prompt.

The doctor's reply (mixed feedback) stays among the ranked answers: it is a real preference
signal, so the reward model's pairs and DPO's pairs use it. It is not an answer the policy wrote,
so statistics of the policy's answers (the reward model's bias and spread) skip it (`policy_seqs`).
"""

from .data import DataError, check_messages, iter_jsonl
from .reward_model import as_messages, scored_seq, with_answer
from .tokenizer import Tokenizer

SHAPES = ("{'prompt', 'answers': [best, ..., worst]} (feedback rank), {'prompt', 'chosen', 'rejected'} (TRL), "
          "or {'question', 'response_chosen', 'response_rejected'} (MedicalGPT)")


def reference_index(row: dict, where: str) -> int | None:
    """Where the doctor's reply sits in a mixed-feedback record's answers (None: not there).

    The reply is ranked with the policy's answers, so it belongs in the preference pairs, but it
    is no answer the policy wrote: the score statistics PPO's reward is measured in must skip it."""
    i = row.get("reference_index")
    if i is None:
        return None
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(row["answers"]):
        raise DataError(f"{where}: reference_index {i!r} is not the position of one of the "
                        f"{len(row['answers'])} answers")
    return i


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in x)


def _answer_of(x, where: str, key: str) -> tuple[list[dict] | None, str]:
    """(the conversation before the answer or None, the answer text) of a TRL chosen/rejected value."""
    if isinstance(x, str):
        return None, x
    if _is_messages(x) and x and x[-1]["role"] == "assistant":
        return x[:-1], x[-1]["content"]
    raise DataError(f"{where}: '{key}' must be a string or a messages list ending with an assistant turn")


def _trl(row: dict, where: str) -> tuple[list[dict], list[str]]:
    (before_c, chosen), (before_r, rejected) = (_answer_of(row[k], where, k) for k in ("chosen", "rejected"))
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt: whole conversations that differ only in their last turn
        if not before_c or before_c != before_r:
            raise DataError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be conversations that share "
                            f"every turn but the last assistant answer")
        return before_c, [chosen, rejected]
    if isinstance(prompt, str):
        messages = as_messages(prompt)
    elif _is_messages(prompt) and prompt:
        messages = list(prompt)
    else:
        raise DataError(f"{where}: 'prompt' must be a string or a messages list")
    if (before_c or []) != (before_r or []):
        raise DataError(f"{where}: 'chosen' and 'rejected' must differ only in their last assistant answer")
    return messages + (before_c or []), [chosen, rejected]  # a conversational chosen may repeat nothing


def _medicalgpt(row: dict, where: str) -> tuple[list[dict], list[str]]:
    system, history, question = row.get("system"), row.get("history") or [], row.get("question")
    if not isinstance(question, str) or (system is not None and not isinstance(system, str)) or \
            not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2
                                                     and all(isinstance(s, str) for s in t) for t in history):
        raise DataError(f"{where}: a MedicalGPT row needs 'question' (str), optional 'system' (str) and 'history' "
                        f"([[question, answer], ...])")
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}], [row["response_chosen"], row["response_rejected"]]


def parse_record(row: dict, where: str) -> dict:
    """One preference row of any accepted shape -> {"id", "prompt": messages, "answers": [best, ..., worst],
    "reference_index"}; a row of no accepted shape raises DataError naming `where`."""
    if "answers" in row:
        prompt, answers = row.get("prompt", row.get("question")), row["answers"]
        if not isinstance(prompt, (str, list)) or not isinstance(answers, list) or len(answers) < 2:
            raise DataError(f"{where}: expected a preference record {{'prompt', 'answers': [best, ..., worst]}} "
                            f"with at least 2 answers, as `python -m nanohuatuo.feedback rank` writes")
        messages, ref = as_messages(prompt), reference_index(row, where)
    elif "chosen" in row and "rejected" in row:
        (messages, answers), ref = _trl(row, where), None
    elif "response_chosen" in row and "response_rejected" in row:
        (messages, answers), ref = _medicalgpt(row, where), None
    else:
        raise DataError(f"{where}: not a preference row; expected {SHAPES}")
    if not all(isinstance(a, str) for a in answers) or not _is_messages(messages):
        raise DataError(f"{where}: answers must be strings and the prompt a string or messages "
                        f"[{{'role', 'content'}}, ...]")
    check_messages(messages, f"{where}: prompt", last="user")  # an empty question teaches nothing
    first = {}
    for i, a in enumerate(answers):  # a ranking of one text above itself: a pair with nothing to prefer
        if a in first:
            raise DataError(f"{where}: answers {first[a]} and {i} are the same text; each pair needs two different "
                            f"answers, one preferred")
        first[a] = i
    return {"id": row.get("id", where), "prompt": messages, "answers": answers, "reference_index": ref}


def read_records(path) -> list[dict]:
    """Every preference row of a JSONL file, parsed (`parse_record`)."""
    records = [parse_record(row, f"{path}:{lineno}") for lineno, row in iter_jsonl(path)]
    if not records:
        raise DataError(f"{path}: no preference records; run `python -m nanohuatuo.feedback rank` first")
    return records


def answer_start(mask: list[int]) -> int:
    """Where the last run of learned tokens begins: the final assistant answer's first token."""
    end = max(i for i, m in enumerate(mask) if m) if any(mask) else len(mask)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


def read_preferences(path, tok: Tokenizer, template) -> list[dict]:
    """Preference records -> [{"id", "seqs": token ids of prompt + answer, best answer first,
    "answer_starts": where each answer's tokens begin in its seq, "reference_index": position of
    the doctor's reply in seqs, or None}]."""
    examples = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        rec = parse_record(row, where)
        try:
            rendered = [scored_seq(with_answer(rec["prompt"], a), tok, template) for a in rec["answers"]]
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        examples.append({"id": rec["id"], "seqs": [ids for ids, _ in rendered],
                         "answer_starts": [answer_start(mask) for _, mask in rendered],
                         "reference_index": rec["reference_index"]})
    if not examples:
        raise DataError(f"{path}: no preference records; run `python -m nanohuatuo.feedback rank` first")
    return examples


def policy_seqs(examples: list[dict]) -> list[list[int]]:
    """Every answer of the preference examples that the policy wrote: the doctor's reply left out."""
    return [s for ex in examples for i, s in enumerate(ex["seqs"]) if i != ex.get("reference_index")]
