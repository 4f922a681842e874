"""plugins/platform_windows."""
