#!/usr/bin/env bash
# CI step: build small real artifacts with the project's exporters, run `shira-export verify`
# on each, keep every report under ci-reports/ (or $CI_REPORTS), print the Markdown summary
# (and append it to $GITHUB_STEP_SUMMARY when set). Exit: 0 all pass, 1 a parity failure,
# 2 a usage/input error (the worst of all runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${CI_REPORTS:-ci-reports}"
rm -rf "$OUT"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

python tools/ci_verify_artifacts.py "$WORK" || { echo "ci_verify: building artifacts failed" >&2; exit 2; }

worst=0
while IFS=$'\t' read -r name model candidate inputs; do
  dir="$OUT/$name"
  mkdir -p "$dir"
  args=(verify --model "$model" --candidate "$candidate" --report-dir "$dir"
        --junit "$dir/junit.xml" --markdown "$dir/summary.md" --plot --quiet)
  [ "$inputs" != "-" ] && args+=(--inputs "$inputs")
  python -m shira_export.cli "${args[@]}" > "$dir/stdout.txt" 2> "$dir/stderr.txt"
  rc=$?
  echo "ci_verify: $name -> exit $rc" >&2
  if [ "$rc" -ne 0 ]; then
    cat "$dir/stdout.txt" "$dir/stderr.txt" >&2
    # 2 (usage/input error) outranks 1 (parity failure); anything else counts as 2
    if [ "$rc" -eq 1 ] && [ "$worst" -lt 1 ]; then worst=1; elif [ "$rc" -ne 1 ]; then worst=2; fi
  fi
done < "$WORK/plan.tsv"

{
  echo "# shira-export verify: CI artifacts"
  echo
  for summary in "$OUT"/*/summary.md; do
    # one heading level down so the artifacts nest under this page's title
    sed -e 's/^## /## ['"$(basename "$(dirname "$summary")")"'] /' "$summary"
    echo
  done
} > "$OUT/summary.md"
cat "$OUT/summary.md"
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  cat "$OUT/summary.md" >> "$GITHUB_STEP_SUMMARY"
fi
echo "ci_verify: reports in $OUT/ (exit $worst)" >&2
exit "$worst"
