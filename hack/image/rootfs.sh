#!/usr/bin/env bash
# Stages the root filesystem of the m3o-operator image (README, "Install on a cluster") into OUT:
#
#   hack/image/rootfs.sh --bin-dir DIR OUT
#
#   OUT/base/  a distroless-like base taken from this machine's Debian (bookworm)
#              packages: the C runtime the binaries link (found with ldd, each file
#              checked to belong to libc6 or libgcc-s1), the CA bundle of
#              ca-certificates, /etc/passwd and /etc/group with nonroot (65532),
#              nsswitch.conf, /tmp, the packages' copyright files and dpkg status
#              stanzas (for image scanners). No shell, no package manager.
#   OUT/app/   /usr/local/bin/m3o-operator and /usr/local/bin/m3o-gateway-auth from
#              DIR, stripped (DIR may hold a release or a debug build).
#
# Why glibc and not static musl binaries: the binaries are built exactly as the test
# suite builds them (the image test packages the debug binaries it already has, no
# second toolchain or target), and the runtime they need is four files of two Debian
# packages, the same as distroless/cc. Used by hack/image/build.sh and the Dockerfile.
#
# Modes are set here; owners and times are set when the layers are written (build.sh
# or the Dockerfile's COPY): every file root:root, /home/nonroot 65532:65532.
set -euo pipefail
die() { echo "image rootfs: $*" >&2; exit 1; }

bin_dir="" out=""
while (($# > 0)); do
  case "$1" in
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    -*) die "unknown option $1 (usage: rootfs.sh --bin-dir DIR OUT)" ;;
    *) [[ -z "$out" ]] || die "one OUT directory only"; out="$1"; shift ;;
  esac
done
[[ -n "$bin_dir" && -n "$out" ]] || die "usage: rootfs.sh --bin-dir DIR OUT"
for tool in ldd strip dpkg-query; do
  command -v "$tool" >/dev/null || die "$tool not found (hack/install-deps.sh installs it)"
done

binaries=(m3o-operator m3o-gateway-auth)
# Packages whose files may enter the image, with the files that come from them.
runtime_packages=(libc6 libgcc-s1)
other_packages=(ca-certificates)
ca_bundle=/etc/ssl/certs/ca-certificates.crt

for b in "${binaries[@]}"; do
  [[ -x "$bin_dir/$b" ]] || die "$bin_dir/$b missing: build it first (cargo build -p m3o-operator -p m3o-gateway --bins)"
done
[[ -s "$ca_bundle" ]] || die "$ca_bundle missing (install ca-certificates)"

rm -rf "$out"
base="$out/base" app="$out/app"
mkdir -p "$base" "$app"

# add_host_path ROOT PATH: copies PATH from this machine into ROOT, recreating every
# symlink on the way (/lib -> usr/lib, /lib64/ld-linux-x86-64.so.2 -> ...).
add_host_path() {
  local root="$1" path="$2" prefix="" i target
  local -a parts
  IFS=/ read -ra parts <<<"${path#/}"
  for i in "${!parts[@]}"; do
    prefix="$prefix/${parts[i]}"
    if [[ -L "$prefix" ]]; then
      target="$(readlink "$prefix")"
      [[ -L "$root$prefix" ]] || ln -s "$target" "$root$prefix"
      local rest
      rest="$(IFS=/; echo "${parts[*]:i+1}")"
      [[ "$target" == /* ]] || target="$(dirname "$prefix")/$target"
      add_host_path "$root" "$(realpath -ms "$target${rest:+/$rest}")"
      return
    fi
    if ((i == ${#parts[@]} - 1)); then
      cp --preserve=mode "$prefix" "$root$prefix"
    else
      mkdir -p "$root$prefix"
    fi
  done
}

# The owning package of a file, trying the path as given and as resolved (merged /usr).
owner_of() {
  local p="$1" pkg
  for candidate in "$p" "$(realpath "$p")" "${p/#\/usr\/lib\//\/lib\/}"; do
    pkg="$(dpkg-query -S "$candidate" 2>/dev/null | head -n 1)" || continue
    [[ -n "$pkg" ]] && { echo "${pkg%%:*}"; return 0; }
  done
  return 1
}

# --- the C runtime: every library the binaries load, and only from allowed packages.
declare -A libs=()
for b in "${binaries[@]}"; do
  out_ldd="$(ldd "$bin_dir/$b" 2>&1)" || {
    [[ "$out_ldd" == *"not a dynamic executable"* ]] && continue
    die "ldd $bin_dir/$b failed: $out_ldd"
  }
  while read -r line; do
    case "$line" in
      *"=> not found"*) die "$b needs ${line%% *}, which is not installed" ;;
      *"=> /"*) lib="${line#*=> }"; libs[${lib%% (*}]=1 ;;
      /*) libs[${line%% (*}]=1 ;; # the dynamic loader
      linux-vdso.so*) ;;
      *) die "$b: unexpected ldd line: $line" ;;
    esac
  done <<<"$out_ldd"
done
for lib in "${!libs[@]}"; do
  pkg="$(owner_of "$lib")" || die "$lib (needed by the binaries) belongs to no Debian package"
  [[ " ${runtime_packages[*]} " == *" $pkg "* ]] ||
    die "$lib comes from $pkg: the image ships only ${runtime_packages[*]}; add $pkg to rootfs.sh (and say why) or drop the dependency"
  add_host_path "$base" "$lib"
done

# --- CA certificates, users, name service switch, /tmp and nonroot's home.
add_host_path "$base" "$ca_bundle"
mkdir -p "$base/etc" "$base/tmp" "$base/home/nonroot" "$base/root"
cat >"$base/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$base/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
GROUP
printf 'hosts: files dns\nnetworks: files\npasswd: files\ngroup: files\n' >"$base/etc/nsswitch.conf"
# The packages' licences and their dpkg status (scanners read status.d, as in distroless).
mkdir -p "$base/var/lib/dpkg/status.d"
for pkg in "${runtime_packages[@]}" "${other_packages[@]}"; do
  dpkg-query -s "$pkg" >/dev/null 2>&1 || die "Debian package $pkg is not installed"
  dpkg-query -s "$pkg" | grep -vE '^(Status|Conffiles|Config-Version):|^ /' >"$base/var/lib/dpkg/status.d/$pkg"
  copyright="/usr/share/doc/$pkg/copyright"
  [[ -f "$copyright" ]] || die "$copyright missing"
  add_host_path "$base" "$copyright"
done

# --- the binaries.
mkdir -p "$app/usr/local/bin"
for b in "${binaries[@]}"; do
  strip --strip-all -o "$app/usr/local/bin/$b" "$bin_dir/$b"
done

# --- modes: directories 0755 (/tmp 1777, homes 0700), binaries 0755, files as packaged.
find "$out" -type d -exec chmod 0755 {} +
chmod 1777 "$base/tmp"
chmod 0700 "$base/root" "$base/home/nonroot"
chmod 0644 "$base/etc/passwd" "$base/etc/group" "$base/etc/nsswitch.conf" "$base/var/lib/dpkg/status.d"/*
chmod 0755 "$app/usr/local/bin"/*
