"""Training works with a plain loop and with transformers.Trainer (the loss falls)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.demo_data import build_base_model, task_batches
from shira_export.training import train_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base"), hidden=32)


def test_plain_loop_loss_falls_and_reloads(demo_base, tmp_path):
    tok = AutoTokenizer.from_pretrained(demo_base)
    model = get_shira_model(
        AutoModelForCausalLM.from_pretrained(demo_base),
        ShiraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    )
    losses = train_adapter(model, [task_batches(tok, "poet")], steps=25, lr=5e-2, progress=False)
    assert losses[-1] < losses[0] - 0.3
    model.save_pretrained(tmp_path)
    back = ShiraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_base), tmp_path)
    batch = task_batches(tok, "poet")
    assert abs(float(back(**batch).loss) - float(model(**batch).loss)) < 1e-5


def test_hf_trainer_trains_the_adapter(demo_base, tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(demo_base)
    model = get_shira_model(
        AutoModelForCausalLM.from_pretrained(demo_base),
        ShiraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    )
    batch = task_batches(tok, "engineer")
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=20,
        per_device_train_batch_size=len(rows),
        learning_rate=5e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    before = float(model(**batch).loss)
    Trainer(model=model, args=args, train_dataset=rows).train()  # default remove_unused_columns=True
    model.eval()
    assert float(model(**batch).loss) < before - 0.3


def test_example_script_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_causal_lm.py"), "--out", str(tmp_path), "--steps", "15"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first, last = (float(x) for x in out.stdout.split("loss: first ")[1].split("\n")[0].split(" -> last "))
    assert last < first
    assert "reloaded here: max |diff| = 0.00e+00" in out.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
