# palm_net agent image.  No Docker engine runs on the project's machines:
# the executed form of this topology is the network-namespace drill
# (scripts/drill); hadolint checks this file in CI.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="palm_net agent" \
      org.opencontainers.image.description="PALM secure live migration agent"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# QEMU for the agent's QEMU VMs (KVM when the container gets /dev/kvm, TCG otherwise).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-system-x86 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/palm_net
COPY setup.cfg pyproject.toml README.md ./
COPY palm_net ./palm_net
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/palm --create-home palm

USER 10001:10001
# State (identity, certificate, SQLite) and VM memory live in the volume;
# mount the authority's ca.pub at /etc/palm/ca.pub.
VOLUME ["/var/lib/palm"]
EXPOSE 7400

HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["palm", "status", "--control", "/var/lib/palm/control.sock"]

ENTRYPOINT ["palm", "--log-format", "json", "agent", \
            "--dir", "/var/lib/palm/state", "--listen", "0.0.0.0:7400", \
            "--control", "/var/lib/palm/control.sock", "--ca", "/etc/palm/ca.pub", \
            "--memory-dir", "/dev/shm/palm"]
