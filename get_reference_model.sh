#!/usr/bin/env bash
# Download the authors' PIPs++ reference checkpoint into ./reference_model (or $REF_MODEL_DEST).
# REF_MODEL_URL overrides the link (a mirror, or file:///path/to/reference_model.tar.gz for an offline copy).
set -euo pipefail

URL="${REF_MODEL_URL:-https://www.dropbox.com/scl/fi/czdlt2zc2ji2b7zd0pvoe/reference_model.tar.gz?rlkey=56ebq4g5dk01kyq8kuismev14}"
DEST="${REF_MODEL_DEST:-./reference_model}"
# a Dropbox share link serves a web page unless asked for the file itself
case "$URL" in
  *dropbox.com*dl=*) ;;
  *dropbox.com*\?*) URL="$URL&dl=1" ;;
esac

die() { echo "get_reference_model.sh: $*" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/refmodel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tarball="$work/reference_model.tar.gz"

echo "downloading $URL"
if command -v curl >/dev/null 2>&1; then
  curl -fSL --retry 3 -o "$tarball" "$URL" || die "download failed: $URL"
elif command -v wget >/dev/null 2>&1; then
  wget -q -O "$tarball" "$URL" || die "download failed: $URL"
else
  die "neither curl nor wget is installed"
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

tar -xzf "$tarball" -C "$work"
mkdir -p "$DEST"
for f in "$work"/reference_model/*; do
  name="$(basename "$f")"
  mv -f "$f" "$DEST/.$name.tmp" && mv -f "$DEST/.$name.tmp" "$DEST/$name"
done
echo "reference model in $DEST:"
ls -l "$DEST" | tail -n +2
