#!/usr/bin/env bash
# launch/test.sh: install + build (launch/setup.sh, same arguments), then run
# every test with ctest. GPU tests skip with a reason where no GPU is present.
# Ends with one summary line: "loom tests: PASSED ..." or "loom tests: FAILED ...".
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Only --build-dir matters here; setup.sh validates everything else.
build_dir="${repo_root}/build"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -h | --help)
      printf 'Usage: launch/test.sh [launch/setup.sh options]\n'
      printf 'Runs launch/setup.sh with these options, then ctest in the build folder.\n'
      printf 'Environment: CTEST_TIMEOUT (default per-test limit, s; default 600), JOBS.\n\n'
      exec "${repo_root}/launch/setup.sh" --help ;;
    --build-dir) if ((i + 1 < ${#args[@]})); then build_dir="${args[i + 1]}"; fi ;;
    --build-dir=*) build_dir="${args[i]#--build-dir=}" ;;
    --) break ;;
  esac
done

# mpirun as root (CI containers) and with more ranks than cores (2-core CI).
export OMPI_ALLOW_RUN_AS_ROOT="${OMPI_ALLOW_RUN_AS_ROOT:-1}"
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}"
export OMPI_MCA_rmaps_base_oversubscribe="${OMPI_MCA_rmaps_base_oversubscribe:-1}"

start=${SECONDS}
setup_status=0
"${repo_root}/launch/setup.sh" "$@" || setup_status=$?
built=${SECONDS}
if ((setup_status != 0)); then
  printf 'loom tests: FAILED: launch/setup.sh (install/configure/build) exited %s after %s s; no tests run\n' \
    "${setup_status}" "$((built - start))"
  exit "${setup_status}"
fi

jobs="${JOBS:-$(nproc)}"
timeout="${CTEST_TIMEOUT:-600}"  # tests that set their own TIMEOUT keep it
printf '==> test: ctest in %s (%s parallel, default per-test timeout %s s)\n' "${build_dir}" "${jobs}" "${timeout}"
log="$(mktemp)"
trap 'rm -f "${log}"' EXIT
status=0
ctest --test-dir "${build_dir}" --output-on-failure --no-tests=error \
  -j "${jobs}" --timeout "${timeout}" 2>&1 | tee "${log}" || status=$?

# ctest hides the output of skipped tests; show why each was skipped (GTEST_SKIP).
last_test_log="${build_dir}/Testing/Temporary/LastTest.log"
if [[ -f "${last_test_log}" ]] && grep -q ': Skipped$' "${last_test_log}"; then
  printf '==> test: skipped tests, and why:\n'
  awk '/: Skipped$/ { where = $1; getline; printf "    %s %s\n", where, $0 }' "${last_test_log}"
fi

result="$(grep -E '[0-9]+% tests passed' "${log}" | tail -n 1 || true)"
[[ -n "${result}" ]] || result="no ctest result line (see above)"
skipped="$(grep -cE '^[[:space:]]+[0-9]+ - .*\(Skipped\)$' "${log}" || true)"
((skipped == 0)) || result="${result}, ${skipped} skipped"
timing="build $((built - start)) s, tests $((SECONDS - built)) s"
if ((status == 0)); then
  printf 'loom tests: PASSED: %s (%s)\n' "${result}" "${timing}"
else
  printf 'loom tests: FAILED (ctest exit %s): %s (%s)\n' "${status}" "${result}" "${timing}"
fi
exit "${status}"
