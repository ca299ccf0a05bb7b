"""Scores of the QA tasks: lm_eval's standard metrics, plus `judge` when a judge is plugged in (`judge`).

TruthfulQA reuses lm_eval's own document processing and BLEU/ROUGE scoring (`lm_eval.tasks.truthfulqa`),
and NaturalQuestions lm_eval's exact match with its `nq_open` settings, so the scores equal lm_eval's tasks'.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.tasks.truthfulqa.utils import process_docs_gen, process_results_gen

from specmd.eval_tasks import judge

# lm_eval's nq_open.yaml: exact match after dropping articles, case and punctuation, against any reference.
NQ_EXACT_MATCH = {
    "regexes_to_ignore": [r"\b(?:The |the |An |A |The |a |an )"],
    "ignore_case": True,
    "ignore_punctuation": True,
}


def truthfulqa_docs(dataset: Any) -> Any:
    """TruthfulQA's references tidied as lm_eval does (periods added, "I have no comment." counted true)."""
    return process_docs_gen(dataset)


def truthfulqa_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """BLEU and ROUGE max / diff / acc against the true and false references, and the judge's score."""
    request = judge.JudgeRequest(
        "truthfulqa", doc["question"], results[0], tuple(doc["correct_answers"]), tuple(doc["incorrect_answers"])
    )
    return process_results_gen(doc, results) | judge.score(request)


def nq_open_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match against any reference answer, and the judge's score."""
    prediction, references = results[0], [str(answer) for answer in doc["answer"]]
    matches = exact_match_hf_evaluate([prediction] * len(references), references, **NQ_EXACT_MATCH)["exact_match"]
    request = judge.JudgeRequest("nq_open", doc["question"], prediction, tuple(references))
    return {"exact_match": float(matches > 0)} | judge.score(request)
