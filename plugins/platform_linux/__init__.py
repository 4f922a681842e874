"""plugins/platform_linux."""
