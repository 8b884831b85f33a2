#!/usr/bin/env bash
# Run sciris' and scinexus' own parallel tests against shoal's adapters (by hand; needs network).
#
#   scripts/upstream_compat_tests.sh [python]
#
# Downloads the sdists of the installed versions into a temporary folder, then runs
# sciris' tests/test_parallel.py with sciris.parallelize replaced by
# shoal.compat.sciris.parallelize, and scinexus' tests/test_parallel.py with ShoalParallel set
# as the default backend (scripts/upstream/conftest_*.py do the replacing).
# Not part of `make test`: it needs PyPI, which CI may not reach. scinexus' tests of its own loky
# backend need `pip install loky` (they do not touch shoal); extra arguments go to pytest.
set -euo pipefail
PY=${1:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, without leaving the venv
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for pkg in sciris scinexus; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
    "$PY" -m pip download --quiet --no-binary :all: --no-deps -d "$WORK" "$pkg==$version"
    tar xzf "$WORK/$pkg-$version.tar.gz" -C "$WORK"
    cp "$ROOT/scripts/upstream/conftest_$pkg.py" "$WORK/$pkg-$version/tests/conftest_shoal.py"
done
status=0
echo "== sciris tests/test_parallel.py with sc.parallelize = shoal.compat.sciris.parallelize"
(cd "$WORK"/sciris-*/tests && timeout 900 "$PY" -m pytest -p conftest_shoal test_parallel.py \
    -q -p no:cacheprovider -o addopts="" -o timeout=300 "$@") || status=1
echo "== scinexus tests/test_parallel.py with ShoalParallel() as the default backend"
(cd "$WORK"/scinexus-*/tests && timeout 900 "$PY" -m pytest -p conftest_shoal test_parallel.py \
    -q -p no:cacheprovider -o addopts="" -o timeout=300 "$@") || status=1
exit $status
