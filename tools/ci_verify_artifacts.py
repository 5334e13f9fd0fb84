"""Build small real artifacts for CI's `shira-export verify` step (tools/ci_verify.sh).

    python tools/ci_verify_artifacts.py WORK_DIR

Writes tiny seeded base models, SHiRA adapters, and the project's own exports of them
(merged ONNX, merged safetensors, sparse ONNX with two adapters, a merged BERT encoder),
plus `WORK_DIR/prompts.txt` and `WORK_DIR/plan.tsv`: one line per artifact,
`name<TAB>model dir<TAB>candidate dir<TAB>inputs file or ->`.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch


def _tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def _adapter(model, folder: Path, targets: list[str], seed: int) -> None:
    from shira_export import ShiraConfig, get_shira_model

    shira = get_shira_model(model, ShiraConfig(r=4, target_modules=targets, init_weights=False, random_seed=seed))
    shira.save_pretrained(folder)


def build(work: Path) -> list[tuple[str, Path, Path, str]]:
    from transformers import BertConfig, BertModel, OPTConfig, OPTForCausalLM

    from shira_export.pipeline import export_merged
    from shira_export.pipeline import export_sparse

    work.mkdir(parents=True, exist_ok=True)
    opt_cfg = OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        vocab_size=128,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    )
    torch.manual_seed(0)
    OPTForCausalLM(opt_cfg).save_pretrained(work / "opt")
    _tokenizer(work / "opt", 128)
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(0)
        _adapter(OPTForCausalLM(opt_cfg), work / f"opt-adapter-{name}", ["q_proj", "v_proj"], seed)
    bert_cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(bert_cfg).save_pretrained(work / "bert")
    torch.manual_seed(0)
    _adapter(BertModel(bert_cfg), work / "bert-adapter", ["query", "value"], 3)
    (work / "prompts.txt").write_text("w5 w9 w13 w2\nw100 w7 w7 w7 w2 w64 w3\nw1\n")

    prompts = str(work / "prompts.txt")
    export_merged(work / "opt", work / "opt-adapter-a", work / "merged-onnx", verify=False)
    export_merged(work / "opt", work / "opt-adapter-a", work / "merged-safetensors", format="safetensors", verify=False)
    export_sparse(
        work / "opt", {"a": work / "opt-adapter-a", "b": work / "opt-adapter-b"}, work / "sparse", verify=False
    )
    export_merged(work / "bert", work / "bert-adapter", work / "bert-merged-onnx", verify=False)
    return [
        ("merged-onnx", work / "opt", work / "merged-onnx", prompts),
        ("merged-safetensors", work / "opt", work / "merged-safetensors", prompts),
        ("sparse", work / "opt", work / "sparse", prompts),
        ("bert-merged-onnx", work / "bert", work / "bert-merged-onnx", "-"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = build(args.work)
    (args.work / "plan.tsv").write_text("".join(f"{n}\t{m}\t{c}\t{i}\n" for n, m, c, i in plan))
    print(f"built {len(plan)} artifacts in {time.perf_counter() - started:.1f} s under {args.work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
