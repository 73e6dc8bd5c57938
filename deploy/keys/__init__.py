"""SuperNode authentication keys (EC, OpenSSH format) and their registration."""
