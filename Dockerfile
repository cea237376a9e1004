# The Madevo Edge Agent in a container, for Docker and balena fleets (see README "Containers").
#
# Multi-arch without a compiler: every dependency is pure Python, so the same file builds for
# linux/amd64, linux/arm64 and linux/arm/v7 (Raspberry Pi), e.g.
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 -t edge-agent .
# The buffer lives on a volume at /var/lib/edge-agent: keep it across container upgrades.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
# The project and its pinned-by-range dependencies (pyproject.toml), into a virtualenv that the
# runtime stage copies whole.
RUN python -m venv /opt/edge-agent/venv \
    && /opt/edge-agent/venv/bin/pip install --no-cache-dir /src

FROM python:3.11-slim
# A system user without a login (uid 10001: numeric, so Kubernetes can check runAsNonRoot),
# in dialout for serial devices passed with --device.
RUN useradd --system --uid 10001 --user-group --groups dialout \
        --home-dir /var/lib/edge-agent --no-create-home --shell /usr/sbin/nologin edge-agent \
    && install -d -o edge-agent -g edge-agent -m 0750 /var/lib/edge-agent
COPY --from=build /opt/edge-agent/venv /opt/edge-agent/venv
COPY docker/config.toml /etc/edge-agent/config.toml
ENV PATH=/opt/edge-agent/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001
VOLUME ["/var/lib/edge-agent"]
EXPOSE 9108
# `status` exits 0 when healthy; Docker knows only 0 and 1 (its 2 is reserved).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s \
    CMD ["/bin/sh", "-c", "edge-agent status --config /etc/edge-agent/config.toml >/dev/null || exit 1"]
# SIGTERM stops the agent cleanly: sources first, then a last commit, then the uploader.
STOPSIGNAL SIGTERM
ENTRYPOINT ["edge-agent"]
CMD ["run", "--config", "/etc/edge-agent/config.toml"]
