#!/usr/bin/env bash
# Refresh the web console's vendored JavaScript (backend/app/web/static/vendor) from the npm
# registry: htmx and Chart.js, their licences, and vendor/README.md with versions and SHA-256.
#
#   scripts/refresh_web_vendor.sh                              # the pinned versions below
#   HTMX_VERSION=2.0.11 CHARTJS_VERSION=4.6.1 scripts/refresh_web_vendor.sh
#
# Needs npm (only `npm pack`: nothing is installed, no package script runs). The console loads
# these files from its own origin; nothing is fetched from elsewhere when it runs.
set -euo pipefail

HTMX_VERSION="${HTMX_VERSION:-2.0.11}"
CHARTJS_VERSION="${CHARTJS_VERSION:-4.6.1}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/backend/app/web/static/vendor"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cd "$WORK"
npm pack --silent "htmx.org@$HTMX_VERSION" "chart.js@$CHARTJS_VERSION" >/dev/null
mkdir htmx chartjs
tar -xzf "htmx.org-$HTMX_VERSION.tgz" -C htmx
tar -xzf "chart.js-$CHARTJS_VERSION.tgz" -C chartjs

mkdir -p "$DEST"
cp htmx/package/dist/htmx.min.js "$DEST/htmx.min.js"
cp htmx/package/LICENSE "$DEST/htmx.LICENSE"
# The source map is not shipped: drop the comment that would make a browser's devtools ask for it.
grep -v '^//# sourceMappingURL=' chartjs/package/dist/chart.umd.min.js >"$DEST/chart.umd.min.js"
cp chartjs/package/LICENSE.md "$DEST/chart.js.LICENSE.md"

sha() { sha256sum "$1" | cut -d' ' -f1; }
cat >"$DEST/README.md" <<EOF
# Vendored JavaScript of the web console

Served from the console's own origin (\`/static/vendor/\`); nothing is loaded from
another origin at run time. Refresh with \`scripts/refresh_web_vendor.sh\` (versions as
variables at its top), which writes this file.

| file | package (npm) | version | licence | SHA-256 |
|---|---|---|---|---|
| \`htmx.min.js\` | [htmx.org](https://www.npmjs.com/package/htmx.org), \`dist/htmx.min.js\` | $HTMX_VERSION | BSD Zero Clause (\`htmx.LICENSE\`) | \`$(sha "$DEST/htmx.min.js")\` |
| \`chart.umd.min.js\` | [chart.js](https://www.npmjs.com/package/chart.js), \`dist/chart.umd.min.js\` (its \`sourceMappingURL\` line removed) | $CHARTJS_VERSION | MIT (\`chart.js.LICENSE.md\`) | \`$(sha "$DEST/chart.umd.min.js")\` |

htmx stays on the 2.x line (4.x changed attribute inheritance and events); Chart.js draws the
spend charts on a \`<canvas>\` and needs no inline style or \`eval\`, so the console's
\`Content-Security-Policy\` can stay at \`'self'\`.
EOF
echo "vendored htmx $HTMX_VERSION and Chart.js $CHARTJS_VERSION into $DEST"
