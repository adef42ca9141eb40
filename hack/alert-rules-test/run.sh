#!/usr/bin/env bash
# Tests the chart's alerts with `promtool test rules` (alerts_test.yaml): renders the
# PrometheusRule, turns its spec into a Prometheus rules file, checks it, runs the
# tests, and fails when an alert has no test or no runbook line in the README.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
log() { echo "alert-rules: $*" >&2; }

PATH="$("$root/hack/build-tools.sh"):$PATH"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

helm template t "$root/charts/m3o-operator" --kube-version 1.34.0 \
  --set metrics.prometheusRule.enabled=true \
  --set-string 'metrics.prometheusRule.selector=job="m3o"' \
  --show-only templates/prometheusrule.yaml >"$tmp/prometheusrule.yaml"
# A PrometheusRule's spec is a Prometheus rules file, indented by two.
sed -n '/^spec:$/,$p' "$tmp/prometheusrule.yaml" | tail -n +2 | sed 's/^  //' >"$tmp/rules.yaml"
promtool check rules "$tmp/rules.yaml"

missing=0
for alert in $(sed -n 's/^ *- alert: //p' "$tmp/rules.yaml"); do
  grep -q "alertname: $alert\$" "$here/alerts_test.yaml" || { log "$alert has no test in alerts_test.yaml"; missing=1; }
  grep -q "\`$alert\`" "$root/README.md" || { log "$alert has no runbook line in README.md"; missing=1; }
done
((missing == 0)) || exit 1

# The gateway's alerts: their own PrometheusRule and test file.
helm template t "$root/charts/m3o-operator" --kube-version 1.34.0 \
  --set metrics.prometheusRule.enabled=true --set gateway.enabled=true \
  --set-string 'metrics.prometheusRule.gatewaySelector=job="m3o-gateway"' \
  --show-only templates/prometheusrule-gateway.yaml >"$tmp/prometheusrule-gateway.yaml"
sed -n '/^spec:$/,$p' "$tmp/prometheusrule-gateway.yaml" | tail -n +2 | sed 's/^  //' >"$tmp/gateway-rules.yaml"
promtool check rules "$tmp/gateway-rules.yaml"
for alert in $(sed -n 's/^ *- alert: //p' "$tmp/gateway-rules.yaml"); do
  grep -q "alertname: $alert\$" "$here/gateway_alerts_test.yaml" || { log "$alert has no test in gateway_alerts_test.yaml"; missing=1; }
  grep -q "\`$alert\`" "$root/README.md" || { log "$alert has no runbook line in README.md"; missing=1; }
done
((missing == 0)) || exit 1

cp "$here/alerts_test.yaml" "$here/gateway_alerts_test.yaml" "$tmp/"
cd "$tmp" && promtool test rules alerts_test.yaml gateway_alerts_test.yaml
