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
    p.add_argument("--mode", choices=("dense", "portable"), default=None,
                   help="dense: merged weights per adapter (fast, the default for fp32 graphs); "
                        "portable: .onnx_adapter via RunOptions (the default for quantized graphs)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from shira_export.errors import ShiraInputError
    from shira_export.runtime import ShiraORTModelForCausalLM

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.graph, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ShiraInputError(f"{Path(args.graph)}: no tokenizer files (copy the base model's tokenizer "
                              f"into the folder to use `run`): {exc}") from None
    adapters = [args.adapter] if args.adapter else []
    model = ShiraORTModelForCausalLM(args.graph, mode=args.mode, adapters=adapters)
    enc = tokenizer(args.prompt, return_tensors="np")
    out = model.generate(enc["input_ids"], enc["attention_mask"], adapter=args.adapter,
                         max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                         top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0
