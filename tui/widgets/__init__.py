"""Small widgets of the TUI: the header line, the counters panel and a refreshing table."""
