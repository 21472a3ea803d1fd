# The one project image every KFP component runs. CUDA PyTorch base pinned by tag;
# xformers pinned to the release built for that torch (0.0.31 <-> torch 2.7.1).
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/t2i-pipeline

COPY pyproject.toml constraints.txt README.md ./
COPY components ./components
COPY pipelines ./pipelines
RUN pip install -c constraints.txt ".[gpu,s3,gcs]" "xformers==0.0.31" \
    && python -c "import torch, components.cli; print('torch', torch.__version__)"

ENTRYPOINT ["t2i"]
CMD ["--help"]
