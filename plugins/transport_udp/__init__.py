"""plugins/transport_udp."""
