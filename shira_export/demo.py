"""The main job on an embedded default: train two SHiRA adapters on built-in data,
export the base graph once with a sparse-delta add, switch between the adapters per
call in onnxruntime, and show that each matches PyTorch."""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from shira_export._io import atomic_write_text
from shira_export.errors import ShiraInputError
from shira_export.demo_data import TASKS, build_base_model, task_batches
from shira_export.tuner.config import ShiraConfig
from shira_export.tuner.model import ShiraModel, get_shira_model
from shira_export.training import train_adapter

DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPTS = {"poet": "the river", "engineer": "the service"}


@dataclass
class DemoResult:
    output_dir: Path
    base_dir: Path
    adapter_dirs: dict[str, Path]
    graph_dir: Path
    parity_path: Optional[Path]
    passed: bool
    generations: dict[str, dict[str, str]]
    switch_ms: float


def _peft_check(base, adapter_dir: Path, batch) -> Optional[float]:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
        ours = ShiraModel.from_pretrained(copy.deepcopy(base), adapter_dir)
        with torch.no_grad():
            return (theirs(**batch).logits - ours(**batch).logits).abs().max().item()


def run_demo(
    output_dir: Union[str, os.PathLike],
    *,
    steps: int = 60,
    r: int = 8,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train, export, switch and verify into `output_dir` (new or empty, or any with
    `overwrite`); bad options are refused before anything is written, and a run that fails
    removes the folder it created."""
    for option, value in (("steps", steps), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ShiraInputError(f"{option}: expected an integer >= 1, found {value!r}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ShiraInputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ShiraInputError(f"{out}: output folder exists and is not empty (pass --overwrite)")
    created, empty = not out.exists(), not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(out, steps=steps, r=r, log=log)
    except BaseException:
        if created:  # a folder this run created holds only partial results: remove it
            shutil.rmtree(out, ignore_errors=True)
        elif empty:  # an empty folder given to us: empty it again, keep the folder
            for child in out.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        raise


def _run(out: Path, *, steps: int, r: int, log: Callable[[str], None]) -> DemoResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shira_export.pipeline import export_sparse
    from shira_export.runtime import ShiraORTModelForCausalLM

    t0 = time.perf_counter()
    log(f"[1/4] building the embedded base model (OPT-shaped, random weights) in {out / 'base'}")
    base_dir = build_base_model(out / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()

    adapter_dirs: dict[str, Path] = {}
    for i, task in enumerate(TASKS):
        log(f"[2/4] training adapter {task!r} (r={r}, {', '.join(DEMO_TARGETS)}; {steps} steps)")
        torch.manual_seed(i)
        model = get_shira_model(
            copy.deepcopy(base), ShiraConfig(r=r, target_modules=DEMO_TARGETS, random_seed=i, task_type="CAUSAL_LM")
        )
        batch = task_batches(tokenizer, task)
        losses = train_adapter(model, [batch], steps=steps, lr=2e-2, desc=task)
        adapter_dirs[task] = out / "adapters" / task
        model.save_pretrained(adapter_dirs[task])
        diff = _peft_check(base, adapter_dirs[task], batch)
        peft_note = "PEFT not installed" if diff is None else f"reloaded in PEFT: max |diff| {diff:.1e}"
        log(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved {adapter_dirs[task]} ({peft_note})")

    log("[3/4] exporting the base graph once with a sparse-delta add, one .onnx_adapter per adapter")
    graph_dir = out / "onnx"
    result = export_sparse(base_dir, adapter_dirs, graph_dir, overwrite=True, verify=True)

    log("[4/4] one onnxruntime session, adapter chosen per call")
    runtime = ShiraORTModelForCausalLM(graph_dir)
    generations: dict[str, dict[str, str]] = {}
    for prompt in PROMPTS.values():
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        row = {}
        for adapter in [None, *adapter_dirs]:
            tokens = runtime.generate(ids, adapter=adapter, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
            row[adapter or "(base)"] = str(text).strip()
        generations[prompt] = row
    ids = tokenizer("the river", return_tensors="pt")["input_ids"]
    names = list(adapter_dirs)
    times = []
    for i in range(20):
        start = time.perf_counter()
        runtime.forward(ids, adapter=names[i % 2])
        times.append(time.perf_counter() - start)
    switch_ms = statistics.median(times) * 1e3
    for prompt, row in generations.items():
        log(f"  prompt {prompt!r}:")
        for adapter, text in row.items():
            log(f"    {adapter:>10}: {text!r}")
    log(f"  alternating adapters per call: median {switch_ms:.2f} ms per forward call (adapter switch included)")
    passed = result.passed
    verdict = "PASS" if passed else "FAIL"
    log(f"parity vs PyTorch (each adapter merged, and the base): {verdict} -> {result.parity_path}")
    log(f"artifacts: graph {result.model_path}; adapters {', '.join(str(p) for p in result.adapter_paths.values())}")
    log(f"done in {time.perf_counter() - t0:.0f} s")
    summary = "\n".join(f"{p}: " + "; ".join(f"{a}={t!r}" for a, t in row.items()) for p, row in generations.items())
    atomic_write_text(out / "demo_generations.txt", summary + "\n")
    return DemoResult(out, base_dir, adapter_dirs, graph_dir, result.parity_path, passed, generations, switch_ms)
