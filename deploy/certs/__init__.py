"""TLS certificates for the SuperLink (a private CA and a server certificate)."""
