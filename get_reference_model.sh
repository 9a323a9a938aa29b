#!/usr/bin/env bash
# Download the authors' PIPs++ reference checkpoint into ./reference_model (or $REF_MODEL_DEST).
# REF_MODEL_URL overrides the link (a mirror, or file:///path/to/reference_model.tar.gz for an offline copy).
# REF_MODEL_SHA256, when set, is the tarball's expected sha256; PYTHON (default python3) downloads the archive
# (pips2.utils.download, standard library only) and verifies the checkpoint.
# Nothing in the destination is touched until the archive holds only reference_model/model-*.pth files within
# the bounds of docs/MODELS.md and every one loads into the model (finite weights of the model's dtypes); then
# those files alone are moved in: nothing else in the destination is replaced or removed; another readable
# checkpoint of the same name is refused, and any other file of that name is kept as <name>.old.
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

command -v "$PY" >/dev/null 2>&1 || die "PYTHON=$PY: no such program (set PYTHON to the project's python)"
[ ! -e "$DEST" ] || [ -d "$DEST" ] || die "REF_MODEL_DEST=$DEST is a file, not a folder; nothing replaced"
case "$DEST" in /*) dest_abs="$DEST" ;; *) dest_abs="$PWD/$DEST" ;; esac  # judged for links of other users

want_sha=""
if [ -n "${REF_MODEL_SHA256:-}" ]; then
  want_sha="$(printf '%s' "$REF_MODEL_SHA256" | tr 'A-F' 'a-f')"
  [[ "$want_sha" =~ ^[0-9a-f]{64}$ ]] || die "REF_MODEL_SHA256 must be 64 hex digits, got '$REF_MODEL_SHA256'"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/refmodel.XXXXXX")"
stage=""  # the temp folder inside $DEST, once there is one
cleanup() { rm -rf "$work"; if [ -n "$stage" ]; then rm -rf "$stage"; fi; }
trap cleanup EXIT
echo "downloading $URL"
# pips2.utils.download fetches (temp file, size, Content-Length and sha256 checked), checks every header, then
# unpacks the model-*.pth files of reference_model/ into $work/reference_model; it needs no torch, so a Python
# without it is reported below, when the checkpoint is verified. Run from the repository root so the project's
# copy is used.
(cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pips2.utils.download "$URL" "$work" "$want_sha" "$dest_abs") \
  || exit 1
unpacked="$work"

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
for ck in "$unpacked"/reference_model/model-*.pth; do
  name="$(basename "$ck")"
  if [ -d "$DEST/$name" ] && [ ! -L "$DEST/$name" ]; then
    die "$DEST/$name is a folder, not a checkpoint; nothing replaced"
  fi
done
# stage inside $DEST so that each final step is a rename on one file system, never a half-written file
stage="$(mktemp -d "$DEST/.refmodel.XXXXXX")"
for ck in "$unpacked"/reference_model/model-*.pth; do
  mv -f "$ck" "$stage/"
done
# a file of that name that is not this very checkpoint: another readable checkpoint (a training run's own
# model-000200000.pth, another model) is the user's, and nothing is installed over it; anything else (a damaged
# earlier download, a link) is kept beside as <name>.old
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
verdict() {  # run from the repository root, as the verification: the paths must not be relative to the caller's
  (new="$(absolute "$1")" old="$(absolute "$2")"
   cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$new" "$old" <<'EOF'
import hashlib
import os
import sys

new, old = sys.argv[1], sys.argv[2]


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


if not os.path.lexists(old):
    print("none")
elif os.path.islink(old) or not os.path.isfile(old):
    print("aside")
elif os.path.getsize(old) == os.path.getsize(new) and digest(old) == digest(new):
    print("same")
else:
    try:
        from pips2.utils.checkpoint import CheckpointError, read_checkpoint

        read_checkpoint(old)
        print("checkpoint")
    except CheckpointError as e:  # damaged: kept aside; unreadable here (memory, permissions): not judged
        print("unknown" if e.local else "aside")
    except Exception:
        print("unknown")
EOF
  )
}
for ck in "$stage"/model-*.pth; do  # every target judged once, before any is replaced
  target="$DEST/$(basename "$ck")"
  fate="$(verdict "$ck" "$target")" || die "cannot compare $target with the new checkpoint; nothing replaced"
  case "$fate" in
    none|same|aside) printf '%s' "$fate" > "$ck.fate" ;;
    checkpoint) die "$target is another checkpoint (a training run's own?), not this one; nothing replaced: move it aside or give another REF_MODEL_DEST" ;;
    *) die "cannot tell whether $target is another checkpoint (it cannot be read here); nothing replaced" ;;
  esac
done
for ck in "$stage"/model-*.pth; do
  target="$DEST/$(basename "$ck")"
  fate="$(cat "$ck.fate")" || die "lost the verdict on $target; nothing more replaced"
  if [ "$fate" = aside ]; then
    keep="$target.old"; n=1
    while [ -e "$keep" ] || [ -L "$keep" ]; do keep="$target.old.$n"; n=$((n + 1)); done
    mv "$target" "$keep"
    echo "kept the earlier $target as $keep (it is not this checkpoint)"
  fi
  chmod go-w "$ck"  # a default checkpoint others may rewrite in place is refused by the loader
  mv -f "$ck" "$target"
done
echo "reference model in $DEST:"
ls -l "$DEST/" | tail -n +2  # the folder's files, also when $DEST is a link to it
