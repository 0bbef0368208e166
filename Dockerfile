# pancls on a CUDA workstation:
#   docker build -t pancls .
#   docker run --gpus all --rm -v /data:/data -v $PWD/runs:/runs pancls lt --config configs/lt_ldam_drw.yaml \
#       --data /data/cifar10.npz --out /runs/cifar10_tsp
# The base image brings a CUDA build of PyTorch; pancls installs on top of it without replacing torch.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/pancls
COPY pyproject.toml README.md ./
COPY pancls ./pancls
COPY configs ./configs
RUN pip install --no-cache-dir . && pancls --version

# Run as an unprivileged user; results go to mounted volumes.
RUN useradd --create-home --uid 1000 pancls
USER pancls
ENTRYPOINT ["pancls"]
CMD ["--help"]
