#!/usr/bin/env bash
# The paper's run on a GPU machine without network: `ctxload run` + `ctxload report` of
# scenarios/paper-h200.yaml, with vLLM 0.26.0 carried as a 3-part kit. One device call per
# step, back to back (a warm machine keeps /tmp only ~30 s after a call):
#
#   gpu-checks              (no kit) tests/gpu (PYTEST_K: those -k selects) and benchmarks/gpu/bench_conv1d.py
#                           (BENCH=0: not it), carrying .whl/
#   kit 1 .. kit 4          copy .kitN/ (a quarter of the kit from ../shared/gpu-reference/vllm-kit:
#                           `cat part-* | split -n 4 -d -a 2 - vk.`), assemble at the last
#   start [SCENARIO]        install .whl/ (ctxload's wheels, mamba_ssm's sdist), start the GPU exporter,
#                           start `ctxload run` in its own session (or --resume it), then wait
#   wait                    wait for the run (up to WAIT_S), then `ctxload report`; each call packs
#                           the run directory into $OUT/run.tar.gz, so nothing is lost between calls
#
# The run lives in /tmp/runs/$RUN_ID; a later session resumes it from the tarball (`start` finds
# .gpu/run.tar.gz, unpacks it and runs `ctxload run --resume`).
set -uo pipefail
REPO=$(pwd)
RUN_ID=${RUN_ID:-h200-paper}
RUNS=/tmp/runs
WAIT_S=${WAIT_S:-540}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$RUNS"

export PYTHONPATH=/tmp/site:$REPO HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export CTXLOAD_MODELS=/tmp/models CTXLOAD_VLLM_PYTHON=/tmp/vpy

pack() {
  [ -d "$RUNS/$RUN_ID" ] || return 0
  tar czf "$OUT/run.tar.gz" -C "$RUNS" "$RUN_ID" && ls -la "$OUT/run.tar.gz"
}

report() {
  python3 -m ctxload.cli report "$RUNS/$RUN_ID" > /tmp/report.log 2>&1; echo "report rc=$?"; tail -3 /tmp/report.log
}

wait_run() {
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do
    if ! kill -0 "$(cat /tmp/run.pid 2>/dev/null)" 2>/dev/null; then
      echo "== run ended"; grep -E "done:|Error|error:" /tmp/run.log | tail -5; report; pack; return 0
    fi
    sleep 10
  done
  echo "== still running after ${WAIT_S}s"; pack
}

install_site() {  # ctxload's wheels and mamba_ssm's Python (its Triton kernels) into /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  python3 -c "import typing_extensions as t, importlib.metadata as m; import sys; sys.exit(m.version('typing_extensions') < '4.14.1')" \
    || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cond/*.whl
  mkdir -p /tmp/build && tar xzf .whl/src/mamba_ssm-*.tar.gz -C /tmp/build && cp -r /tmp/build/mamba_ssm-*/mamba_ssm /tmp/site/
  python3 .whl/check_deps.py || echo "(check_deps: see above)"
}

case "${1:-}" in
  kit)
    # .kit1 .. .kit$KIT_CALLS: the kit's 3 parts cut into equal pieces (vk.00, vk.01, …; a call
    # carries at most 64 MiB with the working tree); the last call joins them, cuts them back
    # into make_kit.sh's parts and assembles
    mkdir -p /tmp/kit && cp ".kit$2"/* /tmp/kit/ && ls -la /tmp/kit
    if [ "$2" = "${KIT_CALLS:-4}" ]; then
      (cd /tmp/kit && cat vk.* > whole.tar && split -b 62914560 -a 2 whole.tar vllmkit-slim.tar.part- \
        && rm -f vk.* whole.tar)
      SKIP_CHECKS=${SKIP_CHECKS:-0} bash /tmp/kit/assemble.sh 2>&1 | tail -15
    fi
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv ;;
  gpu-checks)
    # no kit needed: the native backend's GPU tests and the prefill conv benchmark
    install_site || exit 1
    python3 -m pytest -q -p no:cacheprovider tests/gpu ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tail -15
    if [ "${BENCH:-1}" = 1 ]; then python3 benchmarks/gpu/bench_conv1d.py; fi ;;
  start)
    install_site || exit 1
    printf '#!/bin/sh\nPYTHONPATH=/tmp/vsite:$PYTHONPATH exec python3 "$@"\n' > /tmp/vpy && chmod +x /tmp/vpy
    /tmp/vpy -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
    python3 -c "import locust, pydantic; print('locust', locust.__version__, 'pydantic', pydantic.__version__)"
    python3 -c "from servers.ssm_server.mamba_kernels import import_mamba_ssm as f; print(f() or 'mamba_ssm: the native backend imports')"
    setsid python3 -m ctxload.cli serve gpu-exporter --port 9400 > /tmp/gpu-exporter.log 2>&1 < /dev/null &
    if [ -f .gpu/run.tar.gz ] && [ ! -d "$RUNS/$RUN_ID" ]; then tar xzf .gpu/run.tar.gz -C "$RUNS"; fi
    if [ -d "$RUNS/$RUN_ID" ]; then args=(--resume "$RUNS/$RUN_ID"); else args=("${2:-paper-h200}" --runs-dir "$RUNS" --run-id "$RUN_ID"); fi
    setsid python3 -m ctxload.cli run "${args[@]}" > /tmp/run.log 2>&1 < /dev/null &
    echo $! > /tmp/run.pid
    sleep 5; tail -3 /tmp/run.log
    wait_run; tail -25 /tmp/run.log ;;
  wait)
    wait_run; tail -30 /tmp/run.log ;;
  *) echo "usage: $0 kit N | gpu-checks | start [SCENARIO] | wait"; exit 2 ;;
esac
