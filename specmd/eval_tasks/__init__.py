"""lm_eval integration: the `offload-hf` model, the paper's tasks and small offline fixtures.

Importing this package is cheap (no lm_eval, torch or transformers). `specmd.eval_tasks.model` holds the
lm_eval model and needs the `eval` extra (`pip install 'specmd[eval]'`).

* `TASK_DIR`: the task YAMLs; give it to lm_eval as `--include_path`.
* `FIXTURES_DIR`: self-written items in the standard datasets' fields, for offline runs and tests.
* Where tasks read their data: `--metadata '{"specmd_data": ...}'` or the `SPECMD_EVAL_DATA` variable
  (`hub`: the standard datasets, the default; `fixtures`; or a directory of JSONL files), see `data`.
* A judge for the QA tasks: `SPECMD_EVAL_JUDGE=module:function` or `judge.set_judge(fn)`, see `judge`.
"""

from __future__ import annotations

from pathlib import Path

TASK_DIR = Path(__file__).parent / "tasks"
FIXTURES_DIR = Path(__file__).parent / "fixtures"
MODEL_NAME = "offload-hf"
MODEL_TARGET = "specmd.eval_tasks.model:OffloadHFLM"  # a lazy lm_eval registry entry: "module:attribute"
