#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, etcd, helm and promtool from their published Go modules
# into a cache outside the repository, once per pinned version. Prints the bin directory.
#
# KUBEBUILDER_ASSETS (the controller-runtime envtest convention) wins when set: its
# kube-apiserver and etcd are used and only what it lacks is built.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${M3O_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/m3o-operator}"
bin="$cache/bin/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
mkdir -p "$bin"
log() { echo "build-tools: $*" >&2; }

command -v go >/dev/null || { log "go is required to build the control plane (or set KUBEBUILDER_ASSETS)"; exit 1; }
export GOFLAGS="-mod=mod" GOTOOLCHAIN=local CGO_ENABLED=0

# go_build MODULE_DIR OUTPUT PACKAGE [LDFLAGS]
go_build() {
  local dir="$1" out="$2" pkg="$3" ldflags="${4:-}"
  log "building $(basename "$out") from $pkg (first run only; takes minutes)"
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
}

# A scratch module that requires k8s.io/kubernetes with every staging module pinned by
# `replace` to the matching v0.x.y (k8s.io/kubernetes' own go.mod points them at ./staging).
build_kubernetes() {
  local mod; mod="$(mktemp -d)"
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  (cd "$mod" && go mod init m3o.local/controlplane >/dev/null 2>&1)
  local gomod
  gomod="$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    grep -oE '^\s*k8s.io/[a-z0-9-]+ => ./staging' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >>"$mod/go.mod"
  (cd "$mod" && go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBERNETES_VERSION" "k8s.io/kubernetes/cmd/kubectl@$KUBERNETES_VERSION" >&2)
  local v="k8s.io/component-base/version" cv="k8s.io/client-go/pkg/version"
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-X $v.gitVersion=$KUBERNETES_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
  ld="$ld -X $cv.gitVersion=$KUBERNETES_VERSION -X $cv.gitMajor=1 -X $cv.gitMinor=$minor"
  [[ -x "$bin/kube-apiserver" ]] || go_build "$mod" "$bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver "$ld"
  [[ -x "$bin/kubectl" ]] || go_build "$mod" "$bin/kubectl" k8s.io/kubernetes/cmd/kubectl "$ld"
  rm -rf "$mod"
}

build_etcd() {
  local mod; mod="$(mktemp -d)"
  (cd "$mod" && go mod init m3o.local/etcd >/dev/null 2>&1 && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2)
  go_build "$mod" "$bin/etcd" go.etcd.io/etcd/server/v3
  rm -rf "$mod"
}

build_helm() {
  local mod; mod="$(mktemp -d)"
  (cd "$mod" && go mod init m3o.local/helm >/dev/null 2>&1 && go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2)
  go_build "$mod" "$bin/helm" helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  rm -rf "$mod"
}

# promtool lives in a directory of its own version (so bumping it rebuilds only it) and
# is linked into $bin, which is what callers put on PATH.
build_promtool() {
  local dir="$cache/bin/promtool-$PROMETHEUS_VERSION"
  if [[ ! -x "$dir/promtool" ]]; then
    local mod; mod="$(mktemp -d)"
    mkdir -p "$dir"
    (cd "$mod" && go mod init m3o.local/promtool >/dev/null 2>&1 && go get "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" >&2)
    go_build "$mod" "$dir/promtool" github.com/prometheus/prometheus/cmd/promtool
    rm -rf "$mod"
  fi
  ln -sfn "$dir/promtool" "$bin/promtool"
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  for b in kube-apiserver etcd; do
    [[ -x "$KUBEBUILDER_ASSETS/$b" ]] || { log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no $b"; exit 1; }
    ln -sf "$KUBEBUILDER_ASSETS/$b" "$bin/$b"
  done
  [[ -x "$KUBEBUILDER_ASSETS/kubectl" && ! -e "$bin/kubectl" ]] && ln -sf "$KUBEBUILDER_ASSETS/kubectl" "$bin/kubectl"
fi
if [[ ! -x "$bin/kube-apiserver" || ! -x "$bin/kubectl" ]]; then build_kubernetes; fi
[[ -x "$bin/etcd" ]] || build_etcd
[[ -x "$bin/helm" ]] || build_helm
build_promtool
echo "$bin"
