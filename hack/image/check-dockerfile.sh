#!/usr/bin/env bash
# Fails when the Dockerfile would not build the image `make image` builds:
#  - a workspace member, or any other file the two binaries are compiled from (every
#    path in cargo's dep-info of m3o-operator and m3o-gateway-auth that lies in this
#    repository: sources, include_str! files, migrations, protos), or a file the image
#    build itself runs (hack/image/), is not COPYed into the build stage;
#  - its USER, ENTRYPOINT, CMD, EXPOSE or ENV PATH differ from hack/image/image.env;
#  - its RUST_VERSION is older than the workspace's rust-version.
#
#   hack/image/check-dockerfile.sh [--bin-dir target/debug] [--dockerfile Dockerfile]
#
# The binaries must have been built into --bin-dir (their .d files are read).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
die() { echo "check-dockerfile: $*" >&2; exit 1; }

bin_dir="$root/target/debug" dockerfile="$root/Dockerfile"
while (($# > 0)); do
  case "$1" in
    --bin-dir) bin_dir="${2:?}"; shift 2 ;;
    --dockerfile) dockerfile="${2:?}"; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
command -v jq >/dev/null || die "jq not found: run hack/install-deps.sh"
[[ -f "$dockerfile" ]] || die "$dockerfile not found"
# shellcheck source=image.env
source "$here/image.env"

# --- the build stage's COPY sources (the stage before the second FROM).
stage="$(awk '/^FROM /{n++} n==1' "$dockerfile")"
mapfile -t copied < <(sed -n 's/^COPY \(--[^ ]* \)*//p' <<<"$stage" | while read -r -a words; do
  unset 'words[${#words[@]}-1]'
  printf '%s\n' "${words[@]}"
done | sed 's|^\./||; s|/$||')
((${#copied[@]} > 0)) || die "no COPY in the build stage of $dockerfile"

# covered PATH: a COPY source is PATH or one of its parent directories.
covered() {
  local path="$1" src
  for src in "${copied[@]}"; do
    [[ "$src" == . || "$path" == "$src" || "$path" == "$src"/* ]] && return 0
  done
  return 1
}

# --- what the build reads.
declare -A needed=()
members="$(cd "$root" && cargo metadata --no-deps --offline --format-version 1)" || die "cargo metadata failed"
while read -r manifest; do
  needed[${manifest#"$root"/}]="workspace member"
done < <(jq -r '.packages[].manifest_path' <<<"$members")
needed[Cargo.toml]="workspace manifest"
needed[Cargo.lock]="--locked build"
for f in "$here"/*; do needed[${f#"$root"/}]="the image build"; done
for bin in m3o-operator m3o-gateway-auth; do
  dep_info="$bin_dir/$bin.d"
  [[ -f "$dep_info" ]] || die "$dep_info missing: build the binaries first (cargo build --bins)"
  # "target: dep dep ...", spaces in names escaped as "\ ".
  while read -r path; do
    [[ "$path" == "$root"/* && "$path" != "$root"/target/* ]] || continue
    needed[${path#"$root"/}]="compiled into $bin"
  done < <(cut -d: -f2- "$dep_info" | sed 's/\\ /\x00/g' | tr ' ' '\n' | tr '\0' ' ' | sed '/^$/d')
done

# ignored PATH: .dockerignore leaves it out of the build context (the last matching
# pattern decides; "!" re-includes; a pattern matches a path or a directory above it).
ignore_patterns=()
if [[ -f "$(dirname "$dockerfile")/.dockerignore" ]]; then
  mapfile -t ignore_patterns < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$(dirname "$dockerfile")/.dockerignore")
fi
ignored() {
  local path="$1" pattern negate verdict=1
  for pattern in "${ignore_patterns[@]}"; do
    negate=0
    [[ "$pattern" == '!'* ]] && { negate=1; pattern="${pattern#!}"; }
    pattern="${pattern#/}" pattern="${pattern%/}"
    # shellcheck disable=SC2053 # the pattern is a glob
    if [[ "$path" == $pattern || "$path" == $pattern/* ]]; then
      ((negate)) && verdict=1 || verdict=0
    fi
  done
  return "$verdict"
}

missing=()
for path in "${!needed[@]}"; do
  covered "$path" || missing+=("$path (${needed[$path]})")
  ! ignored "$path" || missing+=("$path (${needed[$path]}; excluded by .dockerignore)")
done
if ((${#missing[@]} > 0)); then
  printf 'check-dockerfile: not copied into the build stage: %s\n' "${missing[@]}" | sort >&2
  die "$dockerfile misses ${#missing[@]} build input(s): add a COPY line for each"
fi

# --- the image configuration.
final="$(awk '/^FROM /{n++} n>=2' "$dockerfile")"
expect() {
  local what="$1" want="$2" got
  got="$(sed -n "s/^$what //p" <<<"$final" | tail -n 1)"
  [[ "$got" == "$want" ]] || die "$what is '$got', hack/image/image.env says '$want'"
}
expect USER "$IMAGE_USER"
expect ENTRYPOINT "[\"$IMAGE_ENTRYPOINT\"]"
expect CMD "[\"$IMAGE_CMD\"]"
expect EXPOSE "$IMAGE_PORTS"
grep -q "^ENV PATH=$IMAGE_PATH\( \|$\)" <<<"$final" || die "ENV PATH is not $IMAGE_PATH (hack/image/image.env)"

# --- the toolchain.
msrv="$(jq -r '[.packages[].rust_version // empty] | max' <<<"$members")"
rust="$(sed -n 's/^ARG RUST_VERSION=//p' "$dockerfile")"
[[ -n "$rust" ]] || die "no ARG RUST_VERSION in $dockerfile"
[[ "$(printf '%s\n%s\n' "$msrv" "$rust" | sort -V | head -n 1)" == "$msrv" ]] ||
  die "RUST_VERSION $rust is older than the workspace's rust-version $msrv"
echo "check-dockerfile: $dockerfile copies all ${#needed[@]} build inputs and matches hack/image/image.env" >&2
