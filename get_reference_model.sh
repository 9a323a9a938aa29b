#!/usr/bin/env bash
# Download the authors' PIPs++ reference checkpoint into ./reference_model (or $REF_MODEL_DEST).
# REF_MODEL_URL overrides the link (a mirror, or file:///path/to/reference_model.tar.gz for an offline copy).
# REF_MODEL_SHA256, when set, is the tarball's expected sha256; PYTHON (default python3) verifies the checkpoint.
# Nothing in the destination is replaced until the archive holds only plain files and folders and every
# model-*.pth in it loads into the model.
set -euo pipefail

URL="${REF_MODEL_URL:-https://www.dropbox.com/scl/fi/czdlt2zc2ji2b7zd0pvoe/reference_model.tar.gz?rlkey=56ebq4g5dk01kyq8kuismev14}"
DEST="${REF_MODEL_DEST:-./reference_model}"
PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# a Dropbox share link serves a web page unless asked for the file itself
case "$URL" in
  *dropbox.com*dl=*) ;;
  *dropbox.com*\?*) URL="$URL&dl=1" ;;
esac

die() { echo "get_reference_model.sh: $*" >&2; exit 1; }

want_sha=""
if [ -n "${REF_MODEL_SHA256:-}" ]; then
  want_sha="$(printf '%s' "$REF_MODEL_SHA256" | tr 'A-F' 'a-f')"
  [[ "$want_sha" =~ ^[0-9a-f]{64}$ ]] || die "REF_MODEL_SHA256 must be 64 hex digits, got '$REF_MODEL_SHA256'"
fi

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  elif command -v shasum >/dev/null 2>&1; then
    shasum -a 256 "$1" | cut -d' ' -f1
  else
    "$PY" -I -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
  fi
}

work="$(mktemp -d "${TMPDIR:-/tmp}/refmodel.XXXXXX")"
stage=""  # the temp folder inside $DEST, once there is one
cleanup() { rm -rf "$work"; if [ -n "$stage" ]; then rm -rf "$stage"; fi; }
trap cleanup EXIT
tarball="$work/reference_model.tar.gz"

echo "downloading $URL"
if command -v curl >/dev/null 2>&1; then
  curl -fSL --retry 3 -o "$tarball" "$URL" || die "download failed: $URL"
elif command -v wget >/dev/null 2>&1; then
  wget -q -O "$tarball" "$URL" || die "download failed: $URL"
else
  die "neither curl nor wget is installed"
fi

if [ -n "$want_sha" ]; then
  got_sha="$(sha256_of "$tarball")"
  [ "$got_sha" = "$want_sha" ] \
    || die "sha256 mismatch: $URL has $got_sha, REF_MODEL_SHA256 is $want_sha; nothing replaced"
fi

gzip -t "$tarball" 2>/dev/null || die "$URL is not a gzip file (got $(head -c 60 "$tarball" | tr -cd '[:print:]' | head -c 60)...)"
listing="$(tar -tzf "$tarball" 2>/dev/null)" || die "$URL is not a tar.gz archive"
if printf '%s\n' "$listing" | grep -Eq '(^/|(^|/)\.\.(/|$))'; then
  die "archive holds unsafe paths (absolute or ..); refusing it"
fi
if printf '%s\n' "$listing" | grep -Ev '^reference_model(/|$)' | grep -q .; then
  die "archive holds files outside reference_model/; refusing it"
fi
printf '%s\n' "$listing" | grep -Eq '^reference_model/model-[0-9]+\.pth$' \
  || die "archive holds no reference_model/model-*.pth checkpoint"

# Links could point anywhere (a symlink installed as model-*.pth, a hard link to a system file) and a FIFO
# makes every later reader hang: only regular files and folders are accepted. tar's listing does not say a
# member's type reliably, tarfile does; it rechecks the names too, as a name with a newline fools grep.
# -I: a tarfile.py in the caller's cwd must not stand in for the standard library's.
"$PY" -I - "$tarball" <<'EOF' || exit 1
import sys
import tarfile

KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.FIFOTYPE: "FIFO",
         tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device"}
with tarfile.open(sys.argv[1], "r:gz") as tf:
    for m in tf:
        parts = m.name.split("/")
        if m.name.startswith("/") or ".." in parts:
            sys.exit("get_reference_model.sh: archive holds unsafe paths (absolute or ..); refusing it")
        if parts[0] != "reference_model":
            sys.exit("get_reference_model.sh: archive holds files outside reference_model/; refusing it")
        if not (m.isreg() or m.isdir()):
            kind = KINDS.get(m.type, f"member of type {m.type!r}")
            to = f" to {m.linkname!r}" if m.issym() or m.islnk() else ""
            sys.exit(f"get_reference_model.sh: archive member {m.name!r} is a {kind}{to}, not a regular file "
                     f"or folder; refusing it")
EOF

unpacked="$work/x"
mkdir "$unpacked"
tar -xzf "$tarball" -C "$unpacked" --no-same-owner --no-same-permissions
# should tar and tarfile ever read the archive differently, what tar made is checked too
odd="$(find "$unpacked" -mindepth 1 \( ! -type f ! -type d \) -print -quit)"
[ -z "$odd" ] || die "archive unpacked to ${odd#"$unpacked"/}, which is not a regular file or folder; refusing it"

for ck in "$unpacked"/reference_model/model-*.pth; do
  name="reference_model/$(basename "$ck")"
  # run from the repository root so utils/ and nets/ import whatever the caller's cwd
  (cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$ck" "$name" <<'EOF') || exit 1
import sys

path, name = sys.argv[1], sys.argv[2]
try:
    from pips2.nets.pips2 import Pips
    from pips2.utils.checkpoint import CheckpointError, load_model_state, read_checkpoint
except ImportError as e:
    sys.exit(f"get_reference_model.sh: cannot verify {name}: {e} (set PYTHON to the project's python); "
             f"nothing replaced")
try:
    ckpt = read_checkpoint(path)
    load_model_state(Pips(), ckpt["model_state_dict"], source=name)
except CheckpointError as e:
    msg = " ".join(str(e).replace(path, name).split())
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    sys.exit(f"get_reference_model.sh: {msg}; nothing replaced")
EOF
done

mkdir -p "$DEST"
# stage inside $DEST so that each final step is a rename on one file system, never a half-written file
stage="$(mktemp -d "$DEST/.refmodel.XXXXXX")"
for f in "$unpacked"/reference_model/*; do
  mv -f "$f" "$stage/"
done
for f in "$stage"/*; do
  name="$(basename "$f")"
  if [ -d "$f" ] && [ -d "$DEST/$name" ]; then
    rm -rf "${DEST:?}/$name"  # mv would otherwise put the new folder inside the old one
  fi
  mv -f "$f" "$DEST/$name"
done
echo "reference model in $DEST:"
ls -l "$DEST" | tail -n +2
