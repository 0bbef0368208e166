# pancls in a container. Build and run (README, "Docker"):
#   docker build -t pancls .
#   docker run --gpus all --ipc=host --rm -v /path/to/ct:/data:ro -v $PWD/runs:/runs \
#       pancls cv --manifest /data/manifest.csv --out /runs/cv
#   docker run --gpus all --ipc=host --rm -v /path/to/ct:/data:ro -v $PWD/runs:/runs \
#       pancls predict --model /runs/cv /data/study01 --out /runs/preds.json
# CPU only: --build-arg BASE_IMAGE=python:3.11-slim-bookworm --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#
# Versions: every package comes from the lock files that CI installs (scripts/lock.sh writes them). A base image that
# brings torch keeps it: pip is constrained by requirements-notorch.lock (the same pins without torch and the packages
# only torch needs), so the CUDA build of the base is never replaced. A base without torch gets the locked
# torch==2.13.0 from requirements.lock.
#
# The default base is the official PyTorch CUDA runtime image, pinned by tag (Ubuntu 22.04, Python 3.11, torch 2.9.1;
# monai 1.6 in the lock needs torch >= 2.8).
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Build arguments, not ENV: nothing here stays in the image's environment.
# TORCH_INDEX_URL: only for a base without torch, where pip should look for a torch build besides PyPI.
ARG TORCH_INDEX_URL=
# The unprivileged user's uid: match the owner of the host folder mounted on /runs.
ARG PANCLS_UID=1000
ARG DEBIAN_FRONTEND=noninteractive

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/pancls/venv \
    PATH=/opt/pancls/venv/bin:$PATH

# dcm2niix: the reference converter the CT readers are tested against (the same Debian/Ubuntu package as CI's).
RUN apt-get update \
    && apt-get install -y --no-install-recommends dcm2niix \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pancls/src
COPY pyproject.toml README.md requirements.lock requirements-notorch.lock ./
COPY pancls ./pancls
COPY configs /opt/pancls/configs

# A venv that sees the base's site-packages (its torch) but installs into its own folder: works on the conda Python
# of the PyTorch image and on Debian's system Python (which refuses plain pip installs, PEP 668) alike.
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
    && if python -c "import torch" 2>/dev/null; then \
           lock=requirements-notorch.lock; \
           echo "base image torch kept: $(python -c 'import torch; print(torch.__version__)')"; \
       else \
           lock=requirements.lock; \
       fi \
    && python -m pip install -q -c requirements.lock --upgrade pip \
    && python -m pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c "$lock" . \
    && pancls --version \
    && command -v dcm2niix

# Run as an unprivileged user; data comes in on /data, run folders and predictions go to /runs.
RUN useradd --create-home --non-unique --uid "$PANCLS_UID" --user-group pancls \
    && mkdir -p /data /runs \
    && chown pancls:pancls /data /runs
USER pancls
ENV PANCLS_CACHE=/runs/.cache/pancls
WORKDIR /runs
VOLUME ["/data", "/runs"]

ENTRYPOINT ["pancls"]
CMD ["--help"]
