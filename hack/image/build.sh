#!/usr/bin/env bash
# Builds the m3o-operator image without a container engine (README, "Install on a cluster"): an
# OCI image layout and an oci-archive tarball of it, made with GNU tar and umoci.
#
#   hack/image/build.sh --bin-dir DIR [--out DIR] [--repository NAME] [--tag TAG] [--max-mb N]
#
#   --bin-dir     holds m3o-operator and m3o-gateway-auth (a release or debug build)
#   --out         default target/image; gets layout/ (the OCI layout, tagged TAG),
#                 <name>-<tag>.oci.tar (the oci-archive) and ref (NAME:TAG)
#   --repository  default m3o-operator (the chart's image.repository)
#   --tag         default the workspace version (the chart's appVersion)
#   --max-mb      fail when the compressed image is larger
#
# Reproducible: the same binaries and commit give the same manifest digest. Times are
# SOURCE_DATE_EPOCH (default: the commit's time), tar entries are sorted, owners are
# numeric (root, /home/nonroot 65532), PAX atime/ctime are dropped, gzip is umoci's
# (deterministic for the same input).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
die() { echo "image: $*" >&2; exit 1; }

bin_dir="" out="$root/target/image" repository=m3o-operator tag="" max_mb=""
while (($# > 0)); do
  case "$1" in
    --bin-dir) bin_dir="${2:?}"; shift 2 ;;
    --out) out="${2:?}"; shift 2 ;;
    --repository) repository="${2:?}"; shift 2 ;;
    --tag) tag="${2:?}"; shift 2 ;;
    --max-mb) max_mb="${2:?}"; shift 2 ;;
    *) die "unknown argument $1 (see the header of hack/image/build.sh)" ;;
  esac
done
[[ -n "$bin_dir" ]] || die "--bin-dir DIR is required"
for tool in umoci tar jq sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found: run hack/install-deps.sh"
done
# shellcheck source=image.env
source "$here/image.env"

# --- version, revision, time.
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
license="$(sed -n '/^\[workspace.package\]/,/^\[/s/^license *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
source_url="$(sed -n '/^\[workspace.package\]/,/^\[/s/^repository *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
[[ -n "$version" && -n "$license" ]] || die "no version or license in [workspace.package] of Cargo.toml"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/m3o-operator/Chart.yaml")"
[[ "$app_version" == "$version" ]] ||
  die "the chart's appVersion ($app_version) differs from the workspace version ($version): the chart would run another tag"
tag="${tag:-$version}"
revision="${IMAGE_REVISION:-}"
if [[ -z "$revision" ]]; then
  revision="$(git -C "$root" rev-parse HEAD 2>/dev/null)" || die "not a git checkout: set IMAGE_REVISION and SOURCE_DATE_EPOCH"
  git -C "$root" diff --quiet HEAD -- 2>/dev/null || revision="$revision-dirty"
fi
epoch="${SOURCE_DATE_EPOCH:-}"
if [[ -z "$epoch" ]]; then
  epoch="$(git -C "$root" log -1 --format=%ct 2>/dev/null)" || die "not a git checkout: set SOURCE_DATE_EPOCH"
fi
[[ "$epoch" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be seconds since the epoch, got $epoch"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"

# --- root filesystem, then one layer for the base and one for the binaries.
work="$out/.work"
rm -rf "$out"
mkdir -p "$work"
"$here/rootfs.sh" --bin-dir "$bin_dir" "$work/rootfs"

# layer DIR TAR: a reproducible tar of DIR: sorted names, fixed time, numeric owners
# (root everywhere, nonroot's home its own).
layer() {
  local dir="$1" tar_file="$2"
  local -a opts=(--format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime
    --mtime="@$epoch" --numeric-owner --no-recursion -C "$dir")
  (cd "$dir" && find . -mindepth 1 ! -path ./home/nonroot | sed 's|^\./||' | LC_ALL=C sort) >"$tar_file.list"
  tar "${opts[@]}" --owner=0 --group=0 -cf "$tar_file" -T "$tar_file.list"
  if [[ -d "$dir/home/nonroot" ]]; then
    tar "${opts[@]}" --owner=65532 --group=65532 -rf "$tar_file" home/nonroot
  fi
}
layer "$work/rootfs/base" "$work/base.tar"
layer "$work/rootfs/app" "$work/app.tar"

layout="$out/layout"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci raw add-layer --image "$layout:$tag" --history.created "$created" \
  --history.created_by "hack/image/rootfs.sh: base (libc6, libgcc-s1, ca-certificates, nonroot)" "$work/base.tar"
umoci raw add-layer --image "$layout:$tag" --history.created "$created" \
  --history.created_by "hack/image/rootfs.sh: m3o-operator, m3o-gateway-auth" "$work/app.tar"
config=(--created "$created" --architecture amd64 --os linux --no-history
  --config.user "$IMAGE_USER" --config.entrypoint "$IMAGE_ENTRYPOINT" --config.cmd "$IMAGE_CMD"
  --config.env "PATH=$IMAGE_PATH" --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  --config.workingdir /)
for port in $IMAGE_PORTS; do config+=(--config.exposedports "$port"); done
for label in "title=$IMAGE_TITLE" "description=$IMAGE_DESCRIPTION" "version=$version" \
  "revision=$revision" "licenses=$license" "source=$source_url" "created=$created"; do
  config+=(--config.label "org.opencontainers.image.$label" --manifest.annotation "org.opencontainers.image.$label")
done
umoci config --image "$layout:$tag" "${config[@]}"
umoci gc --layout "$layout"

# --- the oci-archive: the layout as a reproducible tar.
name="${repository##*/}"
archive="$out/$name-$tag.oci.tar"
(cd "$layout" && find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort) >"$work/archive.list"
tar --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --mode=a+rX,u+w --no-recursion \
  -C "$layout" -cf "$archive" -T "$work/archive.list"
rm -rf "$work"
printf '%s:%s\n' "$repository" "$tag" >"$out/ref"

# --- what was made.
digest="$(jq -r '.manifests[0].digest' "$layout/index.json")"
manifest="$layout/blobs/${digest/://}"
[[ "$(sha256sum "$manifest" | cut -d' ' -f1)" == "${digest#sha256:}" ]] || die "manifest blob does not match $digest"
compressed="$(jq '[.config.size, (.layers[].size)] | add' "$manifest")"
compressed=$((compressed + $(stat -c %s "$manifest")))
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1000000 }'; }
echo "image: $repository:$tag" >&2
echo "  digest      $digest" >&2
echo "  compressed  $compressed bytes ($(mb "$compressed"): manifest, config and layers as pushed)" >&2
echo "  layout      $layout (tag $tag)" >&2
echo "  archive     $archive ($(mb "$(stat -c %s "$archive")"))" >&2
echo "  revision    $revision, created $created" >&2
if [[ -n "$max_mb" ]] && ((compressed > max_mb * 1000000)); then
  die "the compressed image is $(mb "$compressed"), over the $max_mb MB target"
fi
echo "$digest"
