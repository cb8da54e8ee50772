#!/usr/bin/env bash
# The library's public items, as rustdoc lists them (every feature on),
# compared with docs/public-api.txt: a change of the public API is made
# on purpose, by updating that file (`tests/public_api.sh --update`).
set -euo pipefail
cd "$(dirname "$0")/.."
# Broken intra-doc links fail here too.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features -q
listing="$(python3 - <<'PY'
import re
html = open("target/doc/cachecast/all.html", encoding="utf-8").read()
rows = []
for m in re.finditer(r'<h3 id="([a-z-]+)">[^<]*</h3><ul class="all-items">(.*?)</ul>', html, re.S):
    for name in re.findall(r'<a href="[^"]*">([^<]*)</a>', m.group(2)):
        rows.append(f"{m.group(1)} cachecast::{name}")
if not rows:
    raise SystemExit("no items found in target/doc/cachecast/all.html: has rustdoc's page changed?")
print("\n".join(sorted(rows)))
PY
)"
if [ "${1:-}" = "--update" ]; then
  printf '%s\n' "$listing" > docs/public-api.txt
  echo "docs/public-api.txt: $(wc -l < docs/public-api.txt) items"
  exit 0
fi
if ! diff -u docs/public-api.txt <(printf '%s\n' "$listing"); then
  echo "The library's public items differ from docs/public-api.txt (above: - kept, + now)."
  echo "If the change is intended, run tests/public_api.sh --update and commit the file."
  exit 1
fi
echo "public API: $(wc -l < docs/public-api.txt) items, as listed in docs/public-api.txt"
