# Container image: docker build -t rtcsignal . && docker run -p 8083:8083 rtcsignal
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY rtcsignal ./rtcsignal
RUN pip install --no-cache-dir . && useradd --system --no-create-home rtcsignal
USER rtcsignal
ENV RTCSIGNAL_HOST=0.0.0.0 RTCSIGNAL_PORT=8083 RTCSIGNAL_LOG_FORMAT=json
EXPOSE 8083
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8083/readyz').status != 200)"
CMD ["rtcsignal", "serve"]
