//! Accept loop: listeners, connection permits, allow-list, TLS acceptors, graceful shutdown.
