"""Rows of the resource table for tests that need one but no registry."""

from __future__ import annotations

from caracal.gateway.registry import ToolResource


def tool_resource(
    auth_mode: str = "caracal_jwt",
    auth_header: str | None = None,
    auth_scheme: str | None = None,
    **fields,
) -> ToolResource:
    """
    The resource C{tools} of zone C{zone-1}, application C{app-1}, with the
    credential settings given; C{fields} override any other column.
    """
    row = {
        "resource_identifier": "tools",
        "zone_id": "zone-1",
        "application_id": "app-1",
        "upstream_url": "https://api.example/",
    }
    row.update(fields)
    return ToolResource(
        auth_mode=auth_mode, auth_header=auth_header, auth_scheme=auth_scheme, **row
    )
