#!/usr/bin/env python3
"""Writes an Ed25519 private key as PKCS#8 PEM: what an older miren data dir held."""
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

key = Ed25519PrivateKey.generate()
pem = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
)
with open(sys.argv[1], "wb") as f:
    f.write(pem)
