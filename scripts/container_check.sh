#!/usr/bin/env bash
# Build the Docker image for real and show that it works, on a machine without a Docker engine (as root):
#   1. base image: Debian bookworm by debootstrap (python3 + venv + pip), committed as localhost/pybase:bookworm
#      with buildah. Built once and kept (--rebuild-base to redo it).
#   2. the Dockerfile, built by `buildah bud` (vfs storage, chroot isolation) on that base. The machine's pip
#      settings reach the RUN steps only through a mounted pip config (/etc/xdg/pip: find-links = the local CPU
#      torch wheel, cert = a copy of the host CA bundle, a constraint pinning that wheel); nothing of it is
#      committed. `buildah bud --env` does not reach RUN steps in buildah 1.28, hence the mount.
#   3. in the container (`buildah run` ignores ENTRYPOINT/CMD, so they are prepended here): `pancls --help`,
#      the image's contract (non-root, dcm2niix, torch, no pip config left), and `pancls predict` with a small
#      model (trained here on the host with `pancls cv` on a tiny synthetic cohort) on the real NIfTI+mask fixture,
#      whose probabilities must equal the host's run of the same command within 1e-5.
# Not part of `make test`: it needs root, the network (Debian mirror, PyPI) and a few minutes.
#
# Usage: scripts/container_check.sh [--rebuild-base] [--keep-image] [--reuse-image] [--torch-base] [--worktree]
#   The image is built from a snapshot of a commit (CHECK_REF, default HEAD; `git archive`), and the host side
#   runs that same snapshot (PYTHONPATH), so the result names one commit and no half-saved edit gets in.
#   --worktree:    build and run the working tree as it is instead.
#   --reuse-image: skip the build when the image exists (kept by an earlier --keep-image run).
#   --torch-base:  build on a base that already has torch (the base plus torch 2.13.0+cpu and an older sympy in
#                  the system Python), standing in for the CUDA image: the image must keep both.
# Env:   CHECK_DIR (work folder, default ~/.cache/pancls-container-check), SHARED_DATA (default ../shared/data),
#        DEBIAN_MIRROR (default: the mirror apt uses), TORCH_WHEEL (default: the CPU wheel in pip's find-links).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

REBUILD_BASE=0
KEEP_IMAGE=0
REUSE_IMAGE=0
TORCH_BASE=0
WORKTREE=0
for arg in "$@"; do
    case "$arg" in
        --rebuild-base) REBUILD_BASE=1 ;;
        --keep-image) KEEP_IMAGE=1 ;;
        --reuse-image) REUSE_IMAGE=1; KEEP_IMAGE=1 ;;
        --torch-base) TORCH_BASE=1 ;;
        --worktree) WORKTREE=1 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "container_check: unknown option $arg" >&2; exit 2 ;;
    esac
done

CHECK_DIR=${CHECK_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pancls-container-check}
SHARED_DATA=${SHARED_DATA:-$(cd "$REPO/.." && pwd)/shared/data}
FIXTURE=${FIXTURE:-$SHARED_DATA/ct/abdomen/example_ct_sm.nii.gz}
FIXTURE_MASK=${FIXTURE_MASK:-$SHARED_DATA/ct/abdomen/pancreas_mask.nii.gz}
BASE=localhost/pybase:bookworm
IMAGE=localhost/pancls:check
TORCH_BASE_IMAGE=localhost/pybase-torch:bookworm
BASE_TORCH_SYMPY=1.13.3   # torch 2.13 accepts it; requirements.lock pins a newer one
HOST_PY=$REPO/.venv/bin/python
CHECK_REF=${CHECK_REF:-HEAD}
TOL=1e-5

bh() { buildah --storage-driver vfs "$@"; }
T0=$(date +%s)
step_start=$T0
step() {  # step NAME: print the previous step's duration and start a new one
    local now; now=$(date +%s)
    [ -n "${STEP_NAME:-}" ] && printf '   [%s: %d s]\n' "$STEP_NAME" $((now - step_start))
    STEP_NAME=$1; step_start=$now
    printf '\n== %s\n' "$1"
}
fail() { echo "container_check: FAIL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (buildah with vfs storage and chroot isolation)"
mkdir -p "$CHECK_DIR"

step "prerequisites"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null
fi
buildah --version
[ -x "$HOST_PY" ] || make -C "$REPO" venv
if [ "$WORKTREE" = 1 ]; then
    CONTEXT=$REPO
    echo "source: the working tree of $REPO (git $(git -C "$REPO" rev-parse --short HEAD), uncommitted changes included)"
    host_pancls() { "$HOST_PY" -m pancls "$@"; }
else
    CONTEXT=$CHECK_DIR/context
    rm -rf "$CONTEXT"; mkdir -p "$CONTEXT"
    git -C "$REPO" archive --format=tar "$CHECK_REF" | tar -x -C "$CONTEXT"
    echo "source: commit $(git -C "$REPO" rev-parse --short "$CHECK_REF") ($(git -C "$REPO" log -1 --format=%s "$CHECK_REF" | cut -c1-90))"
    # the host runs the same snapshot: PYTHONPATH comes before the repo's editable install
    host_pancls() { PYTHONPATH="$CONTEXT" "$HOST_PY" -P -m pancls "$@"; }  # -P: not the cwd (the repo) first
    origin=$(PYTHONPATH="$CONTEXT" "$HOST_PY" -P -c 'import pancls; print(pancls.__file__)')
    case "$origin" in "$CONTEXT"/*) ;; *) fail "the host imports pancls from $origin, not the snapshot";; esac
fi
[ -f "$FIXTURE" ] && [ -f "$FIXTURE_MASK" ] || fail "fixture not found: $FIXTURE, $FIXTURE_MASK (set SHARED_DATA)"
df -h "$CHECK_DIR" | tail -1
HAVE_PREDICT=1
if ! host_pancls predict --help >/dev/null 2>&1; then
    HAVE_PREDICT=0
    echo "note: this checkout has no 'pancls predict' yet: the predict comparison will be skipped (and the check incomplete)"
fi

# ------------------------------------------------------------------------------------------------ 1. base
step "pip config for the build (mounted on /etc/xdg/pip, not committed)"
PIPCONF=$CHECK_DIR/pipconf
rm -rf "$PIPCONF"; mkdir -p "$PIPCONF/wheels"
if [ -z "${TORCH_WHEEL:-}" ]; then
    for dir in $(pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-} /opt/wheels; do
        TORCH_WHEEL=$(ls "$dir"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1) && [ -n "$TORCH_WHEEL" ] && break
    done
fi
[ -n "${TORCH_WHEEL:-}" ] && [ -f "$TORCH_WHEEL" ] || fail "the CPU torch 2.13.0 wheel for Python 3.11 was not found (set TORCH_WHEEL)"
ln "$TORCH_WHEEL" "$PIPCONF/wheels/" 2>/dev/null || cp "$TORCH_WHEEL" "$PIPCONF/wheels/"
cp "$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)' 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)" "$PIPCONF/ca.crt" 2>/dev/null \
    || cp /etc/ssl/certs/ca-certificates.crt "$PIPCONF/ca.crt"
echo "torch==2.13.0+cpu" > "$PIPCONF/constraints.txt"
cat > "$PIPCONF/pip.conf" <<'EOF'
[global]
find-links = /etc/xdg/pip/wheels
cert = /etc/xdg/pip/ca.crt
constraint = /etc/xdg/pip/constraints.txt
EOF
echo "wheel: $(basename "$TORCH_WHEEL")"

cached() {  # cached IMAGE: true when IMAGE exists and --rebuild-base was not given (then it is removed first)
    if bh inspect --type image "$1" >/dev/null 2>&1; then
        if [ "$REBUILD_BASE" = 1 ]; then bh rmi "$1" >/dev/null; return 1; fi
        echo "cached: $1 (--rebuild-base to redo it)"
        return 0
    fi
    return 1
}

step "base image $BASE (debootstrap)"
if ! cached "$BASE"; then
    # the mirror apt uses (deb822 .sources or a one-line sources.list), else Debian's CDN
    MIRROR=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | sed -n 's/^URIs: *//p; s/^deb \(http[^ ]*\) bookworm .*/\1/p' | grep '/debian/*$' | head -1 || true)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    echo "mirror: $MIRROR"
    rootfs=$CHECK_DIR/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$MIRROR" > "$CHECK_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$CHECK_DIR/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    ctr=$(bh from scratch)
    mnt=$(bh mount "$ctr")
    cp -a "$rootfs"/. "$mnt"/
    bh umount "$ctr" >/dev/null
    bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    bh commit -q "$ctr" "$BASE" >/dev/null
    bh rm "$ctr" >/dev/null
    rm -rf "$rootfs"
fi
bh images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$BASE"

if [ "$TORCH_BASE" = 1 ]; then
    step "base with torch $TORCH_BASE_IMAGE (stand-in for the CUDA image)"
    if ! cached "$TORCH_BASE_IMAGE"; then
        ctr=$(bh from -q "$BASE")
        bh run --isolation chroot -v "$PIPCONF:/etc/xdg/pip:ro" "$ctr" -- \
            pip3 install -q --no-cache-dir --break-system-packages torch==2.13.0+cpu "sympy==$BASE_TORCH_SYMPY"
        bh commit -q "$ctr" "$TORCH_BASE_IMAGE" >/dev/null
        bh rm "$ctr" >/dev/null
    fi
    bh images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$TORCH_BASE_IMAGE"
    BASE=$TORCH_BASE_IMAGE
    IMAGE=localhost/pancls:check-torchbase
fi

# ------------------------------------------------------------------------------------------------ 2. image
step "buildah bud $IMAGE"
bud_start=$(date +%s)
if [ "$REUSE_IMAGE" = 1 ] && bh inspect --type image "$IMAGE" >/dev/null 2>&1; then
    echo "reused: $IMAGE (not rebuilt)"
elif ! bh bud --isolation chroot --layers=false \
        --build-arg BASE_IMAGE="$BASE" \
        -v "$PIPCONF:/etc/xdg/pip:ro" \
        -t "$IMAGE" "$CONTEXT" > "$CHECK_DIR/build.log" 2>&1; then
    tail -40 "$CHECK_DIR/build.log"; fail "buildah bud (log: $CHECK_DIR/build.log)"
else
    grep -E '^STEP|base image torch|^Successfully installed|^pancls |^/.*dcm2niix$|^COMMIT' "$CHECK_DIR/build.log" | cut -c1-200
fi
BUILD_S=$(( $(date +%s) - bud_start ))
bh rmi --prune >/dev/null 2>&1 || true
IMAGE_SIZE=$(bh images --format '{{.Size}}' "$IMAGE" | head -1)
echo "built in ${BUILD_S} s, image $IMAGE_SIZE"

# ------------------------------------------------------------------------------------------------ 3. run
step "container: pancls --help (ENTRYPOINT + CMD)"
# buildah run ignores ENTRYPOINT/CMD: read them from the image and prepend them.
bh inspect --type image "$IMAGE" > "$CHECK_DIR/image.json"
config_list() { python3 -c 'import json,sys; [print(a) for a in json.load(open(sys.argv[1]))["OCIv1"]["config"].get(sys.argv[2]) or []]' "$CHECK_DIR/image.json" "$1"; }
mapfile -t ENTRY < <(config_list Entrypoint)
mapfile -t DEFAULT_CMD < <(config_list Cmd)
echo "ENTRYPOINT ${ENTRY[*]}  CMD ${DEFAULT_CMD[*]}"
[ "${ENTRY[*]}" = pancls ] || fail "ENTRYPOINT is not [\"pancls\"]"
CTR=$(bh from -q "$IMAGE")
cleanup() { bh rm "$CTR" >/dev/null 2>&1 || true; }
trap cleanup EXIT
OUT=$CHECK_DIR/out
rm -rf "$OUT"; mkdir -p "$OUT"; chmod 777 "$OUT"
crun() { bh run --isolation chroot "$@"; }
crun "$CTR" -- "${ENTRY[@]}" "${DEFAULT_CMD[@]}" | head -40

step "container: the image's contract"
uid=$(crun "$CTR" -- id -u)
echo "uid in the container: $uid ($(crun "$CTR" -- id -un))"
[ "$uid" != 0 ] || fail "the container runs as root"
crun "$CTR" -- sh -c 'echo "workdir: $(pwd)"; echo "PANCLS_CACHE=$PANCLS_CACHE"; command -v pancls; command -v dcm2niix; dcm2niix -v 2>&1 | grep -m1 -i "version" || true'
crun "$CTR" -- python -c 'import torch, monai, numpy, pancls; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "monai", monai.__version__, "numpy", numpy.__version__, "pancls", pancls.__version__)'
# the build's mounted pip config leaves an empty mount point and nothing else: no config file, no wheel,
# no CA copy, no index/find-links/cert/constraint settings in the environment
crun "$CTR" -- sh -c 'test -z "$(ls -A /etc/xdg/pip 2>/dev/null)" && test ! -e /etc/pip.conf \
    && ! pip config list | grep -v "^:env:" | grep -q . \
    && ! env | grep -qE "^PIP_(INDEX_URL|EXTRA_INDEX_URL|FIND_LINKS|CERT|CONSTRAINT|TRUSTED_HOST)=" \
    && echo "no pip config, index or certificate left in the image"' \
    || fail "a pip config was committed into the image"
# every installed version is the lock's: requirements.lock on a base without torch; on a base with torch,
# requirements-notorch.lock, and torch and sympy are the base's (not in the venv, not the lock's sympy)
crun "$CTR" -- python -m pip freeze --all --exclude-editable 2>/dev/null > "$OUT/image_freeze.txt"
crun "$CTR" -- python -c 'import torch, sympy; print(torch.__file__); print(sympy.__version__)' > "$OUT/torch_origin.txt"
python3 - "$OUT/image_freeze.txt" "$CONTEXT/requirements.lock" "$CONTEXT/requirements-notorch.lock" "$TORCH_BASE" \
    "$OUT/torch_origin.txt" "$BASE_TORCH_SYMPY" <<'EOF'
import re, sys
def pins(path):
    out = {}
    for line in open(path):
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;#]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2].split("+")[0]
    return out
image, full, notorch = (pins(p) for p in sys.argv[1:4])
torch_base = sys.argv[4] == "1"
torch_file, sympy_version = open(sys.argv[5]).read().split()
lock, lock_name = (notorch, "requirements-notorch.lock") if torch_base else (full, "requirements.lock")
missing = sorted(set(notorch) - set(image))
wrong = {n: f"{image[n]} (lock {v})" for n, v in lock.items() if n in image and image[n] != v}
if missing or wrong:
    sys.exit(f"FAIL: missing {missing}, versions differ from {lock_name}: {wrong}")
compared = len([n for n in lock if n in image])
print(f"installed versions = {lock_name} ({compared} packages); torch from {torch_file}")
if torch_base:
    if "/opt/pancls/venv/" in torch_file or sympy_version != sys.argv[6]:
        sys.exit(f"FAIL: the base's torch/sympy were replaced: {torch_file}, sympy {sympy_version}")
    print(f"the base's torch and sympy {sympy_version} were kept (the full lock pins sympy {full.get('sympy')})")
elif not torch_file.startswith("/opt/pancls/venv/"):
    sys.exit(f"FAIL: torch not from the image's venv: {torch_file}")
EOF
crun "$CTR" -- python -m pip check || fail "pip check"

# ------------------------------------------------------------------------------------------------ 4. predict
if [ "$HAVE_PREDICT" = 0 ]; then
    step "predict"
    echo "SKIPPED: 'pancls predict' does not exist in this checkout yet"
    printf '\n== INCOMPLETE: image builds and runs; predict not compared. Total %d s, image %s\n' $(( $(date +%s) - T0 )) "$IMAGE_SIZE"
    exit 3
fi

step "small model on the host (pancls cv on a tiny synthetic cohort; kept in $CHECK_DIR/model)"
MODEL=$CHECK_DIR/model
if [ -f "$MODEL/summary.json" ]; then
    echo "cached: $MODEL"
else
    rm -rf "$CHECK_DIR/synth" "$MODEL" "$CHECK_DIR/cache"
    host_pancls synth --out "$CHECK_DIR/synth" --scale 0.01 --size 48 48 32 --spacing 4 4 4.5 \
        --dicom-subset 0 --workers 1 --no-progress
    cat > "$CHECK_DIR/tiny_cv.yaml" <<EOF
# The tests' tiny recipe (tests/conftest.py TINY_CV): seconds per fold on a CPU.
data: {manifest: $CHECK_DIR/synth/manifest.csv, cache_dir: $CHECK_DIR/cache}
preprocess: {spacing: [4.0, 4.0, 4.5], windows: [[400, 40]], roi: mask, margin_mm: 4.0, size: [16, 16, 8]}
augment: {affine_prob: 0.0, noise_prob: 0.0}
model: {backbone: resnet10, backbone_kwargs: {widen_factor: 0.125}, head: tsp}
train: {epochs: 3, batch_size: 6, optimizer: adamw, lr: 3.0e-3, warmup_epochs: 1, schedule: cosine,
        progress: false, weight_decay: 1.0e-4, wd_on_all: false}
cv: {folds: 4, inner_folds: 3, bootstrap: 50}
device: cpu
eval_batch_size: 12
EOF
    host_pancls cv --config "$CHECK_DIR/tiny_cv.yaml" --out "$MODEL" | tail -5
fi

step "pancls predict on the host"
# the host's versions should be the lock's too, or a difference could come from the host's venv
"$HOST_PY" -m pip freeze --all --exclude-editable 2>/dev/null | sed 's/+cpu$//' | tr 'A-Z_' 'a-z-' | sort > "$OUT/host_freeze.txt"
drift=$(grep -E '^[a-z]' "$CONTEXT/requirements.lock" | sort | comm -23 - "$OUT/host_freeze.txt" | tr '\n' ' ')
[ -z "$drift" ] && echo "host venv = requirements.lock" || echo "warning: the host venv differs from requirements.lock in: $drift"
FIX_DIR=$(dirname "$FIXTURE")
host_pancls predict --model "$MODEL" "$FIXTURE" --mask "$FIXTURE_MASK" --out "$OUT/host_preds.json"

step "pancls predict in the container (model on /runs/model, fixture on /data, both read-only)"
crun -v "$MODEL:/runs/model:ro" -v "$FIX_DIR:/data:ro" -v "$OUT:/out" "$CTR" -- \
    "${ENTRY[@]}" predict --model /runs/model "/data/$(basename "$FIXTURE")" \
    --mask "/data/$(basename "$FIXTURE_MASK")" --out /out/container_preds.json

step "compare probabilities (tolerance $TOL)"
python3 - "$OUT/host_preds.json" "$OUT/container_preds.json" "$TOL" <<'EOF'
import json, sys

def probabilities(node, found):
    """Every `probabilities` value in the document, in order (dict: by class name; list: as is)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "probabilities":
                found.append(value)
            else:
                probabilities(value, found)
    elif isinstance(node, list):
        for item in node:
            probabilities(item, found)
    return found

host_doc, ctr_doc = (json.load(open(p)) for p in sys.argv[1:3])
tol = float(sys.argv[3])
host, ctr = probabilities(host_doc, []), probabilities(ctr_doc, [])
if not host or len(host) != len(ctr):
    sys.exit(f"FAIL: {len(host)} studies with probabilities on the host, {len(ctr)} in the container")
worst = 0.0
for i, (h, c) in enumerate(zip(host, ctr)):
    if isinstance(h, dict):
        if set(h) != set(c):
            sys.exit(f"FAIL: study {i}: classes differ: {sorted(h)} vs {sorted(c)}")
        pairs = [(h[k], c[k]) for k in sorted(h)]
        names = sorted(h)
    else:
        pairs, names = list(zip(h, c)), [str(j) for j in range(len(h))]
    for name, (a, b) in zip(names, pairs):
        worst = max(worst, abs(float(a) - float(b)))
    print(f"study {i}: host      " + "  ".join(f"{n}={float(a):.6f}" for n, (a, _) in zip(names, pairs)))
    print(f"study {i}: container " + "  ".join(f"{n}={float(b):.6f}" for n, (_, b) in zip(names, pairs)))
print(f"max |host - container| = {worst:.2e} (tolerance {tol:g})")
sys.exit(0 if worst <= tol else "FAIL: probabilities differ beyond the tolerance")
EOF

step "done"
[ "$KEEP_IMAGE" = 1 ] || { cleanup; trap - EXIT; bh rmi "$IMAGE" >/dev/null; bh rmi --prune >/dev/null 2>&1 || true; echo "image removed (--keep-image keeps it)"; }
built=$([ "$REUSE_IMAGE" = 1 ] && echo "reused" || echo "built in $BUILD_S s")
printf '\n== PASS: image %s (%s), pancls --help and predict ran in the container, probabilities equal the host'"'"'s. Total %d s.\n' \
    "$built" "$IMAGE_SIZE" $(( $(date +%s) - T0 ))
