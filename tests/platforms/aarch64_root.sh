#!/bin/sh
# The CPU kernels on AArch64, emulated: a Debian arm64 root run by qemu-user, and
# tests/platforms/kernel_check.py in it (NumPy, Numba and the kernels only; no Keras).
#
#   sudo tests/platforms/aarch64_root.sh /work/arm64root            # forward + backward vs float64
#   sudo tests/platforms/aarch64_root.sh /work/arm64root --asm      # the tile's NEON assembly
#
# On a Debian or Ubuntu x86-64 host, as root; ROOT must lie outside the repository.
# Each step is skipped when already done:
#   1. apt-get install qemu-user-static debootstrap binfmt-support; binfmt_misc mounted,
#      qemu-aarch64 enabled.
#   2. debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv bookworm
#      ROOT (Python 3.11; about 4-10 minutes, downloads from deb.debian.org).
#   3. pip download (on the host, with $PYTHON) aarch64 wheels of numpy, numba, llvmlite for
#      Python 3.11 into ROOT/opt/wheels: the versions the host's $PYTHON has, else the newest.
#   4. chroot: python3 -m venv /opt/venv; pip install --no-index --find-links /opt/wheels.
#   5. The repository's files (tracked and untracked, not ignored) copied to ROOT/opt/fusedlstm
#      on every run; ROOT/proc mounted; kernel_check.py run with a fresh NUMBA_CACHE_DIR.
# Emulated, each kernel's first compile takes about half a minute to a minute.
set -eu
ROOT=${1:?usage: $0 ROOT [kernel_check.py options]}
shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
case "$(cd "$ROOT" 2>/dev/null && pwd || echo "$ROOT")/" in
    "$REPO"/*) echo "ROOT must lie outside the repository" >&2; exit 2 ;;
esac

if ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null \
        || ! command -v qemu-aarch64-static >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y qemu-user-static debootstrap binfmt-support
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

if [ ! -x "$ROOT/usr/bin/python3" ]; then
    mkdir -p "$ROOT"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv bookworm "$ROOT"
fi

if ! ls "$ROOT"/opt/wheels/numba-*aarch64*.whl >/dev/null 2>&1; then
    pins=$("$PYTHON" -c 'import numpy as a, numba as b, llvmlite as c
print(f"numpy=={a.__version__} numba=={b.__version__} llvmlite=={c.__version__}")' \
           2>/dev/null || echo "numpy numba llvmlite")
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --only-binary=:all: --platform manylinux_2_28_aarch64 \
        --python-version 3.11 $pins -d "$ROOT/opt/wheels"
fi

if ! chroot "$ROOT" /opt/venv/bin/python -c "import numba" 2>/dev/null; then
    chroot "$ROOT" /bin/sh -c "python3 -m venv /opt/venv && \
        /opt/venv/bin/pip install --no-index --find-links /opt/wheels numpy numba llvmlite"
fi

rm -rf "$ROOT/opt/fusedlstm"
mkdir -p "$ROOT/opt/fusedlstm"
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) \
    | tar -xf - -C "$ROOT/opt/fusedlstm"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
rm -rf "$ROOT/tmp/numba-cache"
exec chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root \
    NUMBA_CACHE_DIR=/tmp/numba-cache PYTHONUNBUFFERED=1 \
    /opt/venv/bin/python /opt/fusedlstm/tests/platforms/kernel_check.py "$@"
