"""plugins/transport_tcp."""
