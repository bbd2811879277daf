# The MC dropout server (python -m service): KServe v2 REST on 8000, gRPC on 8001, metrics on 8002. Build with `make image`: docker when an
# engine answers, else buildah. Build arguments:
#   BASE  the Python 3.11 base image of both stages; default the official python image.
#   CUDA  1 (default): onnxruntime-gpu with its CUDA 13 / cuDNN 9 libraries from the package
#         index (the `cuda` extra); 0: without them, a CPU-only image (on a Debian 12 base:
#         0.68 GB, against 2.85 GB with them).
# The model repository is baked in from models/ (build it first: `make models`); mount a
# volume on /models to serve another one. Settings: MCD_* environment variables.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS builder
ARG CUDA=1
WORKDIR /src
# Only what `pip install .` needs: the serving package, no export/, tests or models, so the
# venv holds exactly the serving dependencies of pyproject.toml (no torch, no compilers).
COPY pyproject.toml README.md ./
COPY service/ service/
RUN python3 -m venv /opt/venv \
    && if [ "$CUDA" = "1" ]; then target=".[cuda]"; else target="."; fi \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "$target" \
    && /opt/venv/bin/pip uninstall --yes --disable-pip-version-check setuptools pip

FROM ${BASE} AS runtime
RUN groupadd --system --gid 10001 mcd \
    && useradd --no-log-init --uid 10001 --gid mcd --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin mcd
COPY --from=builder /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/mcdropout/healthcheck.py
COPY models/ /models/
# NVIDIA_*: what the NVIDIA container toolkit mounts on a GPU host (driver and libcuda);
# harmless elsewhere, where the server falls back to the CPU. ORT_DISABLE_TELEMETRY: a server
# sends no telemetry (ONNX Runtime would also try to keep a device id in a home directory).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MCD_HOST=0.0.0.0 \
    MCD_HTTP_PORT=8000 \
    MCD_GRPC_PORT=8001 \
    MCD_METRICS_PORT=8002 \
    MCD_MODEL_REPOSITORY=/models \
    MCD_GRACE_PERIOD_S=10
EXPOSE 8000 8001 8002
WORKDIR /opt/mcdropout
USER 10001:10001
# The probe reads MCD_HOST / MCD_GRPC_PORT, so it follows the settings. Model loading (with
# its load-time checks) takes seconds: the start period covers it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/mcdropout/healthcheck.py"]
# SIGTERM: health NOT_SERVING, keep serving for MCD_DRAIN_PERIOD_S (1 s) while clients move
# away, stop accepting RPCs, let in-flight ones finish within MCD_GRACE_PERIOD_S, exit 0. Give
# the engine's stop timeout more than drain + grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
