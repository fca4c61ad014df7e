#!/usr/bin/env bash
# Compare every `dsv4 verify` report in a folder with the CPU reference (DIR/cpu.json), check by check.
# Usage: ci/compare_reports.sh DIR. Exits non-zero if any report differs, or if there is nothing to compare.
set -uo pipefail

dir="${1:?usage: $0 DIR (a folder holding cpu.json and other verify reports)}"
dsv4="${DSV4:-dsv4}"
reference="$dir/cpu.json"
[[ -f "$reference" ]] || { echo "error: no CPU reference report $reference" >&2; exit 2; }

compared=0
failed=()
for report in "$dir"/*.json; do
    [[ "$report" == "$reference" ]] && continue
    compared=$((compared + 1))
    "$dsv4" compare "$reference" "$report" || failed+=("$(basename "$report")")
done

if ((compared == 0)); then
    echo "error: no report besides cpu.json in $dir" >&2
    exit 2
fi
if ((${#failed[@]})); then
    echo "differ from the CPU reference: ${failed[*]}" >&2
    exit 1
fi
echo "all $compared report(s) agree with the CPU reference"
