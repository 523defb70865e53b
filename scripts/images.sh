#!/usr/bin/env bash
# Test images for tarn, built offline from this machine's files into OCI
# layouts under a cache directory that is kept between runs: an image is built
# (or converted) only when its layout is missing.
#
#   images.sh build [NAME...]         build NAMEs (default: all) if missing
#   images.sh push NAME REGISTRY [TAG] copy CACHE/NAME to REGISTRY/NAME:TAG
#   images.sh info [NAME...]          layers, compressed and unpacked sizes
#   images.sh path NAME               the layout directory of NAME
#
# Names: busybox, python, multi (plain gzip layers, built with umoci),
# busybox-esgz, python-esgz, multi-esgz (eStargz, converted by Debian's
# ctr-remote), multi-esgz-opt (eStargz optimized for /app/run.sh);
# p7-a, p7-b and their -esgz forms (`make bench`'s P7, built only when
# named): the same busybox and python trees, packed into different layers.
# Every layout holds one tag, `latest`.
set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TARN_IMAGE_CACHE:-/var/cache/tarn-images}"
# ctr-remote's own default is 9 (best); a lower level converts ~2x faster.
ESGZ_LEVEL="${TARN_ESGZ_LEVEL:-9}"
ALL=(busybox python multi busybox-esgz python-esgz multi-esgz multi-esgz-opt)

log() { echo "images: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  sed -n '5,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

manifest_of() { jq -r '.manifests[0].digest' "$CACHE/$1/index.json"; }

# A plain image is present when its layout is; a converted one also needs to
# come from the plain image now in the cache (rebuilt plain -> reconvert).
have() {
  [ -f "$CACHE/$1/index.json" ] || return 1
  case "$1" in
    *-esgz | *-esgz-opt)
      have "${1%-esgz*}" &&
        [ "$(cat "$CACHE/.sources/$1" 2>/dev/null)" = "$(manifest_of "${1%-esgz*}")" ]
      ;;
  esac
}

# Run "$@" and log how long it took.
timed() {
  local what="$1" start=$SECONDS
  shift
  "$@"
  log "$what took $((SECONDS - start))s"
}

# ---------------------------------------------------------------- plain images

# Root tree of the busybox layer: the static binary, its applet links, and
# the few files a shell and `ps` expect.
stage_busybox() {
  local root="$1" applet
  mkdir -p "$root/bin" "$root/etc" "$root/root" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
  done < <(/bin/busybox --list-full)
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
}

# Root tree of the python layer: Debian's python3.11 interpreter, its standard
# library, and every shared library it or its extension modules link (found
# with ldd), at the paths the dynamic loader searches by default.
stage_python() {
  local root="$1" lib
  mkdir -p "$root/usr/bin" "$root/usr/lib" "$root/etc"
  cp -a /usr/bin/python3.11 "$root/usr/bin/"
  ln -s python3.11 "$root/usr/bin/python3"
  cp -a /usr/lib/python3.11 "$root/usr/lib/"
  [ -d /etc/python3.11 ] && cp -a /etc/python3.11 "$root/etc/"
  while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(
    {
      ldd /usr/bin/python3.11
      find /usr/lib/python3.11/lib-dynload -name '*.so' -exec ldd {} \;
    } 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' | sort -u
  )
}

# The workload of P7's images: the reference workload's start (a shell,
# python), then every file of the image's own tree under
# /usr/share/go-1.19/src, which the other image lacks.
stage_p7_app() {
  local root="$1"
  mkdir -p "$root/app"
  cat >"$root/app/run.sh" <<'EOF'
#!/bin/sh
set -e
echo "tarn test workload"
python3 -c 'import json, sys'
find /usr/share/go-1.19/src -type f -exec cat {} + | wc -c
EOF
  chmod 755 "$root/app/run.sh"
}

stage_app() {
  local root="$1"
  mkdir -p "$root/app"
  cat >"$root/app/run.sh" <<'EOF'
#!/bin/sh
# The reference workload: start a shell, start python, read one file.
set -e
echo "tarn test workload"
python3 -c 'import json, sys'
head -c 64 /usr/share/go-1.19/src/fmt/print.go
echo
EOF
  chmod 755 "$root/app/run.sh"
}

# stage_tree PATH ROOT: ROOT/PATH becomes a copy of PATH, hard-linked when
# the cache shares a filesystem with it (instant, no space).
stage_tree() {
  local path="$1" root="$2"
  mkdir -p "$root$(dirname "$path")"
  cp -al "$path" "$root$path" 2>/dev/null || {
    rm -rf "$root$path"
    cp -a "$path" "$root$path"
  }
}

# umoci_layer LAYOUT SRC [DEST]: add one layer holding SRC at DEST (default /).
umoci_layer() {
  umoci insert --image "$1:latest" "$2" "${3:-/}" >/dev/null
}

umoci_finish() {
  local layout="$1"
  shift
  umoci config --image "$layout:latest" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.workingdir / "$@" >/dev/null
  umoci gc --layout "$layout"
}

build_plain() {
  local name="$1" work="$CACHE/.work/$1" layout
  rm -rf "$work"
  mkdir -p "$work"
  layout="$work/layout"
  case "$name" in
    busybox)
      stage_busybox "$work/busybox"
      umoci init --layout "$layout"
      umoci new --image "$layout:latest"
      umoci_layer "$layout" "$work/busybox"
      # A command that never exits: the image is also the CRI sandbox image.
      umoci_finish "$layout" --config.cmd sleep --config.cmd infinity
      ;;
    python)
      ensure busybox
      skopeo copy -q "oci:$CACHE/busybox:latest" "oci:$layout:latest"
      stage_python "$work/python"
      umoci_layer "$layout" "$work/python"
      umoci_finish "$layout" --config.cmd python3
      ;;
    multi)
      ensure python
      skopeo copy -q "oci:$CACHE/python:latest" "oci:$layout:latest"
      # Staged under usr/ so the layers carry their parent directories, as
      # layers built by docker do (ctr-remote optimize requires them).
      stage_tree /usr/share/go-1.19 "$work/go-src"
      umoci_layer "$layout" "$work/go-src"
      stage_tree /usr/lib/go-1.19 "$work/go-lib"
      umoci_layer "$layout" "$work/go-lib"
      stage_app "$work/app"
      umoci_layer "$layout" "$work/app"
      umoci_finish "$layout" --config.cmd /app/run.sh
      ;;
    p7-a | p7-b)
      # P7: two images sharing ~80% of their files (busybox and python:
      # ~1,900 files) and no layer. p7-a has them as two layers, p7-b as
      # one; each adds a tree of its own (~20% of its files: Go's net,
      # 358 files, or internal, 442) with the workload in the same layer.
      local own=net
      [ "$name" = p7-b ] && own=internal
      umoci init --layout "$layout"
      umoci new --image "$layout:latest"
      stage_busybox "$work/base"
      if [ "$name" = p7-a ]; then
        umoci_layer "$layout" "$work/base"
        stage_python "$work/python"
        umoci_layer "$layout" "$work/python"
      else
        stage_python "$work/base"
        umoci_layer "$layout" "$work/base"
      fi
      stage_tree "/usr/share/go-1.19/src/$own" "$work/own"
      stage_p7_app "$work/own"
      umoci_layer "$layout" "$work/own"
      umoci_finish "$layout" --config.cmd /app/run.sh
      ;;
    *) die "unknown plain image $name" ;;
  esac
  rm -rf "${CACHE:?}/$name"
  mv "$layout" "$CACHE/$name"
  rm -rf "$work"
}

# ---------------------------------------------------------------- eStargz

# Convert plain images with ctr-remote inside a private test bed
# (registry + containerd), then copy the results back into the cache as OCI
# layouts, so later runs never convert again.
build_esgz() {
  local names=("$@") bed name src
  for name in "${names[@]}"; do
    src="${name%-esgz*}"
    ensure "$src"
  done
  bed="$(mktemp -d /tmp/tarn-images-bed.XXXXXX)"
  # shellcheck disable=SC2064 # expand $bed now: it is local
  trap "'$SCRIPTS/testbed.sh' down '$bed/tb' >/dev/null 2>&1 || true; rm -rf '$bed'" EXIT
  "$SCRIPTS/testbed.sh" up "$bed/tb" --registry --containerd
  local REGISTRY CONTAINERD_SOCK
  # shellcheck disable=SC1091
  REGISTRY="$(. "$bed/tb/env" && echo "$REGISTRY")"
  CONTAINERD_SOCK="$bed/tb/containerd.sock"
  local ctr=(ctr --address "$CONTAINERD_SOCK")
  local ctrr=(ctr-remote --address "$CONTAINERD_SOCK")
  for name in "${names[@]}"; do
    src="${name%-esgz*}"
    local plain="$REGISTRY/$src:latest" dst="$REGISTRY/$name:latest"
    skopeo copy -q --dest-tls-verify=false "oci:$CACHE/$src:latest" "docker://$plain"
    "${ctr[@]}" image pull --plain-http "$plain" >/dev/null
    case "$name" in
      *-esgz)
        timed "convert $name" "${ctrr[@]}" image convert --estargz --oci \
          --estargz-compression-level "$ESGZ_LEVEL" "$plain" "$dst" >/dev/null
        ;;
      *-esgz-opt)
        # Runs /app/run.sh in a container and puts the files it read first,
        # before the prefetch landmark.
        timed "optimize $name" "${ctrr[@]}" image optimize --oci \
          --estargz-compression-level "$ESGZ_LEVEL" --period 3 \
          --entrypoint '["/app/run.sh"]' "$plain" "$dst" >/dev/null
        ;;
    esac
    "${ctrr[@]}" image push --plain-http "$dst" >/dev/null
    rm -rf "$CACHE/.work/$name"
    mkdir -p "$CACHE/.work"
    skopeo copy -q --src-tls-verify=false "docker://$dst" "oci:$CACHE/.work/$name:latest"
    rm -rf "${CACHE:?}/$name"
    mv "$CACHE/.work/$name" "$CACHE/$name"
    mkdir -p "$CACHE/.sources"
    manifest_of "$src" >"$CACHE/.sources/$name"
  done
  "$SCRIPTS/testbed.sh" down "$bed/tb" >/dev/null
  rm -rf "$bed"
  trap - EXIT
}

# ---------------------------------------------------------------- verbs

ensure() {
  local name="$1"
  have "$name" && return 0
  case "$name" in
    busybox | python | multi | p7-a | p7-b) timed "build $name" build_plain "$name" ;;
    *-esgz | *-esgz-opt) build_esgz "$name" ;;
    *) die "unknown image $name (known: ${ALL[*]})" ;;
  esac
}

# Builds hold a lock on the cache so parallel tests never build one image
# twice. Readers need no lock: a layout appears by rename only when complete.
with_lock() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  "$@"
  exec 9>&-
}

all_present() {
  local name
  for name in "$@"; do have "$name" || return 1; done
}

cmd_build() {
  local name missing_esgz=()
  for name in "$@"; do
    case "$name" in
      *-esgz | *-esgz-opt) have "$name" || missing_esgz+=("$name") ;;
      *) ensure "$name" ;;
    esac
  done
  # One test bed for all conversions.
  if [ "${#missing_esgz[@]}" -gt 0 ]; then
    timed "eStargz conversion of ${missing_esgz[*]}" build_esgz "${missing_esgz[@]}"
  fi
  for name in "$@"; do log "$name: $CACHE/$name"; done
}

cmd_push() {
  local name="$1" registry="$2" tag="${3:-latest}"
  have "$name" || with_lock ensure "$name"
  skopeo copy -q --dest-tls-verify=false "oci:$CACHE/$name:latest" "docker://$registry/$name:$tag"
}

# Layers, compressed size (sum of layer blobs) and unpacked size (sum of the
# layers' uncompressed tar streams).
cmd_info() {
  [ "$#" -gt 0 ] || set -- "${ALL[@]}"
  local name manifest digest comp unpacked n
  for name in "$@"; do
    have "$name" || {
      echo "$name: not built"
      continue
    }
    manifest="$(manifest_of "$name")"
    comp=0 unpacked=0 n=0
    while read -r digest; do
      local blob="$CACHE/$name/blobs/${digest%%:*}/${digest#*:}"
      comp=$((comp + $(stat -c %s "$blob")))
      unpacked=$((unpacked + $(gzip -dc "$blob" | wc -c)))
      n=$((n + 1))
    done < <(jq -r '.layers[].digest' "$CACHE/$name/blobs/sha256/${manifest#sha256:}")
    awk -v name="$name" -v n="$n" -v c="$comp" -v u="$unpacked" 'BEGIN {
      printf "%-16s %d layers  compressed %7.1f MB  unpacked %7.1f MB\n", name, n, c / 1e6, u / 1e6 }'

  done
}

[ "$#" -ge 1 ] || usage
verb="$1"
shift
case "$verb" in
  build)
    [ "$#" -gt 0 ] || set -- "${ALL[@]}"
    if all_present "$@"; then
      for name in "$@"; do log "$name: $CACHE/$name"; done
    else
      with_lock cmd_build "$@"
    fi
    ;;
  push)
    [ "$#" -ge 2 ] || usage
    cmd_push "$@"
    ;;
  info) cmd_info "$@" ;;
  path)
    [ "$#" -eq 1 ] || usage
    echo "$CACHE/$1"
    ;;
  *) usage ;;
esac
