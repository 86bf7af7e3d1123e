#!/usr/bin/env bash
# Builds the C engine with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy of the
# repository and runs the tests that reach C there (the whole suite by default; pass pytest
# arguments to choose). Any sanitizer report fails the run: UBSan halts on the first error, ASan
# aborts, and every report is also written under the scratch folder and counted at the end.
#
#   tests/sanitize.sh                 # whole suite
#   tests/sanitize.sh tests/test_hostile_inputs.py tests/test_fuzz.py
#
# Python itself is not instrumented, so the sanitizer runtimes are preloaded (LD_PRELOAD) and leak
# detection is off (the interpreter keeps its allocations until exit by design).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d "${TMPDIR:-/tmp}/visualad-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# the repository's files (tracked and new, not ignored ones: never the normal build's .so)
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src"
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
if [ ! -e "$LIBASAN" ] || [ ! -e "$LIBUBSAN" ]; then
    echo "gcc's sanitizer runtimes (libasan, libubsan) are not installed" >&2
    exit 1
fi

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
(cd "$WORK/src" && CFLAGS="$SAN" LDFLAGS="$SAN" python3 setup.py -q build_ext --inplace 2>&1 \
    | { grep -E "warning:|error:" || true; })

if ! ldd "$WORK"/src/visualad/_engine*.so | grep -q libasan; then
    echo "the engine was not built with AddressSanitizer" >&2
    exit 1
fi
mkdir -p "$WORK/reports"
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$WORK/reports/asan:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/reports/ubsan"
export PYTHONPATH="$WORK/src"
status=0
# from the copy, so that the instrumented build is the one imported
(cd "$WORK/src" && python3 -m pytest -q -p no:cacheprovider "${@:-tests}") || status=$?
unset LD_PRELOAD
reports=$(find "$WORK/reports" -type f | wc -l)
for f in $(find "$WORK/reports" -type f); do echo "== $f"; head -50 "$f"; done
echo "sanitizer reports: $reports"
if [ "$reports" -ne 0 ]; then exit 1; fi
exit "$status"
