# ctun's own type check walks into this example without it installed, so the package
# under test cannot be found there; installed (or with MYPYPATH set), it is checked fully.
# mypy: disable-error-code="import-not-found"
"""padded-udp keeps ctun's transport contract: the suite every ctun transport passes."""

from __future__ import annotations

import socket

from ctun.testing import TransportConformance
from ctun_transport_padded import PaddedUdpTransport


class TestPaddedUdp(TransportConformance):
    transport_class = PaddedUdpTransport
    raw_socket_type = socket.SOCK_DGRAM  # the default, said out loud: junk comes as UDP
