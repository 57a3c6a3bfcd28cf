# palm_net agent image.  BASE is any Debian bookworm image with python3 (3.11)
# and its venv module: the official slim Python image by default; the
# container drill (scripts/drill --containers) builds this same file on a base
# it makes from Debian packages (mmdebstrap).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

LABEL org.opencontainers.image.title="palm_net agent" \
      org.opencontainers.image.description="PALM secure live migration agent"

# PALM_CONTROL: a `palm` command run in the container (`podman exec`) finds the agent.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/palm/venv/bin:$PATH \
    PALM_CONTROL=/var/lib/palm/run/control.sock

# QEMU for the agent's QEMU VMs (KVM when the container gets /dev/kvm, TCG otherwise).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-system-x86 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/palm/src
COPY setup.cfg pyproject.toml README.md ./
COPY palm_net ./palm_net
# The agent user owns /var/lib/palm (0700): the volume mounted there holds
# its state (state/), control socket (run/) and VM memory (vms/), each 0700.
RUN python3 -m venv /opt/palm/venv \
    && pip install --no-cache-dir . \
    && groupadd --system --gid 10001 palm \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/palm --no-create-home palm \
    && install -d -m 0700 -o 10001 -g 10001 /var/lib/palm /var/lib/palm/state /var/lib/palm/run \
        /var/lib/palm/vms \
    && install -d -m 0755 /etc/palm

USER 10001:10001
# Mount this agent's own volume at /var/lib/palm and the authority's public
# key alone, read-only, at /etc/palm/ca.pub; never the authority's ca.key.
VOLUME ["/var/lib/palm"]
EXPOSE 7400

HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["palm", "status", "--control", "/var/lib/palm/run/control.sock"]

ENTRYPOINT ["palm", "--log-format", "json", "agent", \
            "--dir", "/var/lib/palm/state", "--listen", "0.0.0.0:7400", \
            "--control", "/var/lib/palm/run/control.sock", "--ca", "/etc/palm/ca.pub", \
            "--memory-dir", "/var/lib/palm/vms"]
