# regsweep: one image for the service, the workers and beat (the command picks the role).
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY regsweep ./regsweep
COPY service ./service
COPY worker ./worker
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --no-create-home regsweep
USER regsweep
ENTRYPOINT ["regsweep", "-c", "/etc/regsweep/regsweep.yaml"]
CMD ["check-config"]
