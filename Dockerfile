# syntax=docker/dockerfile:1
# The gateway's image: built in one stage, run from a slim one holding only
# the Python runtime and the installed package (no compiler, no pip, no
# package manager caches), as a non-root user. See deploy/kubernetes/.
#
#   docker build -t caracal-gateway:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/caracal-gateway
COPY setup.cfg pyproject.toml README.rst /src/
COPY caracal /src/caracal
COPY twisted /src/twisted
COPY etc /src/etc
# A regular (not editable) install: twistd finds the plugin in site-packages,
# exactly as an operator's install does.
RUN /opt/caracal-gateway/bin/pip install /src \
    # Write twistd's plugin cache now: at run time site-packages is on a
    # read-only root filesystem and twistd would warn on every start.
    && /opt/caracal-gateway/bin/python -c \
       "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && /opt/caracal-gateway/bin/twistd --help | grep -q caracal-gateway \
    # The installer has done its work; the final image does not need it.
    && /opt/caracal-gateway/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
# A fixed numeric user, the one the Deployment's runAsUser names.
RUN groupadd --system --gid 10001 caracal \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin caracal \
    && mkdir -p /var/lib/caracal-gateway/audit-spool \
    && chown 10001:10001 /var/lib/caracal-gateway/audit-spool
COPY --from=build /opt/caracal-gateway /opt/caracal-gateway
ENV PATH=/opt/caracal-gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8081
# Foreground, no pidfile (the container runtime tracks the process), JSON
# log lines on stdout; the Deployment adds --workers sized to its CPU limit.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "--logger", "caracal.gateway.logfile.observer", "caracal-gateway"]
CMD ["--workers", "1"]
