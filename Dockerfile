# The one project image every KFP component (and every Kubeflow Trainer node) runs.
# PyTorch 2.13.0, the release the test suite runs (its CPU build), here with CUDA 13.0:
# the image Kubeflow Trainer v2.3's own torch runtime uses. xformers is left out: no
# xformers release is built for torch 2.13 (0.0.35, the newest, is torch 2.10's and
# could not load its kernels under 2.11); PyTorch's SDPA (flash attention) is the
# default, and the `gpu` extra stays for images built on a torch xformers supports.
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/t2i-pipeline

COPY pyproject.toml constraints.txt README.md ./
COPY components ./components
COPY pipelines ./pipelines
# torch is the base image's (it satisfies the project's torch>=2.4,<=2.14.1, so pip
# keeps it); the check fails the build if anything replaced it.
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-before \
    && pip install -c constraints.txt ".[s3,gcs]" \
    && python -c "import torch; print(torch.__version__)" | cmp - /tmp/torch-before \
    && python -c "import torch, components.cli; print('torch', torch.__version__)"

ENTRYPOINT ["t2i"]
CMD ["--help"]
