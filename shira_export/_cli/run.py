"""`shira-export run`: generate from a sparse export with one adapter, for a quick look."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="generate text from a sparse export with a chosen adapter (needs a tokenizer in OUT_DIR)",
        description="Open OUT_DIR once and generate a continuation of --prompt with --adapter "
        "(omit it for the base model). Greedy unless --sample.",
    )
    p.add_argument("--graph", required=True, metavar="OUT_DIR", help="folder written by `shira-export sparse`")
    p.add_argument("--adapter", metavar="NAME", help="adapter name from the manifest (default: base model)")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--sample", action="store_true", help="sample (temperature/top-p) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mode",
        choices=("lean", "portable", "dense"),
        default=None,
        help="lean (default): the adapter's arrays fed per call, memory about its file; "
        "portable: .onnx_adapter via RunOptions as plain onnxruntime runs it; "
        "dense: merged copies of the targeted weights per adapter (fp32 graphs)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shira_export.errors import ShiraInputError

    if not args.prompt.strip():
        raise ShiraInputError("--prompt: empty; give the text to continue")
    if args.max_new_tokens < 1:
        raise ShiraInputError(f"--max-new-tokens: expected an integer >= 1, found {args.max_new_tokens}")
    if not args.temperature > 0 or not 0 < args.top_p <= 1:
        raise ShiraInputError(
            f"--temperature must be > 0 and --top-p in (0, 1], found {args.temperature}, {args.top_p}"
        )
    import torch

    from shira_export.runtime import ShiraORTModelForCausalLM

    tokenizer = _tokenizer(Path(args.graph))
    adapters = [args.adapter] if args.adapter else []
    model = ShiraORTModelForCausalLM(args.graph, mode=args.mode, adapters=adapters)
    enc = tokenizer(args.prompt, return_tensors="np")
    length = int(enc["input_ids"].shape[1])
    if length == 0:
        raise ShiraInputError(f"--prompt {args.prompt!r}: the tokenizer gives no tokens for it")
    positions = _positions(model.config)
    if positions is not None and length + args.max_new_tokens > positions:
        raise ShiraInputError(
            f"--max-new-tokens {args.max_new_tokens}: the prompt has {length} tokens and the model "
            f"{positions} positions; at most {max(positions - length, 0)} new tokens fit"
        )
    out = model.generate(
        enc["input_ids"],
        enc["attention_mask"],
        adapter=args.adapter,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


def _tokenizer(folder):
    from shira_export.errors import ShiraInputError

    hint = "copy the base model's tokenizer into the folder to use `run`"
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ShiraInputError(f"{folder}: no tokenizer files ({hint})")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # transformers' errors for incomplete tokenizer files
        raise ShiraInputError(
            f"{folder}: the tokenizer files do not load ({hint}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"
        ) from None


def _positions(config) -> "int | None":
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None
