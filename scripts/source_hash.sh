#!/usr/bin/env bash
# sha256 of everything the compiled extension is built from (csrc/, setup.py), in a fixed order:
# tells whether a pre-built fusedrnn._C (.prebuilt/) matches a checkout.   scripts/source_hash.sh [ROOT]
set -euo pipefail
cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}"
{ find csrc -type f | LC_ALL=C sort; echo setup.py; } | while read -r f; do echo "== $f"; cat "$f"; done | sha256sum | cut -d' ' -f1
