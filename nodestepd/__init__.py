"""nodestepd: run OCI container steps on a compute node, the way Slurm's oci.conf describes.

`nodestepd.Client` is the asyncio API (nodestepd.client, docs/api.md), loaded on first
use so that `import nodestepd` stays as light as nodestepctl needs it (no typing, no asyncio).
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - annotations would import typing on every nodestepctl start
    if name == "Client":
        from nodestepd.client import Client

        return Client
    raise AttributeError(f"module 'nodestepd' has no attribute {name!r}")
