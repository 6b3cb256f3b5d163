# -*- test-case-name: tests.integration.test_demo -*-
"""
The local demo: C{python -m caracal.demo} brings up the dev STS, a demo tool
server and the gateway (dev mode, TLS) on 127.0.0.1 and sends one request
through it. See L{caracal.demo.run}.
"""
