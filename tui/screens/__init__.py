"""The TUI's modal screens: help, the add-route dialog and the yes/no confirmation."""
