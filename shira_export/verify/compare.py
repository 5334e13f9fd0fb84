"""One adapter's checks: every output of the candidate against the PyTorch reference over
the input batches, judged by the profile's rules (`verify.api` runs this per adapter)."""

from __future__ import annotations

import math
from typing import Mapping, Optional

from shira_export.artifacts.tasks import Family
from shira_export.errors import ShiraInputError, candidate_errors
from shira_export.verify.metrics import OutputDiff, greedy_prefix_lengths
from shira_export.verify.profiles import RULES, Profile
from shira_export.verify.report import CheckRecord, format_value

__all__ = ["compare_adapter", "short_error"]


def compare_adapter(prof, spec, reference, runner, entry, batches, bar):
    name = entry.name
    variants = runner.variants
    # candidate output name -> (reference output name, accumulated diff); the task table says
    # which outputs and how (hidden states are also judged as sentence embeddings: pooled)
    diffs = {
        out + v: (out, OutputDiff(out + v, argmax, pooled=spec.pooled))
        for v in variants
        for out, argmax in spec.outputs.items()
    }
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
            except (
                candidate_errors()
            ) as exc:  # a candidate that cannot run at a valid shape fails parity (a bug propagates)
                run_errors.append(f"{batch.name} {batch.shape}: {type(exc).__name__}: {short_error(exc)}")
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
            run_errors.append(f"{batch.name} {batch.shape} generate: {type(exc).__name__}: {short_error(exc)}")
            continue
        for v, tokens in cand_tokens.items():
            lengths = greedy_prefix_lengths(ref_tokens, tokens)
            greedy[v][batch.name] = lengths
            for row, k in enumerate(lengths):
                if k < prof.greedy_tokens and v not in divergence:
                    got = int(tokens[row, k]) if k < tokens.shape[1] else None
                    divergence[v] = (batch.name, row, k, int(ref_tokens[row, k]), got)

    all_inputs = [b.name for b in batches]
    records = [
        _judge(
            prof,
            CheckRecord(
                name, "(run)", "run_errors", float(len(run_errors)), inputs=all_inputs, details={"errors": run_errors}
            ),
            fixed=0.0,
            what="candidate runs on every input without error",
            extra="; ".join(run_errors[:2]),
        )
    ]
    for key, (_, diff) in diffs.items():
        records.append(
            _judge(
                prof,
                CheckRecord(
                    name,
                    key,
                    "shape_mismatch",
                    float(len(shape_errors[key])),
                    inputs=all_inputs,
                    details={"errors": shape_errors[key]},
                ),
                fixed=0.0,
                what=f"{key} shapes equal the reference's",
                extra="; ".join(shape_errors[key][:3]),
            )
        )
        details = diff.details()
        if not details["max_abs_per_input"]:
            continue  # nothing compared: run_errors / shape_mismatch already fail
        for metric, value in diff.metrics().items():
            records.append(
                _judge(
                    prof,
                    CheckRecord(name, key, metric, value, inputs=list(details["max_abs_per_input"]), details=details),
                )
            )
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
        for metric, value in (
            ("greedy_prefix", ratio),
            ("greedy_prefix_mean", sum(rows) / len(rows) / prof.greedy_tokens),
        ):
            records.append(
                _judge(
                    prof,
                    CheckRecord(name, "generate" + v, metric, value, inputs=list(per_input), details=details),
                    extra=where,
                )
            )
    compared = {key: diff for key, (_, diff) in diffs.items() if diff.details()["max_abs_per_input"]}
    return records, compared


def _check_finite(ref_out: Mapping[str, object], name: str, batch) -> None:
    """A reference that is not finite cannot judge anything: the base model or the adapter
    (values near the float32 limit, say) is the problem, not the export."""
    import numpy as np

    bad = sorted(k for k, v in ref_out.items() if not np.isfinite(np.asarray(v)).all())
    if bad:
        raise ShiraInputError(
            f"[{name}] the PyTorch reference gives NaN/Inf in {bad} on input {batch.name}: the "
            f"base model with this adapter overflows (check the adapter's values); nothing to "
            f"compare the export with"
        )


def _judge(
    prof: Profile, r: CheckRecord, *, fixed: Optional[float] = None, what: str = "", extra: str = ""
) -> CheckRecord:
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
            tail = (
                f"worst at input {worst['input']} index {worst['index']}: reference {worst['reference']:.6g} "
                f"vs candidate {worst['candidate']:.6g}"
            )
        r.message = (
            f"[{r.adapter}] {subject}: {r.metric} = {format_value(value)}, rule {r.op} "
            f"{format_value(r.threshold)}, {miss}" + (f" ({tail})" if tail else "")
        )
    return r


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
