# syntax=docker/dockerfile:1
# shadowgate: one image for the operator and the router.
#   docker build -t shadowgate:0.1.0 .
#   docker run --rm shadowgate:0.1.0 operator --help      # the operator (manifests/base runs it)
#   docker run --rm shadowgate:0.1.0 router --help        # the router (the operator runs it per ShadowDeployment)
# Wheels are built in the first stage (with a compiler, for any dependency without a wheel for this
# platform); the final stage gets only the installed virtualenv, the SQL migrations and a non-root user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
    && apt-get install --yes --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
# Only the product: operator/shadowgate_dev (the local control plane, node and demo) stays out of the image.
COPY operator/shadowgate_operator/ operator/shadowgate_operator/
COPY router/ router/
COPY common/ common/
RUN pip wheel --wheel-dir /wheels . \
    && python -m venv /opt/shadowgate \
    && /opt/shadowgate/bin/pip install --no-index --find-links /wheels shadowgate

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="shadowgate" \
      org.opencontainers.image.description="Kubernetes operator that shadows or canaries a candidate ML model and promotes or rolls it back from real outcomes" \
      org.opencontainers.image.licenses="Apache-2.0"
# The same uid as the router pods the operator creates (builders.RUN_AS_USER) and the operator's
# Deployment (manifests/base/deployment.yaml): 65532, like distroless "nonroot".
RUN groupadd --system --gid 65532 nonroot \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin nonroot
COPY --from=build /opt/shadowgate /opt/shadowgate
COPY migrations/ /opt/shadowgate/migrations/
ENV PATH=/opt/shadowgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHADOWGATE_MIGRATIONS=/opt/shadowgate/migrations
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["shadowgate"]
CMD ["--help"]
