"""Test helpers for ctun plugin authors (needs pytest).

    from ctun.testing import TransportConformance

    class TestMine(TransportConformance):
        transport_class = MyTransport

runs the transport contract of `ctun.core.contracts.Transport` against `MyTransport`; see
`TransportConformance` for what can be adjusted, and docs/plugins.md for the whole story.
"""

from .transport import TransportConformance

__all__ = ["TransportConformance"]
