# tokenmill for AMD GPUs: AMD's ROCm 6.4 image; torch's rocm6.4 build (it brings its Triton).
# Build from the repository root: docker build -f deploy/docker/rocm.Dockerfile -t tokenmill:rocm .
FROM rocm/dev-ubuntu-24.04:6.4.1

SHELL ["/bin/sh", "-eu", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,target=/src,rw sh /src/deploy/docker/install.sh rocm torch==2.9.0 https://download.pytorch.org/whl/rocm6.4

# Hub downloads (HF_HOME) and tokenmill's derived files (~/.cache/tokenmill; home is /data) go to the /data
# volume: mount it to keep them across restarts.
ENV PATH=/opt/tokenmill/bin:$PATH HF_HOME=/data/huggingface PORT=3000
VOLUME /data
USER 10001
EXPOSE 3000 3001
# 503 until the model is warm and while draining on SIGTERM; the start period covers a model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/health', timeout=4)"]
ENTRYPOINT ["tokenmill", "serve"]
