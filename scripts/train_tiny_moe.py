"""Train specmd's bundled default model: a small OLMoE-architecture MoE on the Python standard library.

The corpus is every machine's offline text: the `.py` and `.txt` files of this Python's standard library
(source, docstrings, `pydoc_data/topics.py`, which holds the language reference text). Files are split by
a hash of their relative path, so the held-out split names the same files on every Python version. A
byte-level BPE tokenizer is trained on the training split, then the model: next-token cross-entropy plus
OLMoE's router losses (load balancing 0.01, z-loss 0.001), so experts specialise instead of collapsing.

The same seed, corpus, arguments and thread count give the same weights. Training state is saved every
`--save-every` steps; `--resume` continues from it with the same result as an uninterrupted run. The
checkpoint is written as bf16 safetensors with the tokenizer and `training_info.json` (corpus hashes,
Python version, config, the exact command, held-out perplexity).

    python scripts/train_tiny_moe.py --out specmd/data/olmoe-stdlib
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

SPECIAL_TOKENS = {"eos": "<|endoftext|>", "pad": "<|pad|>"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# ---- corpus -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """The standard library's text files, split by file into training and held-out parts."""

    root: Path
    train: list[str]  # relative posix paths, sorted
    heldout: list[str]
    texts: dict[str, str]

    def info(self) -> dict[str, object]:
        """Hashes that identify this corpus: the file list, and the file list with contents."""
        names = sorted(self.texts)
        content = hashlib.sha256()
        for name in names:
            content.update(name.encode() + b"\0" + hashlib.sha256(self.texts[name].encode()).digest())
        return {
            "root": str(self.root),
            "files": len(names),
            "train_files": len(self.train),
            "heldout_files": len(self.heldout),
            "file_list_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "content_sha256": content.hexdigest(),
            "train_bytes": sum(len(self.texts[n].encode()) for n in self.train),
            "heldout_bytes": sum(len(self.texts[n].encode()) for n in self.heldout),
            "heldout": self.heldout,
        }


def is_heldout(name: str, percent: float) -> bool:
    """Whether a file (relative posix path) is in the held-out split; stable across Python versions."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 10_000
    return bucket < percent * 100


def load_corpus(root: Path, heldout_percent: float, max_files: int | None = None) -> Corpus:
    """Every UTF-8 `.py` / `.txt` file under `root` except installed packages, split by file."""
    texts = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix not in (".py", ".txt") or SKIP_DIRS & set(rel.parts) or not path.is_file():
            continue
        try:
            texts[rel.as_posix()] = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few test files are deliberately in legacy encodings
            continue
    names = sorted(texts)[:max_files]
    texts = {n: texts[n] for n in names}
    heldout = [n for n in names if is_heldout(n, heldout_percent)]
    if not heldout:  # a small slice (smoke runs) may hash no file into the split
        heldout = names[-1:]
    train = [n for n in names if n not in set(heldout)]
    if not train:
        raise ValueError(f"the corpus under {root} has too few files ({len(names)}) for a training split")
    return Corpus(root, train, heldout, texts)


# ---- tokenizer --------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS["eos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        padding_side="left",
    )


def encode(tokenizer, texts: list[str]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """All texts as one token stream, each followed by the end-of-text token."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


# ---- model and losses -------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, tokenizer):  # type: ignore[no-untyped-def]
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.expert_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.max_positions,
        output_router_logits=True,  # the forward returns every layer's router logits for the aux losses
        router_aux_loss_coef=args.aux_loss_coef,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return OlmoeForCausalLM(config)


def losses(model, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """(cross-entropy, load-balancing loss, router z-loss) of a [B, S+1] token batch.

    transformers' `load_balancing_loss_func` pools the expert counts of all layers before taking the
    product, so one layer's imbalance can hide behind another's; as OLMoE (and megablocks) train, the loss
    here is taken per layer and averaged, by calling the same function on one layer at a time.
    """
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    # B = batch, S = sequence, V = vocabulary, E = experts
    config = model.config
    out = model(input_ids=batch[:, :-1], output_router_logits=True)
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())  # [B*S, V] vs [B*S]
    routers = out.router_logits  # L x [B*S, E]
    balance = torch.stack(
        [load_balancing_loss_func((r,), config.num_experts, config.num_experts_per_tok) for r in routers]
    ).mean()
    z = torch.stack([torch.logsumexp(r.float(), dim=-1).square().mean() for r in routers]).mean()
    return ce, balance, z


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The stream cut into non-overlapping [N, seq_len+1] windows (one token of overlap for the label)."""
    n = (len(stream) - 1) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]  # [N, S+1]
    return stream[idx].long()


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, max_tokens: int | None, batch_size: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Mean next-token cross-entropy (nats) over non-overlapping windows of the held-out stream."""
    data = windows(stream, seq_len)
    if max_tokens:
        data = data[: max(1, max_tokens // seq_len)]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += float(ce)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to `min_lr_frac` of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, args: argparse.Namespace) -> torch.optim.Optimizer:  # type: ignore[no-untyped-def]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def batch_at(stream: torch.Tensor, step: int, args: argparse.Namespace) -> torch.Tensor:
    """Random windows for `step`, a function of (seed, step) only, so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch_size,), generator=generator)
    return stream[starts[:, None] + torch.arange(args.seq_len + 1)[None, :]].long()  # [B, S+1]


# ---- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="corpus root")
    p.add_argument("--heldout-percent", type=float, default=3.0, help="share of files held out (by path hash)")
    p.add_argument("--max-files", type=int, help="use only the first N files (smoke runs)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--expert-size", type=int, default=32, help="each expert's intermediate size")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balancing loss weight (OLMoE: 0.01)")
    p.add_argument("--z-loss-coef", type=float, default=0.001, help="router z-loss weight (OLMoE: 0.001)")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results may depend on it)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between quick held-out checks (0: none)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens for the final evaluation (default: all)")
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable state saves")
    p.add_argument("--resume", action="store_true", help="continue from the state saved in --out")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the saved weights")
    args = p.parse_args(argv)
    if args.hidden_size % args.heads:
        p.error(f"--hidden-size {args.hidden_size} must be a multiple of --heads {args.heads}")
    if not 0 < args.top_k <= args.experts:
        p.error(f"--top-k must be in 1..--experts ({args.experts}), got {args.top_k}")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"

    corpus = load_corpus(args.stdlib, args.heldout_percent, args.max_files)
    print(f"corpus: {len(corpus.train)} training files, {len(corpus.heldout)} held out", file=sys.stderr)
    train_texts = [corpus.texts[n] for n in corpus.train]
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_stream = encode(tokenizer, train_texts)
    heldout_stream = encode(tokenizer, [corpus.texts[n] for n in corpus.heldout])
    print(f"tokens: {len(train_stream):,} training, {len(heldout_stream):,} held out", file=sys.stderr)

    model = build_model(args, tokenizer)
    model.train()
    optimizer = make_optimizer(model, args)
    start, history = 0, []
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["args"] != _resumable(args):
            raise ValueError(f"{state_path} was saved with other arguments: {state['args']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        print(f"resumed at step {start}", file=sys.stderr)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        ce, balance, z = losses(model, batch_at(train_stream, step, args))
        loss = ce + args.aux_loss_coef * balance + args.z_loss_coef * z
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        record = {"step": step + 1, "ce": ce.item(), "balance": balance.item(), "z": z.item()}
        if args.eval_every and (step + 1) % args.eval_every == 0:
            record["heldout_ce"] = evaluate(model, heldout_stream, args.seq_len, 8 * args.seq_len, 8)["loss"]
            tqdm.write(json.dumps(record), file=sys.stderr)
        history.append(record)
        bar.set_postfix(ce=f"{record['ce']:.3f}", bal=f"{record['balance']:.3f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            _save_state(state_path, model, optimizer, step + 1, history, args)
    bar.close()

    # Ship the weights in the saved dtype, and measure what ships.
    model.config.output_router_logits = False  # inference needs no router logits
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    heldout = evaluate(model, heldout_stream, args.seq_len, args.eval_tokens, 16)
    predicted = heldout_stream[1 : heldout["tokens"] + 1].tolist()  # the tokens the evaluation scored
    heldout_bytes = len(tokenizer.decode(predicted, skip_special_tokens=True).encode())
    info = {
        "command": "python scripts/train_tiny_moe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "args": _resumable(args) | {"out": str(args.out), "stdlib": str(args.stdlib)},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": _versions(),
        "corpus": corpus.info() | {"train_tokens": len(train_stream), "heldout_tokens": len(heldout_stream)},
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "expert_parameters": sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
            "dtype": args.dtype,
        },
        "training": {
            "steps": args.steps,
            "tokens_seen": args.steps * args.batch_size * args.seq_len,
            "final_train_ce": history[-1]["ce"] if history else None,
            "wall_time_s": round(time.perf_counter() - started, 1),
            "history": history[:: max(1, args.steps // 50)] + history[-1:],
        },
        "heldout": heldout
        | {
            "uniform_perplexity": len(tokenizer),
            "bytes": heldout_bytes,
            "bits_per_byte": heldout["loss"] * heldout["tokens"] / math.log(2) / heldout_bytes,
        },
    }
    _write_checkpoint(out, model, tokenizer, info)
    state_path.unlink(missing_ok=True)
    state_path.with_suffix(".tmp").unlink(missing_ok=True)  # left by a run killed mid-save
    print(json.dumps(info["heldout"]), file=sys.stderr)
    return info


def _resumable(args: argparse.Namespace) -> dict[str, object]:
    """The arguments that must match for a saved state to resume."""
    skip = {"out", "resume", "stdlib", "save_every", "eval_tokens", "dtype"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def _save_state(path: Path, model, optimizer, step: int, history: list, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "history": history}
    torch.save(state | {"args": _resumable(args)}, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous state intact


def _write_checkpoint(out: Path, model, tokenizer, info: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    for path in staging.iterdir():
        os.replace(path, out / path.name)
    staging.rmdir()


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


if __name__ == "__main__":
    main()
