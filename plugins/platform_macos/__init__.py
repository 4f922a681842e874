"""plugins/platform_macos."""
