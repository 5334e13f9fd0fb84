"""Train a SHiRA adapter on a small causal LM built from a config and a built-in
dataset, with a plain torch loop or with transformers.Trainer; save it in PEFT's
layout, reload it (here and, when installed, in PEFT) and check the outputs.

    python examples/train_causal_lm.py --out /tmp/shira-example [--trainer] [--steps 60]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.demo_data import build_base_model, task_batches
from shira_export.training import train_adapter


def train_with_hf_trainer(model, batch, steps: int, lr: float, workdir: Path) -> list[float]:
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=len(rows),
        learning_rate=lr,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    model.eval()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="shira-example-")))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--trainer", action="store_true", help="train with transformers.Trainer")
    args = parser.parse_args()

    base_dir = build_base_model(args.out / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_shira_model(
        copy.deepcopy(base),
        ShiraConfig(
            r=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], task_type="CAUSAL_LM"
        ),
    )
    model.print_trainable_parameters()
    batch = task_batches(tokenizer, "poet")
    if args.trainer:
        losses = train_with_hf_trainer(model, batch, args.steps, args.lr, args.out)
    else:
        losses = train_adapter(model, [batch], steps=args.steps, lr=args.lr)
    print(f"loss: first {losses[0]:.3f} -> last {losses[-1]:.3f}")
    adapter_dir = args.out / "adapter"
    model.save_pretrained(adapter_dir)

    probe = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours = model(**probe).logits
        reloaded = ShiraModel.from_pretrained(copy.deepcopy(base), adapter_dir)(**probe).logits
    print(f"reloaded here: max |diff| = {(ours - reloaded).abs().max().item():.2e}")
    try:
        from peft import PeftModel
    except ImportError:
        print("peft not installed: skipped the PEFT check")
    else:
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
        with torch.no_grad():
            diff = (theirs(**probe).logits - ours).abs().max().item()
        print(f"reloaded in PEFT: max |diff| = {diff:.2e} ({'OK' if diff <= 1e-5 else 'MISMATCH'})")
    print(f"adapter saved to {adapter_dir}")


if __name__ == "__main__":
    main()
