# Sourced at the start of every command on the lent GPU machine (see studies/gpu/README.md).
# Installs the carried wheels once per machine (what a call installs under /tmp stays while it is warm),
# makes this checkout importable as `diffablate`, and keeps every cache under /tmp.
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg DIFFABLATE_CACHE=/tmp/dcache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
[ -f .commit ] && export DIFFABLATE_COMMIT=$(cut -d" " -f1 .commit) DIFFABLATE_DIRTY=$(cut -d" " -f2 .commit)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f /tmp/site/.installed ]; then
  [ -d .whl ] || { echo "env.sh: no .whl here and none installed" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || exit 1
fi
mkdir -p /tmp/pkg /tmp/keep "$DIFFABLATE_CACHE/weights" && ln -sfn "$PWD" /tmp/pkg/diffablate
export PYTHONPATH=/tmp/site:/tmp/pkg
D() { python3 -m diffablate.studies.cli "$@"; }
# The converted FID weights travel in slices (studies/gpu/README.md); assemble them once all are here.
fid_weights() {
  local w="$DIFFABLATE_CACHE/weights/fid-inception-2015-12-05.pth"
  for d in .fidw1 .fidw2; do [ -d "$d" ] && cp -n "$d"/part* /tmp/keep/; done
  if [ ! -f "$w" ] && [ -f /tmp/keep/part00 ] && [ -f /tmp/keep/part01 ] && [ -f /tmp/keep/part02 ]; then
    cat /tmp/keep/part00 /tmp/keep/part01 /tmp/keep/part02 > "$w.tmp" && mv "$w.tmp" "$w"
  fi
  [ -f "$w" ] && sha256sum "$w"
}
