#!/usr/bin/env bash
# launch/setup.sh: install loom's Debian 12 packages (only the missing ones) and
# build loom. Idempotent: with every package present it touches no package and
# only (re)builds. CUDA is never installed from apt; nvcc is used when it is on
# PATH or in /usr/local/cuda (see CMakeLists.txt, LOOM_CUDA=AUTO).
set -euo pipefail

# Everything loom needs from Debian's archive (ENVIRONMENT.md). No CUDA here.
LOOM_PACKAGES=(
  openmpi-bin libopenmpi-dev libhdf5-dev hdf5-tools libboost-dev libyaml-cpp-dev
  nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev libopenblas-dev
  gnuplot-nox jargon-text libgtest-dev libbenchmark-dev cmake g++ make pkg-config
)

usage() {
  cat <<'EOF'
Usage: launch/setup.sh [options] [-- extra cmake configure arguments]

Installs the missing Debian packages loom needs (apt-get, with sudo when not
root), then configures and builds loom with all cores.

Options:
  --debug            Debug build (default: Release, or $BUILD_TYPE when set)
  --cpu-only         do not build CUDA sources (-DLOOM_CUDA=OFF); default
                     LOOM_CUDA=AUTO builds them when nvcc is found
  --build-dir DIR    build folder (default: build/ in the repository root)
  --no-install       skip the package step (no dpkg/apt-get/sudo at all)
  -h, --help         show this help

Environment:
  BUILD_TYPE         CMake build type when --debug is not given (default Release)
  LOOM_CUDA          AUTO, ON or OFF when --cpu-only is not given (default AUTO)
  JOBS               parallel build jobs (default: nproc)
EOF
}

log() { printf '==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

build_type="${BUILD_TYPE:-Release}"
loom_cuda="${LOOM_CUDA:-AUTO}"
build_dir="${repo_root}/build"
install_packages=1
cmake_extra=()

while (($# > 0)); do
  case "$1" in
    --debug) build_type=Debug ;;
    --cpu-only) loom_cuda=OFF ;;
    --build-dir)
      (($# >= 2)) || die "--build-dir needs a folder"
      build_dir="$2"
      shift ;;
    --build-dir=*) build_dir="${1#--build-dir=}" ;;
    --no-install) install_packages=0 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; cmake_extra=("$@"); break ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done
[[ -n "${build_dir}" ]] || die "--build-dir needs a folder"
case "${loom_cuda}" in
  AUTO | ON | OFF) ;;
  *) die "LOOM_CUDA must be AUTO, ON or OFF (got '${loom_cuda}')" ;;
esac

# ---------------------------------------------------------------- packages ---

# Prints the packages of LOOM_PACKAGES that dpkg does not list as installed.
missing_packages() {
  local pkg status
  for pkg in "${LOOM_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null || true)"
    [[ "${status}" == *" ok installed" ]] || printf '%s\n' "${pkg}"
  done
}

install_missing_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    log "packages: no dpkg/apt-get on this machine; skipping the package step"
    log "          (the CMake dependency report below says what is missing)"
    return 0
  fi

  local missing
  mapfile -t missing < <(missing_packages)
  if ((${#missing[@]} == 0)); then
    log "packages: all ${#LOOM_PACKAGES[@]} Debian packages present; nothing to install"
    return 0
  fi
  log "packages: missing ${#missing[@]}: ${missing[*]}"

  local -a as_root=()
  if ((EUID != 0)); then
    if ! command -v sudo >/dev/null 2>&1; then
      {
        printf 'setup.sh: error: these Debian packages are missing and this script is neither\n'
        printf 'root nor able to use sudo (not installed):\n  %s\n' "${missing[*]}"
        printf 'Install them as root, then run launch/setup.sh again:\n'
        printf '  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends %s\n' "${missing[*]}"
        printf '(or pass --no-install to skip this step if they are provided another way)\n'
      } >&2
      exit 1
    fi
    as_root=(sudo)
  fi

  log "packages: apt-get update"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  log "packages: apt-get install ${missing[*]}"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"

  mapfile -t missing < <(missing_packages)
  ((${#missing[@]} == 0)) || die "still missing after apt-get install: ${missing[*]}"
  log "packages: installed"
}

# ------------------------------------------------------------------- build ---

build() {
  local jobs="${JOBS:-$(nproc)}"
  local nvcc=""
  if [[ "${loom_cuda}" != OFF ]]; then
    nvcc="$(command -v nvcc 2>/dev/null || true)"
    [[ -z "${nvcc}" && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
    if [[ -n "${nvcc}" ]]; then
      log "cuda: nvcc at ${nvcc}: CUDA sources will be compiled (LOOM_CUDA=${loom_cuda})"
    else
      log "cuda: no nvcc found: CPU-only build (LOOM_CUDA=${loom_cuda})"
    fi
  else
    log "cuda: disabled (LOOM_CUDA=OFF): CPU-only build"
  fi

  log "configure: ${build_dir} (${build_type}, LOOM_CUDA=${loom_cuda})"
  cmake -S "${repo_root}" -B "${build_dir}" \
    -DCMAKE_BUILD_TYPE="${build_type}" -DLOOM_CUDA="${loom_cuda}" "${cmake_extra[@]}"

  log "build: ${jobs} parallel jobs"
  cmake --build "${build_dir}" --parallel "${jobs}"
  log "build: done in ${build_dir}"
}

start=${SECONDS}
if ((install_packages)); then
  install_missing_packages
else
  log "packages: skipped (--no-install)"
fi
build
log "setup.sh: finished in $((SECONDS - start)) s"
