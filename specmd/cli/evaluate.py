"""`specmd eval`: lm_eval tasks on an offloaded model, with the expert cache's metrics per task."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

from specmd.cli import options, output


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "eval", help="lm_eval tasks (the paper's GSM8K, TruthfulQA, NaturalQuestions) on an offloaded model"
    )
    options.add_model(evaluate, "model directory or hub id (default: bundled)", optional=True)
    evaluate.add_argument(
        "--tasks", default="specmd", help="comma-separated lm_eval tasks or tags (default: specmd, the three tasks; "
        "specmd_paper: their 100-document samples)",
    )  # fmt: skip
    evaluate.add_argument(
        "--data", default="fixtures", help="where specmd's tasks read documents: fixtures (the shipped offline items, "
        "default), hub (the standard datasets) or a directory of <dataset>/<split>.jsonl files",
    )  # fmt: skip
    options.add_policy(evaluate)
    options.add_offload_options(evaluate, bandwidth=options.PROFILE)
    evaluate.add_argument("--batch-size", type=options.positive_int, default=1, help="requests per batch (1)")
    evaluate.add_argument("--limit", type=options.positive_float, help="documents per task (a fraction if below 1)")
    evaluate.add_argument(
        "--num-fewshot", type=options.non_negative_int, help="few-shot examples (default: each task's own)"
    )
    evaluate.add_argument(
        "--max-gen-toks", type=options.positive_int, help="longest generation (default: lm_eval's, 256)"
    )
    evaluate.add_argument(
        "--num-processes", type=options.positive_int, default=1, help="data-parallel ranks, each with its own "
        "model and cache, the documents shared out (1): one per GPU with --device cuda, else CPU processes",
    )  # fmt: skip
    options.add_speculation(evaluate)
    evaluate.add_argument("--log-samples", action="store_true", help="keep every prompt and output in the result")
    evaluate.add_argument(
        "--print-task-dir", action="store_true", help="print the task directory for `lm_eval --include_path` and exit"
    )
    options.add_output(evaluate)
    evaluate.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from specmd.eval_tasks import TASK_DIR

    if args.print_task_dir:
        print(TASK_DIR)
        return 0
    try:
        from lm_eval.utils import handle_non_serializable, make_table
    except ModuleNotFoundError as exc:
        raise ValueError(f"specmd eval needs lm_eval ({exc.name} is missing): pip install 'specmd[eval]'") from None

    from specmd.eval_tasks import ranks
    from specmd.eval_tasks.run import check_inputs, evaluate

    if args.num_processes > 1 and ranks.launched_processes() == 1:  # this command again, once per rank
        check_inputs(options.model_path(args.model), args.data)  # once here, not once per rank
        return ranks.run_ranks(args.num_processes, options.device(args), ["specmd.cli", *args.argv])
    results = evaluate(
        options.model_path(args.model),
        [name for name in args.tasks.split(",") if name],
        data=args.data,
        **options.cache_size(args),
        policy=args.policy,
        bandwidth_gbps=args.bandwidth_gbps,
        hardware=args.hardware,
        shape_from=args.shape_from,
        expert_precisions=tuple(args.precisions.split(",")) if args.precisions else None,
        **options.storage_settings(args),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        max_gen_toks=args.max_gen_toks,
        log_samples=args.log_samples,
        progress=not args.json and ranks.rank() == 0,
        speculate=args.speculate,
        draft_frac=args.draft_frac,
        draft_precision=args.draft_precision,
    )
    if results is None:  # a rank other than 0: rank 0 shows the results of all
        return 0
    output.emit(args, json.loads(json.dumps(results, default=handle_non_serializable)))
    if not args.json:
        print(make_table(results))  # lm_eval's own Markdown table, as the lm_eval command prints it
        ranks_label = f", summed over {args.num_processes} ranks" if args.num_processes > 1 else ""
        title = f"expert cache per task{ranks_label}: {args.policy}, cache {output.capacity_label(args)}, "
        title += output.link_label(args)
        table = output.metrics_table(title, "task")
        table.add_column("MB moved", justify="right")
        for task, stats in results["config"]["specmd"]["tasks"].items():
            row = SimpleNamespace(**stats)
            table.add_row(task, *output.metric_cells(row), f"{row.bytes_transferred / 1e6:,.1f}")
        output.show_metrics(table)
    return 0
