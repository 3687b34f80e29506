# tokenmill for Intel Gaudi: Habana's PyTorch installer image, whose torch and habana_frameworks are kept
# (they are on no public index). Habana versions the path; `latest` is the only tag it keeps stable.
# Build from the repository root: docker build -f deploy/docker/gaudi.Dockerfile -t tokenmill:gaudi .
# hadolint ignore=DL3007
FROM vault.habana.ai/gaudi-docker/1.22.0/ubuntu24.04/habanalabs/pytorch-installer-2.7.1:latest

SHELL ["/bin/sh", "-eu", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,target=/src,rw sh /src/deploy/docker/install.sh gaudi base

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
