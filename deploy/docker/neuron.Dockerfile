# tokenmill for AWS Inferentia/Trainium: AWS's Neuron deep-learning container, whose torch-neuronx is kept
# (AWS's index only); optimum-neuron comes with the `neuron` extra.
# Build from the repository root: docker build -f deploy/docker/neuron.Dockerfile -t tokenmill:neuron .
FROM public.ecr.aws/neuron/pytorch-inference-neuronx:2.8.0-neuronx-py311-sdk2.26.0-ubuntu22.04

SHELL ["/bin/sh", "-eu", "-c"]
RUN --mount=type=bind,target=/src,rw sh /src/deploy/docker/install.sh neuron base

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
