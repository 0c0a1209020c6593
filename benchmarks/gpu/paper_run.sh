#!/usr/bin/env bash
# The paper's run on a GPU machine without network: `ctxload run` + `ctxload report` of
# scenarios/paper-h200.yaml, with vLLM 0.26.0 carried as a 3-part kit. One device call per
# step, back to back (a warm machine keeps /tmp only ~30 s after a call):
#
#   gpu-checks              (no kit) tests/gpu (PYTEST_K: those -k selects) and benchmarks/gpu/bench_conv1d.py
#                           (BENCHES: other scripts of benchmarks/gpu; BENCH=0: none), carrying .whl/
#   kit 1 .. kit 4          copy .kitN/ (a quarter of the kit from ../shared/gpu-reference/vllm-kit:
#                           `cat part-* | split -n 4 -d -a 2 - vk.`), assemble at the last
#   start [SCENARIO]        install .whl/ (ctxload's wheels, mamba_ssm's sdist), start the GPU exporter,
#                           start `ctxload run` in its own session (or --resume it), then wait
#   probe                   a short `ctxload run` (PROBE: a scenario, default probe/overlap-64.yaml) with a
#                           watchdog: requests held and no token made for STALL_S (or not ready
#                           WARM_S after listening) → every server thread's stack
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

start_exporter() {  # the GPU exporter the scenarios scrape (extra_urls gpu: 127.0.0.1:9400)
  curl -sf 127.0.0.1:9400/metrics > /dev/null && return 0
  setsid python3 -m ctxload.cli serve gpu-exporter --port 9400 > /tmp/gpu-exporter.log 2>&1 < /dev/null &
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
    if [ "${BENCH:-1}" = 1 ]; then
      for b in ${BENCHES:-bench_conv1d.py}; do python3 "benchmarks/gpu/$b"; done
    fi ;;
  start)
    install_site || exit 1
    printf '#!/bin/sh\nPYTHONPATH=/tmp/vsite:$PYTHONPATH exec python3 "$@"\n' > /tmp/vpy && chmod +x /tmp/vpy
    /tmp/vpy -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
    python3 -c "import locust, pydantic; print('locust', locust.__version__, 'pydantic', pydantic.__version__)"
    python3 -c "from servers.ssm_server.mamba_kernels import import_mamba_ssm as f; print(f() or 'mamba_ssm: the native backend imports')"
    start_exporter
    if [ -f .gpu/run.tar.gz ] && [ ! -d "$RUNS/$RUN_ID" ]; then tar xzf .gpu/run.tar.gz -C "$RUNS"; fi
    if [ -d "$RUNS/$RUN_ID" ]; then args=(--resume "$RUNS/$RUN_ID"); else args=("${2:-paper-h200}" --runs-dir "$RUNS" --run-id "$RUN_ID"); fi
    setsid python3 -m ctxload.cli run "${args[@]}" > /tmp/run.log 2>&1 < /dev/null &
    echo $! > /tmp/run.pid
    sleep 5; tail -3 /tmp/run.log
    wait_run; tail -25 /tmp/run.log ;;
  wait)
    wait_run; tail -30 /tmp/run.log ;;
  probe)
    # `ctxload run` of a short scenario (PROBE, default the overlap's 64 streams; each target's
    # server in turn) with a watchdog: when a server holds requests and makes no token for
    # STALL_S, SIGUSR1 writes every server thread's stack into its log (printed here) and the
    # run is stopped
    [ -n "${SKIP_INSTALL:-}" ] || install_site || exit 1
    start_exporter; RUN_ID=probe; rm -rf "$RUNS/probe"
    setsid python3 -m ctxload.cli run "${PROBE:-benchmarks/gpu/probe/overlap-64.yaml}" --runs-dir "$RUNS" \
      --run-id probe > /tmp/run.log 2>&1 < /dev/null &
    echo $! > /tmp/run.pid
    last=""; still=0; warm=0; seen=""; t0=$SECONDS
    while kill -0 "$(cat /tmp/run.pid)" 2>/dev/null && [ $((SECONDS - t0)) -lt "${WAIT_S}" ]; do
      sleep 5
      port=$(grep -o "on 127.0.0.1:[0-9]*" /tmp/run.log | tail -1 | cut -d: -f2)
      [ -n "$port" ] || continue
      [ "$port" = "$seen" ] || { seen=$port; last=""; still=0; warm=0; }  # the next target's server
      m=$(curl -s "127.0.0.1:$port/metrics" 2>/dev/null)
      [ -n "$m" ] || continue
      # progress: tokens prefilled + generated; a stall: requests held and no progress for STALL_S
      done_=$(echo "$m" | awk '/^ssm:(prompt|generation)_tokens_total/{s+=$2} END{printf "%d", s}')
      held=$(echo "$m" | awk '/^ssm:num_requests_(running|waiting)/{s+=$2} END{printf "%d", s}')
      why=""
      if ! curl -sf "127.0.0.1:$port/health" > /dev/null; then  # warming up: a stall only past WARM_S
        warm=$((warm + 5)); [ "$warm" -ge "${WARM_S:-150}" ] && why="not ready ${warm}s after listening"
      elif [ "$held" -gt 0 ] && [ "$done_" = "$last" ]; then
        still=$((still + 5)); [ "$still" -ge "${STALL_S:-30}" ] && why="$held requests held, tokens stuck at $done_ for ${still}s"
      else
        still=0; last=$done_
      fi
      if [ -n "$why" ]; then
        pids=$(pgrep -f -- "-m servers.ssm_server .*--port $port")
        echo "== $why: stacks of ssm-server $pids"; ps -o pid,ppid,stat,wchan:24,args -p "${pids// /,}" | cut -c1-160
        kill -USR1 $pids; sleep 3
        sed -n '/Thread 0x\|Current thread/,$p' "$RUNS"/probe/servers/*.log \
          | grep -v "^  File .*threading.py\|concurrent/futures" | tail -80
        curl -s "127.0.0.1:$port/metrics" | grep -E "^ssm:(num_requests|engine_|state_slots_used|prompt_tokens_total|generation_tokens_total)"
        kill -- -"$(cat /tmp/run.pid)" 2>/dev/null; break
      fi
    done
    grep -E "users=|rate=|ready after|error" /tmp/run.log | tail -8
    grep -hE "WARNING|ERROR|CRITICAL|captured|warmed|slow (step|turn)" "$RUNS"/probe/servers/*.log | cut -c1-300 | tail -24
    python3 -m ctxload.cli report "$RUNS/probe" > /tmp/report.log 2>&1; echo "report rc=$?"; pack ;;
  *) echo "usage: $0 kit N | gpu-checks | start [SCENARIO] | wait | probe"; exit 2 ;;
esac
