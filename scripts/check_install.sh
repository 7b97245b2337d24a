#!/usr/bin/env bash
# CI: install this checkout as a user does (README, Install) into a fresh venv, non-editable, and
# run a forward and backward through fusedrnn.convert from the installed copy.
#
# The fresh venv sees torch, numpy, triton, setuptools... of ./.venv (built by scripts/test.sh)
# through a .pth file pointing at a directory of links to ./.venv's site-packages, fusedrnn's own
# entries left out: installing torch again would copy 5.5 GB for nothing, and pip still resolves
# the dependencies as a user's pip does (it finds them installed).  The install runs with
# FUSEDRNN_SKIP_BUILD=1: compiling the extension a second time (4-6 min for CUDA on 2 cores) would
# check nothing the editable build of scripts/test.sh does not; this check is about packaging
# (package files, metadata, dependency resolution, import from site-packages, no checkout on the
# path) and about the pure-Python backends working from an installed copy.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="$ROOT/.venv/bin/python"
if [ ! -x "$VPY" ]; then
  echo "[install-check] $VPY missing: run scripts/test.sh first" >&2
  exit 1
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

# the sources as a fresh clone has them (tracked files only: no build/, no in-place _C*.so)
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"

BASE_PY="$("$VPY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"
"$BASE_PY" -m venv "$WORK/venv"
FRESH="$WORK/venv/bin/python"
DEPS_SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
FRESH_SITE="$("$FRESH" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir "$WORK/deps"
for entry in "$DEPS_SITE"/*; do
  case "$(basename "$entry")" in
    *fusedrnn*|__editable__*) ;;  # the editable install of the checkout: not a dependency
    *) ln -s "$entry" "$WORK/deps/" ;;
  esac
done
echo "$WORK/deps" > "$FRESH_SITE/_fusedrnn_ci_dependencies.pth"

echo "[install-check] pip install --no-build-isolation . (FUSEDRNN_SKIP_BUILD=1) into a fresh venv"
(cd "$WORK" && FUSEDRNN_SKIP_BUILD=1 "$FRESH" -m pip install -q --no-build-isolation --no-input "$WORK/src")

# TRITON_INTERPRET=1: the installed Triton kernels run on CPU too (the interpreter, as in the tests)
(cd "$WORK" && TRITON_INTERPRET=1 "$FRESH" - <<'EOF'
import os
import sys

import torch
from torch import nn

import fusedrnn

where = os.path.realpath(fusedrnn.__file__)
assert where.startswith(os.path.realpath(sys.prefix)), f"fusedrnn imported from {where}, not the fresh venv"
print("[install-check] fusedrnn", fusedrnn.__version__, "from", os.path.dirname(where))
print("[install-check] backends:", {k: (v or "ok") for k, v in fusedrnn.available_backends().items()})

import fusedrnn.bench  # noqa: F401  (the benchmark harness is part of the package)

for backend in ("reference", "triton"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4, num_layers=2, bidirectional=True), nn.GRU(8, 2)).double()
    reference = nn.Sequential(nn.LSTM(3, 4, num_layers=2, bidirectional=True), nn.GRU(8, 2)).double()
    reference.load_state_dict(model.state_dict())
    fusedrnn.convert(model, backend=backend)
    assert type(model[0]) is fusedrnn.LSTM and type(model[1]) is fusedrnn.GRU

    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for m in (model, reference):
        y, _ = m[0](x)
        out, h = m[1](y)
        (out.sin().sum() + h.square().sum()).backward()
        grads.append([x.grad.clone()] + [p.grad for p in m.parameters()])
        x.grad = None
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(*grads))
    assert worst < 1e-10, (backend, worst)
    print(f"[install-check] {backend}: forward + backward through convert, max rel err vs torch.nn {worst:.1e}")
EOF
)
echo "[install-check] ok in $(( $(date +%s) - start )) s"
