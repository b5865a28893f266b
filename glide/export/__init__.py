"""How volumes reach clients: the NBD handshake (ublk attach lives in the C core)."""
