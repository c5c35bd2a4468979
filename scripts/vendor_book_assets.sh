#!/usr/bin/env bash
# Vendor the JavaScript the book's pages load, so that no page requests anything from a CDN:
#   MathJax 3 (renders the math), RequireJS and @jupyter-widgets/html-manager (render saved
#   ipywidgets). They go to book/static/vendor/ (git-ignored), which the book config copies
#   into _build/html/_static/vendor/ (see scripts/make_book_config.py).
# Idempotent: does nothing when the pinned versions are already there. Needs npm (registry
# access) only the first time. Usage: scripts/vendor_book_assets.sh [--force]
set -euo pipefail

MATHJAX=3.2.2
REQUIREJS=2.3.8
HTML_MANAGER=1.0.15

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/book/static/vendor"
stamp="mathjax@$MATHJAX requirejs@$REQUIREJS @jupyter-widgets/html-manager@$HTML_MANAGER"

if [[ "${1:-}" != "--force" && -f "$dest/VERSIONS" && "$(cat "$dest/VERSIONS")" == "$stamp" ]]; then
  echo "book assets already vendored ($stamp)"
  exit 0
fi
command -v npm >/dev/null || { echo "vendor_book_assets: npm is needed once to fetch $stamp" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $stamp with npm ..."
npm install --prefix "$tmp" --no-audit --no-fund --ignore-scripts --loglevel=error \
  "mathjax@$MATHJAX" "requirejs@$REQUIREJS" "@jupyter-widgets/html-manager@$HTML_MANAGER" >/dev/null
nm="$tmp/node_modules"

new="$tmp/vendor"
mkdir -p "$new/mathjax" "$new/html-manager" "$new/licenses"
# MathJax: the combined TeX + CommonHTML component and what it loads lazily (fonts, menu,
# accessibility, TeX extensions), relative to its own location.
cp "$nm/mathjax/es5/tex-chtml.js" "$nm/mathjax/es5/startup.js" "$nm/mathjax/es5/core.js" \
   "$nm/mathjax/es5/loader.js" "$new/mathjax/"
cp -r "$nm/mathjax/es5/input" "$nm/mathjax/es5/output" "$nm/mathjax/es5/ui" \
      "$nm/mathjax/es5/a11y" "$nm/mathjax/es5/sre" "$nm/mathjax/es5/adaptors" "$new/mathjax/"
cp "$nm/mathjax/LICENSE" "$new/licenses/mathjax-LICENSE"
# RequireJS (an AMD loader the widget manager needs).
cp "$nm/requirejs/require.js" "$new/require.js"
cp "$nm/requirejs/LICENSE" "$new/licenses/requirejs-LICENSE" 2>/dev/null \
  || sed -n '/license/Ip' "$nm/requirejs/package.json" > "$new/licenses/requirejs-LICENSE"
# Widget manager: the AMD bundle (with @jupyter-widgets/base, controls, output) and its fonts.
hm="$nm/@jupyter-widgets/html-manager"
cp "$hm/dist/embed-amd.js" "$new/html-manager/"
find "$hm/dist" -maxdepth 1 -type f \( -name '*.woff2' -o -name '*.woff' -o -name '*.ttf' \
  -o -name '*.eot' -o -name '*.svg' \) -exec cp {} "$new/html-manager/" \;
cp "$hm/dist/embed.js.LICENSE.txt" "$new/licenses/html-manager-bundled-LICENSES.txt"
cp "$hm/LICENSE" "$new/licenses/html-manager-LICENSE" 2>/dev/null \
  || sed -n '/license/Ip' "$hm/package.json" > "$new/licenses/html-manager-LICENSE"

echo "$stamp" > "$new/VERSIONS"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$new" "$dest"
echo "vendored $stamp into ${dest#$root/} ($(du -sh "$dest" | cut -f1))"
