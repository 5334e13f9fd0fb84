"""`verify(...)`: compare an export folder with its PyTorch reference and report every check."""

from __future__ import annotations

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
from shira_export.verify.compare import compare_adapter, short_error
from shira_export.verify.candidates import CandidateRunner, open_candidate, read_manifest
from shira_export.verify.inputs import default_batches, find_tokenizer, load_tokenizer, read_texts, text_batches
from shira_export.verify.profiles import Precision, Profile, get_profile
from shira_export.verify.reference import TorchRunner, merged_reference
from shira_export.verify.report import CheckRecord, VerifyReport, environment

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
        model=str(model),
        candidate=str(candidate),
        kind=manifest.kind.value,
        task=manifest.task,
        profile=asdict(prof),
        inputs=[b.describe() for b in batches],
        records=records,
        adapters=[{"name": t.entry.name, "source": str(t.source) if t.source else None} for t in targets],
        environment=environment(),
        manifest=manifest.raw,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started,
        samples=samples,
    )
    _write(report, report_dir=report_dir, junit=junit, markdown=markdown, plot=plot)
    return report


class _Unloadable:
    """Stands in for a candidate that failed to load, so each input reports why."""

    variants: tuple[str, ...] = ("",)

    def __init__(self, exc: BaseException) -> None:
        self.message = f"candidate failed to load: {type(exc).__name__}: {short_error(exc)}"

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
            found, diffs = compare_adapter(prof, spec, reference, runner, target.entry, batches, bar)
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
            raise ShiraInputError(
                f"{manifest.folder}: a merged export holds one adapter, {len(adapters)} --adapter dirs given"
            )
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
        raise ShiraInputError(
            f"greedy_tokens={prof.greedy_tokens}: the model has {n_pos} positions; a prompt plus "
            f"the greedy tokens must fit, so at most {max(n_pos - 3, 0)}"
        )


def _batches(prof: Profile, config, candidate: Path, model: Path, inputs: Optional[PathLike], causal: bool):
    n_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    max_length = max(1, n_pos - prof.greedy_tokens - 2) if causal else n_pos
    batches = default_batches(
        config.vocab_size,
        seed=prof.seed,
        max_length=max_length,
        causal=causal,
        tokenizer=find_tokenizer(candidate, model),
        pad_token_id=getattr(config, "pad_token_id", None),
        text_limit=prof.builtin_texts,
    )
    if inputs is not None:
        texts = read_texts(inputs, limit=prof.max_texts)
        tokenizer = load_tokenizer(candidate, model)
        batches += text_batches(
            texts, tokenizer, source=str(inputs), max_length=min(max_length, 256), vocab_size=config.vocab_size
        )
    return batches


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
