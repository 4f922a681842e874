"""A local lab in network namespaces shaped like Docker Desktop, for the demo and the tests."""
