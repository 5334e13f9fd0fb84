"""`verify(...)`: compare an export folder with its PyTorch reference and report every check."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from shira_export._io import atomic_write_text
from shira_export.artifacts.hf_folder import load_base_model
from shira_export.artifacts.manifest import AdapterEntry, Kind, Manifest
from shira_export.artifacts.tasks import Family, spec_for
from shira_export.errors import CandidateError, ShiraInputError, candidate_errors
from shira_export.verify.candidates import CandidateRunner, open_candidate, read_manifest
from shira_export.verify.inputs import default_batches, find_tokenizer, load_tokenizer, read_texts, text_batches
from shira_export.verify.metrics import OutputDiff, greedy_prefix_lengths
from shira_export.verify.profiles import RULES, Precision, Profile, get_profile
from shira_export.verify.reference import TorchRunner, merged_reference
from shira_export.verify.report import CheckRecord, VerifyReport, environment, format_value

__all__ = ["verify", "REPORT_NAME", "export_check_settings", "manifest_profile", "EXPORT_GREEDY_TOKENS"]

PathLike = Union[str, os.PathLike]
REPORT_NAME = "parity.json"
BASE_NAME = "base"  # the name under which the model with no adapter is reported
_SMALL_MODEL = 20_000_000  # parameters; below this, torch and ORT run single-threaded
# 32 greedy tokens: long enough for a frozen-shape bug in the KV cache to show; the same at
# export time and in a standalone `verify`, so a folder gets one verdict
EXPORT_GREEDY_TOKENS = 32


def manifest_profile(manifest: Manifest) -> Precision:
    """The profile a folder is judged by: its quantization, else its dtype (fp16), else fp32."""
    if manifest.quantization in ("int8", "int4"):
        return Precision(manifest.quantization)
    return Precision.FP16 if manifest.dtype == "fp16" else Precision.FP32


def export_check_settings(quantization: Optional[str] = None, dtype: str = "fp32") -> tuple[str, dict]:
    """(profile, overrides) of the check an export runs on its own folder; a standalone
    `verify` of that folder without --profile/--set uses exactly these."""
    profile = quantization or ("fp16" if dtype == "fp16" else "fp32")
    return profile, {"greedy_tokens": EXPORT_GREEDY_TOKENS}


@dataclass(frozen=True)
class _Target:
    entry: AdapterEntry  # what the candidate calls it
    source: Optional[Path]  # adapter dir merged into the reference (None: base model)


def verify(
    *,
    model: PathLike,
    adapters: Sequence[PathLike] = (),
    candidate: PathLike,
    profile: Optional[Union[str, Precision]] = None,
    inputs: Optional[PathLike] = None,
    overrides: Optional[Mapping[str, object]] = None,
    report_dir: Optional[PathLike] = None,
    junit: Optional[PathLike] = None,
    markdown: Optional[PathLike] = None,
    progress: bool = True,
    plot: bool = False,
) -> VerifyReport:
    """Run every check of `profile` on `candidate` against `model` + each adapter.

    `profile` None: the one the candidate's manifest implies (manifest_profile), with the
    export-time settings (export_check_settings) unless `overrides` sets them.

    `adapters` overrides the adapter dirs named in the candidate's manifest. Writes
    `report_dir/parity.json`, `junit` and `markdown` when given (and PNG histograms into
    `report_dir` with `plot=True`). Never raises on a parity failure: see `.passed` and
    `.raise_for_failures()`. Bad input raises `ShiraInputError`.
    """
    started = time.perf_counter()
    manifest = read_manifest(candidate)
    if profile is None:
        profile, defaults = export_check_settings(manifest_profile(manifest).value)
        overrides = {**defaults, **(overrides or {})}
    prof = get_profile(profile, overrides)
    targets = _targets(manifest, [Path(a) for a in adapters])
    spec = spec_for(manifest.task)
    causal = spec.family is Family.CAUSAL_LM
    base = load_base_model(model, manifest.task)
    if causal:
        _check_positions(prof, base.config)
    batches = _batches(prof, base.config, manifest.folder, Path(model), inputs, causal)
    # tiny models: one thread each; on busy CPUs thread hand-offs cost 40x the math
    small = sum(p.numel() for p in base.parameters()) < _SMALL_MODEL
    load_errors: tuple[type[BaseException], ...] = (*candidate_errors(), ShiraInputError)
    runner: CandidateRunner
    try:
        runner = open_candidate(manifest, threads=1 if small else None)
    except load_errors as exc:  # an export that does not load fails every check
        runner = _Unloadable(exc)
    with _torch_threads(1 if small else None):
        records, samples = _run_all(prof, spec, base, Path(model), runner, targets, batches, progress)

    report = VerifyReport(
        model=str(model), candidate=str(candidate), kind=manifest.kind.value, task=manifest.task,
        profile=asdict(prof), inputs=[b.describe() for b in batches], records=records,
        adapters=[{"name": t.entry.name, "source": str(t.source) if t.source else None} for t in targets],
        environment=environment(), manifest=manifest.raw,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started, samples=samples,
    )
    _write(report, report_dir=report_dir, junit=junit, markdown=markdown, plot=plot)
    return report


class _Unloadable:
    """Stands in for a candidate that failed to load, so each input reports why."""

    variants: tuple[str, ...] = ("",)

    def __init__(self, exc: BaseException) -> None:
        self.message = f"candidate failed to load: {type(exc).__name__}: {_short(exc)}"

    def forward(self, batch, adapter):
        raise CandidateError(self.message)

    def generate(self, batch, n_tokens, adapter):  # generate-only batches reach it without a forward first
        raise CandidateError(self.message)


def _run_all(prof, spec, base, model_dir, runner, targets, batches, progress):
    from tqdm.auto import tqdm

    records: list[CheckRecord] = []
    samples = {}
    with tqdm(total=len(targets) * len(batches), desc="verify", unit="batch", disable=not progress) as bar:
        for target in targets:
            bar.set_postfix_str(target.entry.name)
            reference = TorchRunner(merged_reference(base, target.source, model_dir=model_dir), spec)
            found, diffs = _compare(prof, spec, reference, runner, target.entry, batches, bar)
            records += found
            samples.update({(target.entry.name, out): diff.abs_sample() for out, diff in diffs.items()})
    return records, samples


@contextmanager
def _torch_threads(n: Optional[int]):
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _targets(manifest: Manifest, adapters: list[Path]) -> list[_Target]:
    """Pair each adapter the candidate holds with the adapter dir its reference merges."""
    for a in adapters:
        if not a.is_dir():
            raise ShiraInputError(f"{a}: --adapter must be an adapter folder (not found)")
    entries = manifest.adapter_entries
    if manifest.kind is Kind.MERGED:
        entry = entries[0]
        if len(adapters) > 1:
            raise ShiraInputError(f"{manifest.folder}: a merged export holds one adapter, {len(adapters)} --adapter dirs given")
        if adapters:
            return [_Target(entry, adapters[0])]
        return [_Target(entry, _source(manifest, entry))]
    targets = []
    unused = list(adapters)
    for entry in entries:
        match = next((a for a in unused if _same(a, entry.source) or a.name == entry.name), None)
        if match is not None:
            unused.remove(match)
        targets.append(_Target(entry, match or _source(manifest, entry)))
    if unused:
        raise ShiraInputError(
            f"--adapter {[str(a) for a in unused]}: no adapter of {manifest.folder} matches (by source path or "
            f"folder name); its adapters are {[e.name for e in entries]}"
        )
    base_name = BASE_NAME if all(e.name != BASE_NAME for e in entries) else f"{BASE_NAME}-model"
    return targets + [_Target(AdapterEntry(base_name, None), None)]


def _source(manifest: Manifest, entry: AdapterEntry) -> Optional[Path]:
    if entry.source is None:
        return None
    for path in (Path(entry.source), manifest.folder / entry.source):
        if path.is_dir():
            return path
    raise ShiraInputError(
        f"{manifest.folder}: adapter {entry.name!r} was built from {entry.source!r}, which is not found; "
        "pass its folder with --adapter"
    )


def _same(a: Path, b: Optional[str]) -> bool:
    return b is not None and Path(b).is_dir() and a.resolve() == Path(b).resolve()


def _check_positions(prof: Profile, config) -> None:
    n_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(n_pos, int) and prof.greedy_tokens > n_pos - 3:
        raise ShiraInputError(f"greedy_tokens={prof.greedy_tokens}: the model has {n_pos} positions; a prompt plus "
                              f"the greedy tokens must fit, so at most {max(n_pos - 3, 0)}")


def _batches(prof: Profile, config, candidate: Path, model: Path, inputs: Optional[PathLike], causal: bool):
    n_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    max_length = max(1, n_pos - prof.greedy_tokens - 2) if causal else n_pos
    batches = default_batches(config.vocab_size, seed=prof.seed, max_length=max_length, causal=causal,
                              tokenizer=find_tokenizer(candidate, model),
                              pad_token_id=getattr(config, "pad_token_id", None), text_limit=prof.builtin_texts)
    if inputs is not None:
        texts = read_texts(inputs, limit=prof.max_texts)
        tokenizer = load_tokenizer(candidate, model)
        batches += text_batches(texts, tokenizer, source=str(inputs), max_length=min(max_length, 256),
                                vocab_size=config.vocab_size)
    return batches


def _compare(prof, spec, reference, runner, entry, batches, bar):
    name = entry.name
    variants = runner.variants
    # candidate output name -> (reference output name, accumulated diff); the task table says
    # which outputs and how (hidden states are also judged as sentence embeddings: pooled)
    diffs = {out + v: (out, OutputDiff(out + v, argmax, pooled=spec.pooled))
             for v in variants for out, argmax in spec.outputs.items()}
    shape_errors: dict[str, list[str]] = {key: [] for key in diffs}
    run_errors: list[str] = []
    greedy: dict[str, dict[str, list[int]]] = {v: {} for v in variants}
    divergence: dict[str, tuple] = {}
    causal = spec.family is Family.CAUSAL_LM and prof.greedy_tokens > 0
    for batch in batches:
        bar.update()
        if batch.forward:
            ref_out = reference.forward(batch)
            _check_finite(ref_out, name, batch)
            try:
                cand_out = runner.forward(batch, entry)
            except candidate_errors() as exc:  # a candidate that cannot run at a valid shape fails parity (a bug propagates)
                run_errors.append(f"{batch.name} {batch.shape}: {type(exc).__name__}: {_short(exc)}")
                continue
            mask = batch.attention_mask.numpy() if batch.padded else None
            for key, (out, diff) in diffs.items():
                got = cand_out.get(key)
                if got is None or got.shape != ref_out[out].shape:
                    found = "missing" if got is None else list(got.shape)
                    shape_errors[key].append(f"{batch.name}: expected {list(ref_out[out].shape)}, found {found}")
                else:  # padded positions are not compared; per-row outputs (classifier logits) have none
                    diff.add(batch.name, ref_out[out], got, mask=mask if mask is not None and got.ndim == 3 else None)
        if not causal or not batch.generate:
            continue
        ref_tokens = reference.generate(batch, prof.greedy_tokens)
        try:
            cand_tokens = runner.generate(batch, prof.greedy_tokens, entry)
        except candidate_errors() as exc:
            run_errors.append(f"{batch.name} {batch.shape} generate: {type(exc).__name__}: {_short(exc)}")
            continue
        for v, tokens in cand_tokens.items():
            lengths = greedy_prefix_lengths(ref_tokens, tokens)
            greedy[v][batch.name] = lengths
            for row, k in enumerate(lengths):
                if k < prof.greedy_tokens and v not in divergence:
                    got = int(tokens[row, k]) if k < tokens.shape[1] else None
                    divergence[v] = (batch.name, row, k, int(ref_tokens[row, k]), got)

    all_inputs = [b.name for b in batches]
    records = [_judge(prof, CheckRecord(
        name, "(run)", "run_errors", float(len(run_errors)), inputs=all_inputs, details={"errors": run_errors}),
        fixed=0.0, what="candidate runs on every input without error", extra="; ".join(run_errors[:2]))]
    for key, (_, diff) in diffs.items():
        records.append(_judge(prof, CheckRecord(
            name, key, "shape_mismatch", float(len(shape_errors[key])), inputs=all_inputs,
            details={"errors": shape_errors[key]}), fixed=0.0, what=f"{key} shapes equal the reference's",
            extra="; ".join(shape_errors[key][:3])))
        details = diff.details()
        if not details["max_abs_per_input"]:
            continue  # nothing compared: run_errors / shape_mismatch already fail
        for metric, value in diff.metrics().items():
            records.append(_judge(prof, CheckRecord(name, key, metric, value, inputs=list(details["max_abs_per_input"]),
                                                    details=details)))
    for v, per_input in greedy.items():
        if not per_input:
            continue
        ratio = min(min(lengths) for lengths in per_input.values()) / prof.greedy_tokens
        where = ""
        if v in divergence:
            b, row, k, rt, ct = divergence[v]
            where = f"first divergence: input {b} row {row} token {k}: reference {rt} vs candidate {ct}"
        rows = [k for lengths in per_input.values() for k in lengths]
        details = {"greedy_tokens": prof.greedy_tokens, "prefix_lengths": per_input}
        for metric, value in (("greedy_prefix", ratio), ("greedy_prefix_mean", sum(rows) / len(rows) / prof.greedy_tokens)):
            records.append(_judge(prof, CheckRecord(name, "generate" + v, metric, value, inputs=list(per_input),
                                                    details=details), extra=where))
    compared = {key: diff for key, (_, diff) in diffs.items() if diff.details()["max_abs_per_input"]}
    return records, compared


def _check_finite(ref_out: Mapping[str, object], name: str, batch) -> None:
    """A reference that is not finite cannot judge anything: the base model or the adapter
    (values near the float32 limit, say) is the problem, not the export."""
    import numpy as np

    bad = sorted(k for k, v in ref_out.items() if not np.isfinite(np.asarray(v)).all())
    if bad:
        raise ShiraInputError(f"[{name}] the PyTorch reference gives NaN/Inf in {bad} on input {batch.name}: the "
                              f"base model with this adapter overflows (check the adapter's values); nothing to "
                              f"compare the export with")


def _judge(prof: Profile, r: CheckRecord, *, fixed: Optional[float] = None, what: str = "", extra: str = "") -> CheckRecord:
    """Fill threshold/op/passed/message from the profile (or a fixed `<= fixed` rule)."""
    if fixed is not None:
        r.threshold, r.op = fixed, "<="
    elif r.metric in RULES:
        field_name, op = RULES[r.metric]
        r.threshold, r.op = getattr(prof, field_name), op
        if r.threshold is None:
            r.op = None
    if r.op is None:
        return r
    value = r.value if r.value is not None else math.nan
    threshold = float(r.threshold) if r.threshold is not None else math.nan  # op is set only with a threshold
    r.passed = bool(value <= threshold) if r.op == "<=" else bool(value >= threshold)
    if not r.passed:
        miss = "not a number" if math.isnan(value) else f"missed by {format_value(abs(value - threshold))}"
        subject = what or f"{r.output} {r.metric} of candidate vs PyTorch reference over {len(r.inputs)} input(s)"
        worst = r.details.get("worst") if r.metric == "max_abs" else None
        tail = extra
        if worst:
            tail = (f"worst at input {worst['input']} index {worst['index']}: reference {worst['reference']:.6g} "
                    f"vs candidate {worst['candidate']:.6g}")
        r.message = (f"[{r.adapter}] {subject}: {r.metric} = {format_value(value)}, rule {r.op} "
                     f"{format_value(r.threshold)}, {miss}" + (f" ({tail})" if tail else ""))
    return r


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write(report: VerifyReport, *, report_dir, junit, markdown, plot: bool) -> None:
    if report_dir is not None:
        report.write_json(Path(report_dir) / REPORT_NAME)
        if plot:
            from shira_export.verify.plot import write_histograms

            write_histograms(report, report_dir)
    if junit is not None:
        atomic_write_text(junit, report.to_junit())
    if markdown is not None:
        atomic_write_text(markdown, report.to_markdown())
