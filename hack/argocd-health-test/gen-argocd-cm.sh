#!/usr/bin/env bash
# Regenerates charts/m3o-operator/argocd/argocd-cm.yaml (the argocd-cm entries users
# merge into Argo CD) from the <group>/<Kind>/health.lua scripts beside it.
# `make test` (hack/argocd-health-test) fails when the two disagree.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="$(cd "$here/../../charts/m3o-operator/argocd" && pwd)"
out="$dir/argocd-cm.yaml"
{
  cat <<'HEAD'
# Argo CD health checks for Customer, Subscription and ApiKey (m3o.com), as argocd-cm
# entries. Generated from m3o.com/<Kind>/health.lua by
# hack/argocd-health-test/gen-argocd-cm.sh: edit the scripts, not this file.
# Merge it into your Argo CD (namespace argocd by default):
#   kubectl -n argocd patch configmap argocd-cm --type merge \
#     --patch-file charts/m3o-operator/argocd/argocd-cm.yaml
# or put the data entries under configs.cm in the argo-cd Helm chart's values.
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  labels:
    app.kubernetes.io/name: argocd-cm
    app.kubernetes.io/part-of: argocd
data:
HEAD
  for script in "$dir"/*/*/health.lua; do
    kind="$(basename "$(dirname "$script")")"
    group="$(basename "$(dirname "$(dirname "$script")")")"
    echo "  resource.customizations.health.${group}_${kind}: |"
    sed 's/^\(.\)/    \1/' "$script"
  done
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out" >&2
