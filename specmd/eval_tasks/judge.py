"""The hook for an answer judge on the QA tasks (the paper scores QA with an LLM judge).

Offline there is no judge, so the tasks report the standard metrics (TruthfulQA: BLEU and ROUGE against
the true and false reference answers; NaturalQuestions: exact match against any reference). A judge adds
one metric, `judge`, the mean of its scores. Plug one in either way:

* in Python, before evaluating: ``specmd.eval_tasks.judge.set_judge(my_judge)``;
* for the `lm_eval` or `specmd eval` commands: ``SPECMD_EVAL_JUDGE=my_package.my_module:my_judge``.

A judge is any callable taking a `JudgeRequest` and returning a score in [0, 1] (1 = correct), e.g.
one that asks an LLM whether `prediction` answers `question` as the `references` do.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

JUDGE_ENV = "SPECMD_EVAL_JUDGE"


@dataclass(frozen=True)
class JudgeRequest:
    """One answer to judge.

    Attributes:
        task: the dataset, "truthfulqa" or "nq_open".
        question: the question as the dataset states it.
        prediction: the model's answer, after the task's filters.
        references: correct answers.
        incorrect: known wrong answers (TruthfulQA's `incorrect_answers`; empty for NaturalQuestions).
    """

    task: str
    question: str
    prediction: str
    references: tuple[str, ...]
    incorrect: tuple[str, ...] = ()


Judge = Callable[[JudgeRequest], float]

_judge: Judge | None = None
_from_env: tuple[str, Judge] | None = None


def set_judge(judge: Judge | None) -> None:
    """Use `judge` for the QA tasks in this process (None: back to `SPECMD_EVAL_JUDGE`, or none)."""
    global _judge
    if judge is not None and not callable(judge):
        raise ValueError(f"a judge must be callable (JudgeRequest -> float), got {judge!r}")
    _judge = judge


def current_judge() -> Judge | None:
    """The judge set in Python, else the one `SPECMD_EVAL_JUDGE` names, else None."""
    global _from_env
    if _judge is not None:
        return _judge
    target = os.environ.get(JUDGE_ENV, "").strip()
    if not target:
        return None
    if _from_env is None or _from_env[0] != target:
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise ValueError(f"{JUDGE_ENV} must be 'module:function', got {target!r}")
        judge = getattr(importlib.import_module(module), attribute)
        if not callable(judge):
            raise ValueError(f"{JUDGE_ENV}={target!r} is not callable")
        _from_env = (target, judge)
    return _from_env[1]


def score(request: JudgeRequest) -> dict[str, float]:
    """`{"judge": score}` when a judge is set, else nothing."""
    judge = current_judge()
    if judge is None:
        return {}
    value = float(judge(request))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"the judge returned {value} for {request.question!r}; scores must lie in [0, 1]")
    return {"judge": value}
