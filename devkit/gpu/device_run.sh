#!/bin/bash
# The GPU path on a real air-gapped GPU server (the lent H200: root, no network, no systemd), step by step.
# Run from the repository root; everything it prints is kept under $OUT (tests/fixtures/gpu/ keeps a copy).
#
#   bash devkit/gpu/device_run.sh probe      what the server has (driver, compiler, python headers, tools)
#   bash devkit/gpu/device_run.sh stash      copy carried files (.gpucarry/{parts,vols}) to /opt/{parts,vols}
#   bash devkit/gpu/device_run.sh kit        check and unpack the carried vLLM kit, install it as /opt/vllm-venv
#   bash devkit/gpu/device_run.sh install    join the carried volumes, install.sh (preflight on the real GPU)
#   bash devkit/gpu/device_run.sh serve      start llm@tiny-gpu as its unit says (devkit/unit_runner.py), cold
#                                            start, chat completion (openai client), vllm bench serve,
#                                            kill -9 of the engine and the restart (warm start)
set -u
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}
PARTS=/opt/parts
VOLS=/opt/vols
VENV=/opt/vllm-venv
UNIT=tiny-gpu
PORT=8000
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUT"

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

probe() {
    say "host: $(uname -r) $(. /etc/os-release && echo "$PRETTY_NAME")"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
    for t in cc gcc clang x86_64-linux-gnu-gcc nvcc python3 curl useradd runuser setpriv systemctl; do
        printf '  %-22s %s\n' "$t" "$(command -v "$t" || echo '-')"
    done
    ls /usr/bin/*gcc* /usr/lib/gcc/x86_64-linux-gnu 2>/dev/null | head -20
    python3 -c 'import sysconfig, os; i = sysconfig.get_paths()["include"]; print("python", sysconfig.get_python_version(), "include", i, "Python.h" if os.path.exists(i + "/Python.h") else "NO Python.h")'
    python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1 | tail -1
    python3 -c 'import site; print("site", site.getsitepackages())'
    ls -ld / /opt /root /usr/local/lib/python3*/dist-packages 2>/dev/null
    id llm 2>&1; df -h / /opt /var 2>/dev/null | tail -n +2
}

stash() { # carried files live outside the tree (the next call replaces the carried folder)
    local d
    for d in parts vols; do
        if [ -d "$REPO/.gpucarry/$d" ]; then
            mkdir -p "/opt/$d" && cp -a "$REPO/.gpucarry/$d/." "/opt/$d/" && ls -la "/opt/$d"
        fi
    done
}

kit() {
    local t0=$SECONDS
    (cd "$PARTS" && sha256sum -c --quiet PARTS.sha256) || { say "kit parts damaged"; return 1; }
    rm -rf /opt/kit && cat "$PARTS"/kit.tar.* | tar -xf - -C /opt && (cd /opt/kit && sha256sum -c --quiet SHA256SUMS) &&
        VLLM_VENV=$VENV bash /opt/kit/install_offline.sh 2>&1 | tail -15
    say "kit installed as $VENV in $((SECONDS - t0)) s"
}

install() {
    local t0=$SECONDS vol1
    vol1=$(ls -d "$VOLS"/*.vol01)
    say "install.sh from $vol1 (other volumes beside it)"
    bash "$vol1/install.sh" --pubkey "$VOLS/build.pub" --skip-check systemd 2>&1 | tee "$OUT/install.log"
    local rc=${PIPESTATUS[0]}
    say "install.sh exit $rc in $((SECONDS - t0)) s"
    cat /etc/llm/$UNIT.env >"$OUT/tiny-gpu.env" 2>/dev/null
    return "$rc"
}

health() { # SECONDS-LIMIT -> 0 when /health answers 200
    local deadline=$((SECONDS + $1))
    while [ $SECONDS -lt $deadline ]; do
        if "$VENV/bin/python" -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2).status != 200)" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}

engine_pid() {
    "$VENV/bin/python" - <<'EOF'
import os
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            comm = open(f"/proc/{p}/comm").read().strip()
        except OSError:
            continue
        if "EngineCor" in comm:  # comm is cut at 15 characters: "VLLM::EngineCor"
            print(p)
            break
EOF
}

serve() {
    rm -rf "/var/cache/llm/$UNIT"  # a cold start: empty caches
    local t0=$SECONDS
    setsid python3 -m devkit.unit_runner "llm@$UNIT" >"$OUT/service.log" 2>&1 &
    echo $! >/tmp/unit_runner.pid
    if health 400; then say "cold start: /health 200 after $((SECONDS - t0)) s"; else say "no /health in 400 s"; tail -40 "$OUT/service.log"; return 1; fi
    "$VENV/bin/python" - "$PORT" <<'EOF' 2>&1 | tee "$OUT/chat.txt"
import sys, time
from openai import OpenAI
c = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
print("models:", [m.id for m in c.models.list().data])
t = time.monotonic()
r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello! Tell me a story."}],
                              max_tokens=32, temperature=0)
print(f"chat completion in {time.monotonic() - t:.2f} s: finish={r.choices[0].finish_reason} "
      f"usage={r.usage.prompt_tokens}+{r.usage.completion_tokens} text={r.choices[0].message.content!r}")
EOF
    local model_dir
    model_dir=$(sed -n 's/^LLM_MODEL=//p' "/etc/llm/$UNIT.env" | tr -d '"')
    say "vllm bench serve (random dataset, tokenizer $model_dir)"
    env -i PATH="$VENV/bin:/usr/bin:/bin" HOME=/tmp HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
        timeout 240 "$VENV/bin/vllm" bench serve --backend openai-chat --endpoint /v1/chat/completions \
        --base-url "http://127.0.0.1:$PORT" --model tiny --tokenizer "$model_dir" --dataset-name random \
        --random-input-len 64 --random-output-len 32 --num-prompts 200 --request-rate inf 2>&1 |
        tee "$OUT/bench.txt" | tail -30
    local pid
    pid=$(engine_pid)
    say "kill -9 of EngineCore (pid ${pid:-none})"
    [ -n "$pid" ] && kill -9 "$pid"
    sleep 8
    t0=$SECONDS
    if health 300; then say "restart after kill -9: /health 200 after $((SECONDS - t0)) s (warm caches)"; else say "no /health after the restart"; fi
    ls -la "/var/cache/llm/$UNIT" | head; du -sh "/var/cache/llm/$UNIT"/* 2>/dev/null
    kill -TERM "$(cat /tmp/unit_runner.pid)" 2>/dev/null
    sleep 5
    grep -E "unit_runner|llm-serve: exec|Error|error|Triton|compiler|FlashAttention|backend|graph|compile" "$OUT/service.log" | head -60
}

cd "$REPO" || exit 1
export PYTHONPATH="$REPO"
for step in "$@"; do
    case "$step" in
        probe | kit | install | serve) "$step" 2>&1 | tee -a "$OUT/$step.txt" ;;
        stash) stash ;;
        *) say "unknown step $step"; exit 2 ;;
    esac
done
